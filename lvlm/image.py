"""Image pipeline: a file (or PIL image) in, a normalised CLIP pixel tensor out.

LLaVA-1.5 feeds its CLIP ViT-L/14-336 vision tower with images prepared in four steps:

    1. pad to a square of side max(w, h), image centred, fill = CLIP mean * 255 as ints
       (122, 116, 104)               -- LLaVA's `expand2square` (image_aspect_ratio="pad")
    2. resize the shortest edge to 336 with bicubic resampling
    3. centre-crop 336 x 336
    4. scale by 1/255 and normalise with the CLIP mean and std

Steps 2-4 are Hugging Face's `CLIPImageProcessor`; the `llava-hf` checkpoints use it without
step 1 (`pad_to_square=False` here). Steps 2 and 3 are done on 8-bit images with pillow, as
the Hugging Face processor does, so the two agree to float rounding.

Everything before the first step -- turning any file pillow can read into an 8-bit RGB
image -- is `load_image`.
"""

import os

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP normalisation constants (the values in `openai/clip-vit-large-patch14-336`'s
# preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow modes holding one channel of more than 8 bits per sample.
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


def load_image(source):
    """Read an image and return it as an 8-bit RGB `PIL.Image.Image`.

    `source`: a path (str or os.PathLike), a binary file object, or a PIL image.
    Errors: a path that does not exist -> FileNotFoundError naming it; anything pillow
    cannot decode (a text file called .png, a truncated file) -> ValueError
    "cannot read image <path>: <reason>". See `convert_to_rgb` for how modes are mapped.
    """
    if isinstance(source, Image.Image):
        return convert_to_rgb(source)

    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.exists(name):
            raise FileNotFoundError(f"image file not found: {name}")
        try:
            with open(name, "rb") as f:
                image = Image.open(f)
                image.load()  # decode now, while the file is open; errors surface here
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {name}: {e}") from e
    else:
        name = getattr(source, "name", "<file object>")
        try:
            image = Image.open(source)
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {name}: {e}") from e

    try:
        return convert_to_rgb(image)
    except ValueError as e:
        raise ValueError(f"cannot read image {name}: {e}") from e


def convert_to_rgb(image):
    """Map a PIL image of any mode to 8-bit RGB.

    The rules (chosen here; LLaVA itself just calls `.convert("RGB")`):
    - transparency (modes RGBA, LA, PA, RGBa, La, or a palette / grey image with a
      `transparency` entry) is composited over WHITE, as Hugging Face's `convert_to_rgb`
      does. (Plain `.convert("RGB")` would drop alpha and show whatever colour sits under
      transparent pixels.) Fully opaque images are unchanged by this.
    - 16-bit integer modes (I;16, I;16L, I;16B) are scaled from 0..65535 to 0..255:
      v8 = round(v * 255 / 65535) (= v / 257).
    - 32-bit integer mode "I" is treated the same way, as 16-bit samples, since that is how
      pillow delivers 16-bit PNG / TIFF data; values outside 0..65535 are clipped.
    - 32-bit float mode "F": if every finite value is <= 1 the samples are taken as 0..1
      (v8 = round(v * 255)), otherwise as 0..255 (v8 = round(v)); then clipped to 0..255,
      NaN -> 0. (Float images are usually 0..1; `L.convert("F")` gives 0..255.)
    - every single-channel result is repeated over R, G and B.
    - everything else (L, 1, P, CMYK, YCbCr, ...) uses pillow's own conversion.
    """
    mode = image.mode
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(image)

    bands = image.getbands()
    has_alpha = "A" in bands or "a" in bands or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")

    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert image of mode {mode!r} to RGB: {e}") from e


def _high_depth_to_rgb(image):
    """16/32-bit integer and float single-channel images -> 8-bit RGB (rules in `convert_to_rgb`)."""
    values = np.asarray(image).astype(np.float64)  # [H, W]
    if image.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=np.inf, neginf=-np.inf)
        finite = values[np.isfinite(values)]
        white_level = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
    else:
        white_level = 65535.0
    grey = np.round(np.clip(values / white_level, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.stack([grey, grey, grey], axis=-1)))


# ----------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------


def pad_image_to_square(image, fill):
    """Pad an RGB PIL image to a square of side max(w, h) with the image centred.

    Source: LLaVA's `expand2square` (the released code's behaviour): the offset of the image
    along the padded axis is floor((max(w, h) - min(w, h)) / 2), so with an odd difference
    the extra pad row/column goes to the bottom/right. `fill` is an (r, g, b) int tuple.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(c) for c in fill))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_shortest_edge(image, size):
    """Resize a PIL image so its shortest edge is `size`, keeping the aspect ratio; bicubic.

    Source: Hugging Face `get_resize_output_image_size(..., default_to_square=False)`: the
    long edge becomes int(size * long / short) -- truncated, not rounded (e.g. a 31 x 20
    image to size 7 gives 10 x 7, not 11 x 7). Resampling is pillow's BICUBIC on the 8-bit
    image, as the Hugging Face processor does it (reducing_gap=None).
    """
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC, reducing_gap=None)


def center_crop(pixels, size):
    """Crop the central `size` x `size` window of an array `pixels` [H, W, C].

    Source: Hugging Face `image_transforms.center_crop`: top = (H - size) // 2 and
    left = (W - size) // 2 (floor division, so with an odd difference the extra row/column
    is cut from the bottom/right). Requires H >= size and W >= size, which always holds
    after `resize_shortest_edge(image, size)`.
    """
    height, width = pixels.shape[:2]
    if height < size or width < size:
        raise ValueError(f"center_crop: image of {height}x{width} is smaller than the crop {size}x{size}")
    top = (height - size) // 2
    left = (width - size) // 2
    return pixels[top : top + size, left : left + size]


# ----------------------------------------------------------------------------------------
# The whole pipeline
# ----------------------------------------------------------------------------------------


def preprocess_image(image, *, size=336, pad_to_square=True, mean=CLIP_MEAN, std=CLIP_STD):
    """One image (path, file object or PIL image) -> float32 tensor [3, size, size].

    Source: LLaVA-1.5's `process_images` with image_aspect_ratio="pad" (pad to square with
    fill tuple(int(m * 255) for m in mean) = (122, 116, 104), then CLIPImageProcessor);
    `pad_to_square=False` is the plain CLIPImageProcessor used by the llava-hf checkpoints
    (resize shortest edge, centre-crop -- the sides of a wide image are cut away).
    Output pixel = (v8 / 255 - mean[c]) / std[c], v8 the 8-bit value after resize and crop.
    """
    if size <= 0:
        raise ValueError(f"preprocess_image: size must be positive, got {size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"preprocess_image: mean and std need 3 values each, got {mean} and {std}")
    rgb = load_image(image)
    if pad_to_square:
        rgb = pad_image_to_square(rgb, tuple(int(m * 255) for m in mean))
    rgb = resize_shortest_edge(rgb, size)
    pixels = center_crop(np.asarray(rgb, dtype=np.uint8), size)  # [size, size, 3] uint8
    scaled = pixels.astype(np.float64) / 255.0
    normalised = (scaled - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)
    chw = np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)  # [3, size, size]
    return torch.from_numpy(chw)


def preprocess_images(images, **kwargs):
    """A list of images -> float32 tensor [N, 3, size, size]; keyword arguments as `preprocess_image`."""
    images = list(images)
    if not images:
        raise ValueError("preprocess_images: got an empty list of images")
    return torch.stack([preprocess_image(image, **kwargs) for image in images])
