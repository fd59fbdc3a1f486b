"""Log-probabilities (and entropies) of tokens under a language model's logits.

Every preference method in this project needs `log pi(y | x)`: DPO compares it between
policy and reference, PPO takes ratios of it, CSR uses its mean as a self-reward. The
textbook computation is

    logp[b, t] = log_softmax(logits[b, t])[labels[b, t]]
               = logits[b, t, labels[b, t]] - logsumexp(logits[b, t, :])

The catch is size. LLaVA's vocabulary is 32k; at 2k positions and batch 8 a float32
log-softmax is 8 * 2048 * 32064 * 4 bytes = 2.1 GB, and autograd would keep it alive until
the backward pass. So here:

* the forward pass walks the sequence in chunks (256 positions by default), upcasting one
  chunk at a time to float32 and keeping only the [B, chunk] result;
* the backward pass (a small `torch.autograd.Function`) recomputes the softmax of each
  chunk instead of storing it, using d logp / d logits = one_hot(label) - softmax(logits),
  and writes the gradient straight into a tensor of the logits' own dtype.

Peak extra memory is therefore one float32 chunk, whatever the sequence length.

Conventions (DESIGN.md): the caller has already shifted, so `logits[:, t]` scores
`labels[:, t]`; results are float32 (float64 when the logits are float64), even for bf16
logits; masks are bool or 0/1 float.
"""

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_SIZE = 256


# ----------------------------------------------------------------------------------------
# checks and small helpers


def _result_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 logits stay float64 (for gradcheck); every other float dtype gives float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check_logits(logits: torch.Tensor, where: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{where}: logits must be a [B, T, V] tensor, got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"{where}: logits must be a floating-point tensor, got {logits.dtype}")


def _check_labels(logits: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"{where}: labels must have shape [B, T] = {tuple(logits.shape[:2])} "
            f"(the logits' first two dims), got {shape}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be an integer tensor of token ids, got {labels.dtype}")


def _check_mask(mask: torch.Tensor, shape: torch.Size, where: str) -> torch.Tensor:
    """Return `mask` as bool; accepts bool or 0/1 numbers (any non-zero counts as set)."""
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{where}: mask must have shape {tuple(shape)}, got {got}")
    return mask if mask.dtype == torch.bool else mask != 0


def _check_chunk_size(chunk_size: int, where: str) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be a positive int, got {chunk_size!r}")


