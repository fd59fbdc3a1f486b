"""Tests for lvlm/image.py: mode conversion, pad-to-square, resize/crop conventions, the
normalised values of known colours, errors, and (optional) parity with Hugging Face's CLIP processor."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm.image import (
    CLIP_MEAN,
    CLIP_STD,
    center_crop,
    load_image,
    pad_image_to_square,
    preprocess_image,
    preprocess_images,
    resize_shortest_edge,
)

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
PAD = (122, 116, 104)  # int(mean * 255), written out by hand
BICUBIC_TOL = 1.5 / 255 / STD.min()  # 1.5 grey levels, in normalised units


def normalised(rgb):
    """Hand reference: (v / 255 - mean) / std per channel."""
    return (np.asarray(rgb, dtype=np.float64) / 255.0 - MEAN) / STD


def red_blue_image():
    """40 wide x 20 high: left half pure red, right half pure blue."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_constants():
    assert np.allclose(CLIP_MEAN, MEAN) and np.allclose(CLIP_STD, STD)
    assert tuple(int(m * 255) for m in CLIP_MEAN) == PAD


# ---------------------------------------------------------------------------------------- pipeline


def test_padded_pipeline_values():
    out = preprocess_image(red_blue_image(), size=336)
    assert out.shape == (3, 336, 336) and out.dtype == torch.float32
    out = out.numpy()
    # Padded 40 x 40: image rows 10..29; x 8.4 -> image rows 84..251 of 336. Pixels far from edges:
    for row, col in [(0, 0), (5, 330), (330, 5), (335, 335)]:  # pad corners
        assert np.allclose(out[:, row, col], normalised(PAD), atol=BICUBIC_TOL)
    assert np.allclose(out[:, 130, 46], normalised((255, 0, 0)), atol=BICUBIC_TOL)  # red, input (15.5, 5.5)
    assert np.allclose(out[:, 200, 300], normalised((0, 0, 255)), atol=BICUBIC_TOL)  # blue, input (23.8, 35.7)


def test_no_padding_crops_the_sides():
    padded = preprocess_image(red_blue_image(), size=336, pad_to_square=True).numpy()
    cropped = preprocess_image(red_blue_image(), size=336, pad_to_square=False).numpy()
    # 40 x 20 -> 672 x 336 -> columns 168..503 kept = input columns 10..30: no pad anywhere.
    assert np.allclose(cropped[:, 0, 50], normalised((255, 0, 0)), atol=BICUBIC_TOL)
    assert np.allclose(cropped[:, 335, 300], normalised((0, 0, 255)), atol=BICUBIC_TOL)
    assert np.allclose(padded[:, 0, 50], normalised(PAD), atol=BICUBIC_TOL)


def test_exact_values_without_resampling():
    # A square image already at `size` is not resampled: values are exact.
    pixels = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    out = preprocess_image(Image.fromarray(pixels), size=8).numpy()
    assert np.allclose(out, normalised(pixels).transpose(2, 0, 1), atol=1e-6)


def test_pad_is_centred_floor_offset():
    image = Image.new("RGB", (5, 2), (255, 255, 255))
    square = np.asarray(pad_image_to_square(image, PAD))
    assert square.shape == (5, 5, 3)
    rows_white = [r for r in range(5) if (square[r] == 255).all()]
    assert rows_white == [1, 2]  # offset (5 - 2) // 2 = 1; the extra pad row at the bottom
    tall = np.asarray(pad_image_to_square(Image.new("RGB", (2, 5), (255, 255, 255)), PAD))
    assert [c for c in range(5) if (tall[:, c] == 255).all()] == [1, 2]
    assert tuple(tall[0, 0]) == PAD


def test_resize_truncates_long_edge():
    assert resize_shortest_edge(Image.new("RGB", (31, 20)), 7).size == (10, 7)  # 10.85 -> 10
    assert resize_shortest_edge(Image.new("RGB", (20, 31)), 7).size == (7, 10)
    assert resize_shortest_edge(Image.new("RGB", (20, 20)), 7).size == (7, 7)


def test_center_crop_floor_rule():
    columns = np.tile(np.arange(21, dtype=np.uint8)[None, :, None], (10, 1, 3))  # value = column index
    crop = center_crop(columns, 10)
    assert crop[0, 0, 0] == 5 and crop[0, -1, 0] == 14  # left = (21 - 10) // 2 = 5
    # through the whole pipeline (no resampling since the short edge is already 10)
    out = preprocess_image(Image.fromarray(columns), size=10, pad_to_square=False).numpy()
    assert np.allclose(out[:, 0, 0], normalised((5, 5, 5)), atol=1e-6)


