"""Tests for optim/logprobs.py against an explicit log_softmax and hand-worked values."""

import math

import pytest
import torch

from optim.logprobs import sequence_logprobs, token_entropy, token_logprobs


def reference_token_logprobs(logits, labels):
    """Independent reference: full float64 log_softmax, then gather (labels must be valid)."""
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def random_case(B=3, T=7, V=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[:, 0] = True  # every row has at least one token
    return logits, labels, mask


def test_hand_computed_vocab_two():
    # p = softmax([0, log 3]) = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # [1, 2, 2]
    labels = torch.tensor([[1, 0]])
    tok = token_logprobs(logits, labels)
    assert torch.allclose(tok, torch.tensor([[math.log(0.75), math.log(0.25)]]), atol=1e-6)
    mask = torch.tensor([[True, True]])
    assert torch.allclose(sequence_logprobs(logits, labels, mask), torch.tensor([math.log(3 / 16)]), atol=1e-6)
    avg = sequence_logprobs(logits, labels, mask, average=True)
    assert torch.allclose(avg, torch.tensor([math.log(3 / 16) / 2]), atol=1e-6)
    only_first = sequence_logprobs(logits, labels, torch.tensor([[1.0, 0.0]]))  # 0/1 float mask
    assert torch.allclose(only_first, torch.tensor([math.log(0.75)]), atol=1e-6)


def test_matches_explicit_log_softmax():
    logits, labels, mask = random_case()
    ref_tok = reference_token_logprobs(logits, labels)
    expected_sum = (ref_tok * mask).sum(-1)
    expected_avg = expected_sum / mask.sum(-1)
    got = sequence_logprobs(logits, labels, mask)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert torch.allclose(got.double(), expected_sum, atol=1e-5)
    assert torch.allclose(sequence_logprobs(logits, labels, mask, average=True).double(), expected_avg, atol=1e-5)
    assert torch.allclose(token_logprobs(logits, labels).double(), ref_tok, atol=1e-5)


def test_bf16_input_gives_float32_output():
    logits, labels, mask = random_case(dtype=torch.bfloat16)
    got = sequence_logprobs(logits, labels, mask)
    assert got.dtype == torch.float32
    assert token_logprobs(logits, labels).dtype == torch.float32
    # reference from the very same bf16 values, in float64
    expected = (reference_token_logprobs(logits, labels) * mask).sum(-1)
    assert torch.allclose(got.double(), expected, atol=1e-4)


def test_float64_stays_float64():
    logits, labels, mask = random_case(dtype=torch.float64)
    assert sequence_logprobs(logits, labels, mask).dtype == torch.float64


def test_masked_positions_change_nothing():
    logits, labels, mask = random_case(seed=1)
    before = sequence_logprobs(logits, labels, mask)
    logits2, labels2 = logits.clone(), labels.clone()
    logits2[~mask] = 100 * torch.randn_like(logits2[~mask])
    labels2[~mask] = -100
    labels2[0, ~mask[0]] = 10_000  # out of vocabulary is fine too where masked
    after = sequence_logprobs(logits2, labels2, mask)
    assert torch.equal(before, after)


def test_ignore_labels_at_masked_positions():
    logits, labels, mask = random_case(seed=2)
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    got = sequence_logprobs(logits, labels, mask)
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    expected = (reference_token_logprobs(logits, safe) * mask).sum(-1)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    # per-token variant: invalid ids give 0
    tok = token_logprobs(logits, labels)
    assert torch.all(tok[~mask] == 0)


def test_ignore_label_where_mask_is_set_is_an_error():
    logits, labels, mask = random_case()
    labels[1, 0] = -100  # mask[:, 0] is set
    with pytest.raises(ValueError, match=r"\[1, 0\]"):
        sequence_logprobs(logits, labels, mask)


def test_chunk_size_smaller_than_sequence_gives_same_values_and_grads():
    logits, labels, mask = random_case(T=9, seed=3)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    out_a = sequence_logprobs(a, labels, mask, chunk_size=2)  # chunks of 2, 2, 2, 2, 1
    out_b = sequence_logprobs(b, labels, mask, chunk_size=256)
    assert torch.allclose(out_a, out_b, atol=1e-6)
    weights = torch.tensor([1.0, -2.0, 0.5])
    (out_a * weights).sum().backward()
    (out_b * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_gradient_matches_autograd_through_log_softmax():
    logits, labels, mask = random_case(seed=4)
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    x = logits.double().requires_grad_(True)
    weights = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    (sequence_logprobs(x, labels, mask, chunk_size=3) * weights).sum().backward()

    y = logits.double().requires_grad_(True)
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    ref = (torch.log_softmax(y, -1).gather(-1, safe[..., None]).squeeze(-1) * mask).sum(-1)
    (ref * weights).sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-10)


def test_gradcheck_token_logprobs_and_entropy():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 5), generator=g)
    labels[0, 3] = -100
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels, chunk_size=2), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, chunk_size=2), (logits,))


def test_bf16_gradient_has_logits_dtype():
    logits, labels, mask = random_case(seed=6, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    sequence_logprobs(x, labels, mask).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    y = logits.double().requires_grad_(True)
    (torch.log_softmax(y, -1).gather(-1, labels[..., None]).squeeze(-1) * mask).sum().backward()
    assert torch.allclose(x.grad.double(), y.grad, atol=1e-2)


def test_token_entropy_matches_reference():
    logits, _, _ = random_case(seed=7)
    p = torch.softmax(logits.double(), -1)
    expected = -(p * p.log()).sum(-1)
    got = token_entropy(logits, chunk_size=3)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-5)
    # a -inf logit (a banned token) contributes nothing and no NaN
    x = logits.clone()
    x[..., 0] = -float("inf")
    x.requires_grad_(True)
    h = token_entropy(x)
    h.sum().backward()
    q = torch.softmax(logits[..., 1:].double(), -1)
    assert torch.allclose(h.detach().double(), -(q * q.log()).sum(-1), atol=1e-5)
    assert torch.isfinite(x.grad).all()


def test_bad_inputs_raise_value_error():
    logits, labels, mask = random_case()
    with pytest.raises(ValueError, match="logits"):
        sequence_logprobs(logits[0], labels, mask)
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(logits, labels[:, :-1], mask)
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs(logits, labels, mask[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, labels, chunk_size=0)


def test_autograd_saves_no_float32_copy_of_the_logits():
    # The point of the chunked custom backward: for bf16 logits [B, T, V], nothing of size
    # B*T*V is kept for the backward pass except the logits themselves (plain autograd through
    # log_softmax would keep a float32 [B, T, V] tensor).
    logits, labels, mask = random_case(B=2, T=8, V=50, dtype=torch.bfloat16)
    logits.requires_grad_(True)
    saved = []

    def pack(x):
        saved.append((x.dtype, x.numel()))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = sequence_logprobs(logits, labels, mask, chunk_size=3)
    big = [(dtype, n) for dtype, n in saved if n >= logits.numel() // 3]  # a chunk or more
    assert big == [(torch.bfloat16, logits.numel())]
    out.sum().backward()
    assert logits.grad.shape == logits.shape
