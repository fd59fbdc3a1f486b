"""Draw a scene with pillow: flat-coloured shapes on a plain light canvas.

No anti-aliasing: every pixel is either the background or exactly one object's colour, so a
test can check the picture against the ground truth pixel by pixel, and a small vision model
sees clean colour regions. Each shape fills its box (`WorldObject.bbox`) as far as its
outline allows and never leaves it; the box centre is always inside the shape.

The outlines are chosen to stay distinct at 14-20 px: a circle, a full square, an upward
triangle, a diamond (square turned 45 degrees), a fat five-pointed star, a plus-shaped
cross with arms a third of the box wide, and a heart.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from .scene import DEFAULT_CONFIG, KNOWN_SHAPES, Scene, WorldConfig


def _star_points(left, top, right, bottom, points=5, inner_ratio=0.5):
    """Vertices of a star with its first point straight up, inscribed in the box."""
    cx, cy = (left + right) / 2, (top + bottom) / 2
    outer = (right - left) / 2
    inner = outer * inner_ratio
    vertices = []
    for k in range(2 * points):
        radius = outer if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        vertices.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    # The star's lowest points sit above the box bottom; shift it down to use the box.
    drop = (bottom - max(y for _, y in vertices)) / 2
    return [(x, y + drop) for x, y in vertices]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, bbox: tuple, rgb: tuple) -> None:
    """Draw one filled shape inside bbox = (left, top, right, bottom), right/bottom exclusive."""
    left, top, right, bottom = bbox
    x0, y0, x1, y1 = left, top, right - 1, bottom - 1  # pillow's boxes are inclusive
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = right - left
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    elif shape == "star":
        draw.polygon(_star_points(x0, y0, x1, y1), fill=rgb)
    elif shape == "cross":
        half_arm = side / 6  # arms one third of the box wide
        draw.rectangle((round(cx - half_arm), y0, round(cx + half_arm), y1), fill=rgb)
        draw.rectangle((x0, round(cy - half_arm), x1, round(cy + half_arm)), fill=rgb)
    elif shape == "heart":
        radius = side / 4
        lobe_y = y0 + radius
        draw.ellipse((x0, y0, x0 + 2 * radius, y0 + 2 * radius), fill=rgb)
        draw.ellipse((x1 - 2 * radius, y0, x1, y0 + 2 * radius), fill=rgb)
        draw.polygon([(x0, lobe_y + radius * 0.3), (x1, lobe_y + radius * 0.3), (cx, y1)], fill=rgb)
        draw.rectangle((round(x0 + radius), round(lobe_y), round(x1 - radius), round(cy)), fill=rgb)
    else:
        raise ValueError(f"draw_shape: unknown shape {shape!r}; known shapes: {KNOWN_SHAPES}")


def render_scene(scene: Scene, config: WorldConfig | None = None) -> Image.Image:
    """The scene as an RGB PIL image of config.canvas_size x config.canvas_size pixels.

    config defaults to the scene's own. Deterministic: the same scene gives identical bytes.
    """
    config = config or scene.config or DEFAULT_CONFIG
    image = Image.new("RGB", (config.canvas_size, config.canvas_size), tuple(config.background))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_shape(draw, obj.shape, obj.bbox, config.rgb(obj.colour))
    return image


def render_shape(shape: str, size: int, *, colour=(0, 0, 0), background=(255, 255, 255)) -> Image.Image:
    """One shape filling a size x size image (for looking at outlines and testing them)."""
    image = Image.new("RGB", (size, size), background)
    draw_shape(ImageDraw.Draw(image), shape, (0, 0, size, size), colour)
    return image
