"""CSR's CLIP score R_I = max(100 * cos, 0) on a tiny random CLIP, against features computed separately."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers

from lvlm.clip import CLIPModel
from lvlm.config import preset
from rewards.clip_score import clip_score, clip_text_ids
from tiny_tokenizer import tiny_tokenizer

EOS, PAD, BOS, MAX_LEN = 127, 0, 1, 16  # tiny-clip's end, pad and start ids and its context
TEXTS = ["a red circle", "there is a blue square at the top left", "", "green star ."]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return CLIPModel(preset("tiny-clip")).eval()


@pytest.fixture(scope="module")
def ids():
    return clip_text_ids(tiny_tokenizer(), TEXTS, max_length=MAX_LEN, eos_id=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def reference_cos(clip, pixel_values, input_ids):
    """Cosine of features from separate encode_image / encode_text calls, one pair at a time."""
    with torch.no_grad():
        return torch.stack([
            F.cosine_similarity(clip.encode_image(px[None]), clip.encode_text(t[None]), dim=-1)[0]
            for px, t in zip(pixel_values, input_ids)
        ])


def test_matches_separate_features_and_clamps_negatives(clip, ids, images):
    pixels = images[[0, 1, 2, 0]]
    cos = reference_cos(clip, pixels, ids)
    torch.testing.assert_close(clip_score(clip, pixels, ids), (100 * cos).clamp(min=0), atol=1e-4, rtol=1e-5)

    flipped = copy.deepcopy(clip)  # negating the image projection negates every cosine
    with torch.no_grad():
        flipped.visual_projection.weight.neg_()
    torch.testing.assert_close(reference_cos(flipped, pixels, ids), -cos, atol=1e-6, rtol=1e-5)
    a, b = clip_score(clip, pixels, ids), clip_score(flipped, pixels, ids)
    assert bool(((a == 0) | (b == 0)).all())  # one of each pair is clamped
    assert bool((cos < 0).any()) and bool((b > 0).any())  # negative cosines occur and are clamped
    torch.testing.assert_close(a + b, 100 * cos.abs(), atol=1e-4, rtol=1e-5)
    assert clip_score(clip, pixels, ids).dtype == torch.float32


def test_one_image_broadcasts_and_image_index_maps(clip, ids, images):
    broadcast = clip_score(clip, images[1:2], ids)
    torch.testing.assert_close(broadcast, clip_score(clip, images[[1, 1, 1, 1]], ids))

    calls = []
    encode_image = clip.encode_image

    def counting_encode_image(pixel_values):
        calls.append(pixel_values.shape[0])
        return encode_image(pixel_values)

    clip.encode_image = counting_encode_image
    try:
        index = torch.tensor([2, 0, 2, 1])
        got = clip_score(clip, images, ids, image_index=index)
    finally:
        del clip.encode_image
    assert calls == [3]  # each of the 3 images encoded once, in one call
    torch.testing.assert_close(got, clip_score(clip, images[index], ids))


def test_bad_shapes(clip, ids, images):
    with pytest.raises(ValueError, match="3 images for 4 texts"):
        clip_score(clip, images, ids)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        clip_score(clip, images, ids, image_index=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="2 entries for 4 texts"):
        clip_score(clip, images, ids, image_index=[0, 1])


def test_text_ids_truncate_and_keep_the_end_token():
    tok = tiny_tokenizer()
    long_text = "there is a red circle at the top left and a blue square"
    words = tok.encode(long_text, add_bos=False)
    assert len(words) == 13
    ids = clip_text_ids(tok, [long_text, "", "red"], max_length=6, eos_id=EOS, pad_id=PAD)
    assert ids.tolist() == [
        [BOS] + words[:4] + [EOS],
        [BOS, EOS, PAD, PAD, PAD, PAD],  # an empty text: start + end only
        [BOS, tok.token_id("red"), EOS, PAD, PAD, PAD],
    ]
    no_bos = clip_text_ids(tok, [long_text], max_length=6, eos_id=EOS, pad_id=PAD, bos=False)
    assert no_bos.tolist() == [words[:5] + [EOS]]
    given = clip_text_ids(tok, ["red"], max_length=6, eos_id=EOS, pad_id=PAD, bos=9)
    assert given.tolist() == [[9, tok.token_id("red"), EOS]]
    with pytest.raises(ValueError, match="no room"):
        clip_text_ids(tok, ["red"], max_length=1, eos_id=EOS, pad_id=PAD)


def test_text_ids_from_a_raw_clip_style_tokenizer():
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "cat": 3}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    ids = clip_text_ids(raw, ["a cat", "cat"], max_length=77, eos_id=1, pad_id=1)
    assert ids.tolist() == [[0, 2, 3, 1], [0, 3, 1, 1]]


def test_openai_pooling_rule_with_end_token_as_padding(clip, images):
    """eos_token_id == 2 (OpenAI files) pools at the row's highest id; padding with the end token is harmless."""
    legacy_config = copy.deepcopy(clip.config)
    legacy_config.text_config = dataclasses.replace(legacy_config.text_config, eos_token_id=2)
    legacy = CLIPModel(legacy_config).eval()
    legacy.load_state_dict(clip.state_dict())
    tok = tiny_tokenizer()
    padded_with_end = clip_text_ids(tok, TEXTS, max_length=MAX_LEN, eos_id=EOS, pad_id=EOS)
    padded_with_zero = clip_text_ids(tok, TEXTS, max_length=MAX_LEN, eos_id=EOS, pad_id=PAD)
    torch.testing.assert_close(clip_score(legacy, images[:1], padded_with_end),
                               clip_score(clip, images[:1], padded_with_zero), atol=1e-5, rtol=1e-5)
