"""Training with a shared prefix (the system prompt run once per batch) must equal the plain forward:
states, logits, the SFT loss and every gradient."""

import torch

from lvlm.config import preset
from lvlm.llava import LlavaForConditionalGeneration, shared_prefix_length
from recipes.sft import sft_loss


def _model():
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(preset("tiny-llava")).double()


def _batch(cfg, prefix_len=6, g=None):
    """Rows = the same ``prefix_len`` text tokens, one image, then text of different lengths (right-padded
    with 0); three rows."""
    g = g or torch.Generator().manual_seed(1)
    V, img, per_image = cfg.text_config.vocab_size, cfg.image_token_index, cfg.image_tokens_per_image
    prefix = torch.randint(4, V, (prefix_len,), generator=g).tolist()
    rows = [prefix + [img] * per_image + torch.randint(4, V, (n,), generator=g).tolist() for n in (7, 3, 5)]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
    size = cfg.vision_config.image_size
    return ids, torch.randn(len(rows), 3, size, size, generator=g, dtype=torch.float64)


def _grads(model, value):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(value, params, allow_unused=True)


def _assert_same_grads(a, b):
    for x, y in zip(a, b):
        if y is None:
            assert x is None or not x.any()
        else:
            # RMSNorm computes in float32 even for float64 input: gradients agree to float32's precision.
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_shared_prefix_length_stops_at_the_first_difference_or_image_token():
    assert shared_prefix_length(torch.tensor([[1, 2, 3, 9, 5], [1, 2, 3, 9, 6]]), image_token_id=9) == 3
    assert shared_prefix_length(torch.tensor([[1, 2, 3], [1, 2, 4]]), image_token_id=9) == 2
    assert shared_prefix_length(torch.tensor([[0, 2], [1, 2]]), image_token_id=9) == 0
    assert shared_prefix_length(torch.tensor([[1, 2], [1, 2]]), image_token_id=9) == 2


def test_decoder_states_and_gradients_match_the_plain_forward():
    model = _model()
    lm = model.language_model
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(4, 11, lm.config.hidden_size, generator=g, dtype=torch.float64)
    embeds[:, :5] = embeds[:1, :5]  # the first 5 positions shared
    weights = torch.randn(4, 11, lm.config.hidden_size, generator=g, dtype=torch.float64)
    plain = lm.hidden_states(embeds)
    shared = lm.hidden_states(embeds, shared_prefix=5)
    torch.testing.assert_close(shared, plain, rtol=1e-10, atol=1e-12)
    expected = _grads(lm, (plain * weights).sum())
    _assert_same_grads(_grads(lm, (shared * weights).sum()), expected)
    lm.gradient_checkpointing = True  # the checkpointed path gives the same too
    lm.train()
    _assert_same_grads(_grads(lm, (lm.hidden_states(embeds, shared_prefix=5) * weights).sum()), expected)


def test_llava_logits_and_sft_loss_match_with_the_prefix_shared():
    model = _model()
    cfg = model.config
    ids, pixels = _batch(cfg)
    assert shared_prefix_length(ids, cfg.image_token_index) == 6
    torch.testing.assert_close(model(ids, pixels, share_prefix=True), model(ids, pixels), rtol=1e-10, atol=1e-12)

    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 6 + cfg.image_tokens_per_image + 1:] = ids[:, 6 + cfg.image_tokens_per_image + 1:] != 0
    batch = {"input_ids": ids, "assistant_mask": mask, "pixel_values": pixels}
    plain, _ = sft_loss(model, batch)
    shared, metrics = sft_loss(model, batch, share_prefix=True)
    torch.testing.assert_close(shared, plain, rtol=1e-12, atol=1e-12)
    assert metrics["tokens"] == mask[:, 1:].sum()
    _assert_same_grads(_grads(model, shared), _grads(model, plain))


def test_no_shared_prefix_falls_back_to_the_plain_forward():
    model = _model()
    ids, pixels = _batch(model.config, prefix_len=0)  # rows start with the image: nothing to share
    assert shared_prefix_length(ids, model.config.image_token_index) == 0
    torch.testing.assert_close(model(ids, pixels, share_prefix=True), model(ids, pixels), rtol=0, atol=0)


def test_shared_prefix_under_bfloat16_autocast_matches_the_plain_forward():
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(preset("tiny-llava"))  # float32 weights, as the world trains them
    ids, pixels = _batch(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, shared = model(ids, pixels.float()), model(ids, pixels.float(), share_prefix=True)
    assert shared.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(shared.float(), plain.float(), rtol=0.05, atol=0.05)


def test_fsdp2_with_the_prefix_shared_matches_one_process_without(tmp_path):
    """torchrun x2 (Gloo, CPU) with FSDP2 (each decoder layer sharded) and the shared prefix, against one
    process training plainly: the same weights after three steps."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from _shared_prefix_script import run

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "tests" / "_shared_prefix_script.py"), str(tmp_path / "fsdp"), "fsdp", "share"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run(str(tmp_path / "one"), fsdp=False, share=False)
    shared = torch.load(tmp_path / "fsdp" / "final.pt", weights_only=True)
    plain = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    start = _model().float().state_dict()
    assert max((plain[k] - start[k]).abs().max() for k in plain) > 1e-3  # training moved the weights
    for k in plain:
        torch.testing.assert_close(shared[k], plain[k], rtol=0, atol=1e-5, msg=k)
