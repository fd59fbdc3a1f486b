"""lvlm/clip.py: the written-out attention for short sequences against PyTorch's fused kernel."""

import pytest
import torch
import torch.nn.functional as F

from lvlm.clip import SHORT_SEQUENCE, attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [1, 15, SHORT_SEQUENCE, SHORT_SEQUENCE + 9])
def test_attention_matches_the_fused_kernel_with_its_gradients(causal, T):
    torch.manual_seed(T)
    q, k, v = (torch.randn(3, 2, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ours = attention(q, k, v, causal)
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(ours, fused, rtol=0, atol=1e-12)
    weights = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((fused * weights).sum(), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_causal_attention_ignores_later_positions():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 6, 4) for _ in range(3))
    changed_v = v.clone()
    changed_v[..., 4:, :] += 10.0  # positions 4 and 5 change
    a, b = attention(q, k, v, causal=True), attention(q, k, changed_v, causal=True)
    assert torch.equal(a[..., :4, :], b[..., :4, :])
    assert not torch.allclose(a[..., 4:, :], b[..., 4:, :])


@pytest.mark.parametrize("eos", ["first end token", "highest id (OpenAI's files)"])
def test_text_length_groups_give_the_same_features_and_gradients(eos):
    """Rows of different lengths, run in groups cut after their pooled positions, give the features
    (and gradients) of the whole padded batch: the causal tower never looks past a row's end."""
    import dataclasses

    from lvlm.clip import CLIPModel
    from lvlm.config import preset

    config = preset("tiny-clip")
    end = 2 if eos.startswith("highest") else 3
    config = dataclasses.replace(config, text_config=dataclasses.replace(config.text_config, eos_token_id=end))
    torch.manual_seed(0)
    model = CLIPModel(config).double()
    vocab = config.text_config.vocab_size
    g = torch.Generator().manual_seed(1)
    rows = []
    for length in [3, 9, 5, 12, 4, 7, 12, 6, 2]:  # tokens before the end token
        ids = torch.randint(4, vocab - 1, (length,), generator=g).tolist()
        end_id = vocab - 1 if end == 2 else 3
        rows.append(ids + [end_id] + [end_id if end == 3 else 0] * (12 - length))  # right-padded to 13
    ids = torch.tensor(rows)
    whole = model.encode_text(ids)
    grouped = model.encode_text(ids, length_groups=3)
    torch.testing.assert_close(grouped, whole, rtol=0, atol=1e-12)
    weights = torch.randn_like(whole)
    params = [p for p in model.text_model.parameters()]
    expected = torch.autograd.grad((whole * weights).sum(), params, allow_unused=True)
    got = torch.autograd.grad((grouped * weights).sum(), params, allow_unused=True)
    for a, b in zip(got, expected):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