def test_batch_shape_and_paths(tmp_path):
    path = tmp_path / "rb.png"
    red_blue_image().save(path)
    batch = preprocess_images([path, str(path), red_blue_image()], size=28)
    assert batch.shape == (3, 3, 28, 28)
    assert torch.equal(batch[0], batch[2]) and torch.equal(batch[1], batch[2])
    with pytest.raises(ValueError, match="empty"):
        preprocess_images([])


# ---------------------------------------------------------------------------------------- modes


def solid(mode, value, size=(3, 2)):
    return Image.new(mode, size, value)


def array_image(values):
    return Image.fromarray(np.full((2, 3), values[0], dtype=values[1]))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: solid("RGB", (10, 20, 30)), (10, 20, 30)),
        (lambda: solid("L", 77), (77, 77, 77)),
        (lambda: solid("1", 1), (255, 255, 255)),
        (lambda: solid("1", 0), (0, 0, 0)),
        (lambda: solid("CMYK", (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: solid("CMYK", (0, 0, 0, 255)), (0, 0, 0)),
        (lambda: solid("RGBA", (10, 20, 30, 255)), (10, 20, 30)),  # opaque: unchanged
        (lambda: solid("RGBA", (10, 20, 30, 0)), (255, 255, 255)),  # transparent: white
        (lambda: solid("RGBA", (0, 0, 0, 51)), (204, 204, 204)),  # 20% black over white
        (lambda: solid("LA", (100, 255)), (100, 100, 100)),
        (lambda: solid("LA", (100, 0)), (255, 255, 255)),
        (lambda: array_image((25700, np.uint16)), (100, 100, 100)),  # I;16: 25700 / 257
        (lambda: array_image((65535, np.uint16)), (255, 255, 255)),
        (lambda: array_image((25700, np.int32)), (100, 100, 100)),  # I: read as 16-bit samples
        (lambda: array_image((-5, np.int32)), (0, 0, 0)),
        (lambda: array_image((0.4, np.float32)), (102, 102, 102)),  # F in 0..1: 0.4 * 255
        (lambda: array_image((200.0, np.float32)), (200, 200, 200)),  # F in 0..255
    ],
)
def test_modes_become_rgb(make, expected):
    image = make()
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert np.abs(np.asarray(rgb, dtype=int) - np.array(expected)).max() <= 1, image.mode


def test_high_depth_modes_are_what_the_test_thinks():
    assert array_image((1, np.uint16)).mode == "I;16"
    assert array_image((1, np.int32)).mode == "I"
    assert array_image((1.0, np.float32)).mode == "F"


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (3 * 254))
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0  # palette index 0 (red) is transparent
    for source in [image, _saved(image, tmp_path / "p.png")]:
        rgb = np.asarray(load_image(source))
        assert tuple(rgb[0, 0]) == (0, 255, 0)  # opaque green
        assert tuple(rgb[1, 3]) == (255, 255, 255)  # transparent -> white


def test_16_bit_png_file(tmp_path):
    image = Image.fromarray(np.full((2, 2), 51400, dtype=np.uint16))  # 51400 / 257 = 200
    rgb = load_image(_saved(image, tmp_path / "deep.png"))
    assert np.asarray(rgb).tolist() == [[[200] * 3] * 2] * 2


def _saved(image, path):
    image.save(path)
    return path


# ---------------------------------------------------------------------------------------- errors


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ValueError, match=r"cannot read image .*notes\.png: "):
        load_image(path)
    with pytest.raises(ValueError, match="cannot read image"):
        preprocess_image(str(path))
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(io.BytesIO(b"garbage"))


def test_truncated_file(tmp_path):
    buffer = io.BytesIO()
    red_blue_image().save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.png"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        load_image(tmp_path / "missing.jpg")


# ---------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("pad", [False, True])
def test_parity_with_transformers_clip_processor(pad):
    """Hugging Face's PIL-backed CLIPImageProcessor (the llava-hf preprocessing); with pad=True
    the image is first padded by hand as LLaVA's expand2square does."""
    clip_module = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    processor = clip_module.CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, size=(45, 71, 3), dtype=np.uint8))
    reference_input = image
    if pad:
        square = Image.new("RGB", (71, 71), PAD)
        square.paste(image, (0, (71 - 45) // 2))
        reference_input = square
    reference = processor(reference_input, return_tensors="np")["pixel_values"][0]
    ours = preprocess_image(image, size=336, pad_to_square=pad).numpy()
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < 1e-5