# ----------------------------------------------------------------------------------------
# per-token log-probs: chunked forward, recomputing backward


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """logits [B, T, V], labels [B, T] -> log-probs [B, T]; see the module docstring.

    Labels outside [0, V) (for instance the usual ignore id -100) give 0 and no gradient.
    """

    @staticmethod
    def forward(ctx, logits, labels, chunk_size):
        B, T, V = logits.shape
        dtype = _result_dtype(logits)
        valid = (labels >= 0) & (labels < V)  # [B, T]
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))  # gather-safe ids
        out = torch.empty(B, T, dtype=dtype, device=logits.device)
        for start in range(0, T, chunk_size):
            stop = min(start + chunk_size, T)
            chunk = logits[:, start:stop].to(dtype)  # [B, c, V], the only float32 copy
            picked = chunk.gather(-1, safe_labels[:, start:stop, None]).squeeze(-1)  # [B, c]
            out[:, start:stop] = picked - torch.logsumexp(chunk, dim=-1)
        out = out.masked_fill(~valid, 0.0)
        ctx.save_for_backward(logits, safe_labels, valid)  # no copies: inputs only
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, safe_labels, valid = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            dtype = _result_dtype(logits)
            grad_out = grad_out.to(dtype).masked_fill(~valid, 0.0)  # [B, T]
            grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
            T = logits.shape[1]
            for start in range(0, T, ctx.chunk_size):
                stop = min(start + ctx.chunk_size, T)
                g = grad_out[:, start:stop, None]  # [B, c, 1]
                # d logp / d logits = one_hot(label) - softmax(logits)
                grad = torch.softmax(logits[:, start:stop].to(dtype), dim=-1).mul_(-g)  # [B, c, V]
                grad.scatter_add_(-1, safe_labels[:, start:stop, None], g)
                grad_logits[:, start:stop] = grad.to(logits.dtype)
        return grad_logits, None, None


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Log-probability of each label token: `log_softmax(logits)[b, t, labels[b, t]]`.

    Source: the standard token log-likelihood (ANCHORS §4, "Sequence log-prob"); PPO
    (Schulman et al. 2017) uses it per token for the probability ratio and the KL penalty.

    Args:
        logits: [B, T, V], any float dtype; `logits[:, t]` scores `labels[:, t]` (already
            shifted by the caller).
        labels: [B, T] integer token ids. Ids outside [0, V), e.g. the ignore id -100, are
            allowed and give 0 at that position (and no gradient): mask them afterwards.
        chunk_size: positions processed (and upcast) at once.

    Returns:
        [B, T] float32 (float64 if the logits are float64). Differentiable w.r.t. logits;
        the backward pass recomputes each chunk's softmax instead of storing it.
    """
    _check_logits(logits, "token_logprobs")
    _check_labels(logits, labels, "token_logprobs")
    _check_chunk_size(chunk_size, "token_logprobs")
    return _ChunkedTokenLogprobs.apply(logits, labels, chunk_size)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    average: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Log-probability of each sequence's masked tokens: sum (or mean) of token log-probs.

    Source: ANCHORS §4 "Sequence log-prob" -- the quantity DPO (Rafailov et al. 2023,
    eq. 7) compares, summed over response tokens with prompt and padding masked out. CSR and
    RLAIF-V's DPO use the sum; `average=True` divides by the number of response tokens (the
    IPO / length-normalised variant, and RLAIF-V's SFT term).

    Args:
        logits: [B, T, V], any float dtype, already aligned with `labels`.
        labels: [B, T] integer ids; at masked-out positions any id is fine (-100 included).
        mask: [B, T] bool or 0/1 float, set on the tokens to score (the response).
        average: divide by the number of set mask positions per row (a row with none gives 0).
        chunk_size: see `token_logprobs`.

    Returns:
        [B] float32 (float64 for float64 logits), differentiable w.r.t. logits.

    Raises:
        ValueError on bad shapes/dtypes, or when a *masked-in* label is not a valid id
        (that check costs one host-device sync).
    """
    _check_logits(logits, "sequence_logprobs")
    _check_labels(logits, labels, "sequence_logprobs")
    keep = _check_mask(mask, labels.shape, "sequence_logprobs")
    V = logits.shape[-1]
    bad = keep & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        b, t = bad.nonzero()[0].tolist()
        raise ValueError(
            f"sequence_logprobs: mask is set at [{b}, {t}] but the label there is "
            f"{int(labels[b, t])}, not a token id in [0, {V}) -- mask and labels disagree"
        )
    per_token = token_logprobs(logits, labels, chunk_size=chunk_size)  # [B, T]
    total = torch.where(keep, per_token, torch.zeros_like(per_token)).sum(-1)  # [B]
    if average:
        total = total / keep.sum(-1).clamp_min(1).to(total.dtype)
    return total


# ----------------------------------------------------------------------------------------
# per-token entropy, chunked the same way


class _ChunkedTokenEntropy(torch.autograd.Function):
    """logits [B, T, V] -> entropy of softmax(logits) per position, [B, T].

    H = logsumexp(x) - sum_j p_j x_j, and dH/dx_j = -p_j * (log p_j + H).
    """

    @staticmethod
    def forward(ctx, logits, chunk_size):
        B, T, V = logits.shape
        dtype = _result_dtype(logits)
        out = torch.empty(B, T, dtype=dtype, device=logits.device)
        for start in range(0, T, chunk_size):
            stop = min(start + chunk_size, T)
            chunk = logits[:, start:stop].to(dtype)  # [B, c, V]
            p = torch.softmax(chunk, dim=-1)
            out[:, start:stop] = torch.special.entr(p).sum(-1)  # entr(p) = -p log p, entr(0) = 0
        ctx.save_for_backward(logits, out)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, entropy = ctx.saved_tensors
        dtype = _result_dtype(logits)
        grad_out = grad_out.to(dtype)
        grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        T = logits.shape[1]
        for start in range(0, T, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, T)
            logp = torch.log_softmax(logits[:, start:stop].to(dtype), dim=-1)  # [B, c, V]
            h = entropy[:, start:stop, None]  # [B, c, 1]
            p = logp.exp()
            grad = -p * (logp + h) * grad_out[:, start:stop, None]
            grad = grad.masked_fill(p == 0, 0.0)  # tokens with logit -inf: no gradient, not nan
            grad_logits[:, start:stop] = grad.to(logits.dtype)
        return grad_logits, None


def token_entropy(logits: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, in nats.

    Source: Shannon entropy of softmax(logits), the PPO entropy diagnostic/bonus
    (Schulman et al. 2017, eq. 9); computed chunk by chunk like `token_logprobs`.

    Args:
        logits: [B, T, V], any float dtype.
    Returns:
        [B, T] float32 (float64 for float64 logits), differentiable w.r.t. logits.
    """
    _check_logits(logits, "token_entropy")
    _check_chunk_size(chunk_size, "token_entropy")
    return _ChunkedTokenEntropy.apply(logits, chunk_size)
