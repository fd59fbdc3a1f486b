"""Cached decoding must reproduce the full forward: prefill + token-by-token decode vs. one pass."""

import pytest
import torch

from lvlm.config import preset
from lvlm.kv_cache import KVCache
from lvlm.llava import LlavaForConditionalGeneration


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = preset("tiny-llava")
    model = LlavaForConditionalGeneration(cfg).eval()
    return cfg, model


def _row(cfg, n_text_before, n_images, n_text_after, g):
    V, img = cfg.text_config.vocab_size, cfg.image_token_index
    ids = lambda n: [int(t) for t in torch.randint(4, V, (n,), generator=g)]  # noqa: E731
    return ids(n_text_before) + [img] * (cfg.image_tokens_per_image * n_images) + ids(n_text_after)


def test_prefill_then_decode_matches_full_forward():
    cfg, model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    # Three rows of different lengths: one image, no image, two images.
    rows = [_row(cfg, 3, 1, 5, g), _row(cfg, 7, 0, 2, g), _row(cfg, 2, 2, 4, g)]
    n_images = 3
    size = cfg.vision_config.image_size
    pixels = torch.randn(n_images, 3, size, size, generator=g)
    prompt_len = [len(r) - 4 for r in rows]  # prefill all but the last 4 tokens, then decode them
    T_full = max(len(r) for r in rows)

    padded = torch.zeros(len(rows), T_full, dtype=torch.long)
    for b, r in enumerate(rows):
        padded[b, : len(r)] = torch.tensor(r)
    with torch.no_grad():
        full = model(padded, pixels)  # [B, T, V]

        T_prompt = max(prompt_len)
        prompts = torch.zeros(len(rows), T_prompt, dtype=torch.long)
        for b, r in enumerate(rows):
            prompts[b, : prompt_len[b]] = torch.tensor(r[: prompt_len[b]])
        cache = KVCache.allocate(cfg.text_config, len(rows), 64)
        logits = model.prefill(prompts, torch.tensor(prompt_len), cache, pixels)
        for b in range(len(rows)):
            torch.testing.assert_close(logits[b], full[b, prompt_len[b] - 1], atol=1e-5, rtol=1e-5)
        assert cache.lengths.tolist() == prompt_len
        for step in range(4):
            tokens = torch.tensor([rows[b][prompt_len[b] + step] for b in range(len(rows))])
            logits = model.decode(tokens, cache)
            for b in range(len(rows)):
                torch.testing.assert_close(logits[b], full[b, prompt_len[b] + step], atol=1e-5, rtol=1e-5)
        assert cache.lengths.tolist() == [p + 4 for p in prompt_len]


def test_reorder_forks_rows():
    cfg, model = _tiny_model()
    g = torch.Generator().manual_seed(2)
    row = _row(cfg, 5, 0, 0, g)
    with torch.no_grad():
        one = KVCache.allocate(cfg.text_config, 1, 32)
        model.prefill(torch.tensor([row]), torch.tensor([len(row)]), one)
        many = KVCache.allocate(cfg.text_config, 3, 32)
        many.k[:, :1].copy_(one.k)
        many.v[:, :1].copy_(one.v)
        many.lengths[:1] = one.lengths
        many.reorder_(torch.zeros(3, dtype=torch.long))
        logits = model.decode(torch.tensor([7, 9, 7]), many)
        ref = model(torch.tensor([row + [7], row + [9]]))[:, -1]
    torch.testing.assert_close(logits[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[2], logits[0])


def test_image_token_count_mismatch_is_a_clear_error():
    cfg, model = _tiny_model()
    ids = torch.tensor([[5, 6] + [cfg.image_token_index] * (cfg.image_tokens_per_image - 1)])
    pixels = torch.zeros(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    try:
        model(ids, pixels)
    except ValueError as e:
        assert "image-token positions" in str(e) and "1 image(s)" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_logits_at_returns_the_full_forward_at_those_positions():
    cfg, model = _tiny_model()
    g = torch.Generator().manual_seed(2)
    ids = torch.tensor([_row(cfg, 3, 1, 5, g), _row(cfg, 4, 1, 4, g)])
    size = cfg.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=g)
    at = torch.rand(ids.shape, generator=g) < 0.3
    with torch.no_grad():
        full, picked = model(ids, pixels), model(ids, pixels, logits_at=at)
    assert picked.shape == (int(at.sum()), cfg.text_config.vocab_size)
    torch.testing.assert_close(picked, full[at], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logits_at"):
        model(ids, pixels, logits_at=at.long())


def test_causal_attention_float32_under_bfloat16_autocast():
    """``float32=True`` under autocast: a float32 output equal to float32 attention on the same inputs;
    without it, autocast's bfloat16 attention; outside autocast the flag changes nothing."""
    import torch.nn.functional as F

    from lvlm.llama import causal_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 7, 8, generator=g).bfloat16() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        upcast, plain = causal_attention(q, k, v, True, float32=True), causal_attention(q, k, v, True)
    assert upcast.dtype == torch.float32 and plain.dtype == torch.bfloat16
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(upcast, reference, rtol=1e-5, atol=1e-6)
    qf, kf, vf = q.float(), k.float(), v.float()
    assert torch.equal(causal_attention(qf, kf, vf, True, float32=True), causal_attention(qf, kf, vf, True))


def test_attention_in_float32_sets_every_layer_for_the_block_only():
    from lvlm.llama import Attention, attention_in_float32

    model = LlavaForConditionalGeneration(preset("tiny-llava"))
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert layers and not any(m.float32_attention for m in layers)
    with pytest.raises(RuntimeError, match="inside"):
        with attention_in_float32(model):
            assert all(m.float32_attention for m in layers)
            raise RuntimeError("inside")
    assert not any(m.float32_attention for m in layers)  # reset even when the block raises
    with attention_in_float32(model, False):
        assert not any(m.float32_attention for m in layers)
