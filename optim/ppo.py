"""The pieces of PPO for language models, as pure functions of tensors.

One PPO step in RLHF (Ziegler et al. 2019; Ouyang et al. 2022; LLaVA-RLHF, ANCHORS §3):

1. roll out responses, record their token log-probs under the policy (`logprobs`), under
   the frozen SFT model (`ref_logprobs`) and the value head's estimates (`values`);
2. score each response with the reward model, and turn the score into per-token rewards
   with a KL penalty to the SFT model:                              `kl_estimate`, `shape_rewards`
3. estimate advantages and returns:                                  `gae`, `whiten`
4. for a few epochs over the rollout, minimise the clipped losses:   `ppo_policy_loss`,
                                                                     `ppo_value_loss`

Shapes: [B, T] over the *response* tokens; `mask` [B, T] (bool or 0/1 float) marks the
positions that are part of the response; positions after a response ends are masked out.
"""

import torch

from optim.logprobs import token_entropy

KL_KINDS = ("k1", "k2", "k3", "k1_clamped")


# ----------------------------------------------------------------------------------------
# helpers


def _check_same_shape(where: str, **tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: expected tensors of the same shape, got {shapes}")


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    """Masks are bool or 0/1 float; any non-zero value counts as set."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is set.

    Masked-out values never reach the result, not even as NaN or inf (they are replaced by
    0 before summing, so their gradient is 0 too). Where no position is set the result is 0.

    Args:
        x: any shape, float.
        mask: same shape, bool or 0/1 float.
        dim: reduce over this dim only; None reduces over everything (0-d result).
    """
    _check_same_shape("masked_mean", x=x, mask=mask)
    keep = _as_bool(mask)
    total = torch.where(keep, x, torch.zeros_like(x))
    count = keep.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp_min(1)
    return total.sum(dim) / count.sum(dim).clamp_min(1)


# ----------------------------------------------------------------------------------------
# 2. rewards with a KL penalty


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    With lr = logp - logp_ref (Schulman, "Approximating KL divergence", 2020):
      "k1" = lr                       unbiased, can be negative;
      "k2" = lr**2 / 2                biased, low variance, >= 0;
      "k3" = exp(-lr) - 1 + lr        unbiased, >= 0;
      "k1_clamped" = max(lr, 0)       LLaVA-RLHF's released PPO penalty (ANCHORS §3).
    Example: logp = -1, ref = -2 -> k1 = 1, k2 = 0.5, k3 = e^-1 = 0.367879.

    Args:
        logprobs, ref_logprobs: same shape (typically [B, T]).
    Returns:
        elementwise estimate, same shape and dtype.
    """
    _check_same_shape("kl_estimate", logprobs=logprobs, ref_logprobs=ref_logprobs)
    lr = logprobs - ref_logprobs
    if kind == "k1":
        return lr
    if kind == "k2":
        return 0.5 * lr**2
    if kind == "k3":
        return torch.expm1(-lr) + lr  # exp(-lr) - 1 + lr, accurate near lr = 0
    if kind == "k1_clamped":
        return lr.clamp_min(0)
    raise ValueError(f"kl_estimate: unknown kind {kind!r}; allowed: {', '.join(KL_KINDS)}")


def shape_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: a KL penalty on every response token, the score on the last one.

        kl[b, t]      = kl_estimate(logprobs, ref_logprobs, kl_kind)[b, t] * mask[b, t]
        rewards[b, t] = -kl_coef * kl[b, t]  (+ score[b] at t = last valid position of row b)

    Source: Ziegler et al. 2019 eq. 2 / Ouyang et al. 2022 eq. 2 (the per-token form the
    common PPO trainers use); LLaVA-RLHF uses kl_coef = 0.1 with kl_kind = "k1_clamped".
    Any extra shaping of the score (length penalty, symbolic reward, x10 scaling) is the
    caller's business: pass the final scalar as `score`.

    Args:
        score: [B] scalar reward per response.
        logprobs, ref_logprobs: [B, T] token log-probs of the response under policy/reference.
        mask: [B, T] bool or 0/1 float, set on response tokens; every row needs at least one.
        kl_coef: weight of the penalty (a float, e.g. a KL controller's `.value`).
        kl_kind: see `kl_estimate`.

    Returns:
        (rewards [B, T], kl [B, T]), both 0 at masked positions except as stated, detached
        (rewards are data for GAE, not part of any graph).
    """
    _check_same_shape("shape_rewards", logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if logprobs.dim() != 2 or score.shape != logprobs.shape[:1]:
        raise ValueError(
            f"shape_rewards: expected score [B] and logprobs [B, T], got {tuple(score.shape)} "
            f"and {tuple(logprobs.shape)}"
        )
    keep = _as_bool(mask)
    if not bool(keep.any(dim=1).all()):  # one host sync, once per rollout
        empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"shape_rewards: rows {empty} have no response token to put the score on")
    with torch.no_grad():
        kl = kl_estimate(logprobs, ref_logprobs, kl_kind)
        kl = torch.where(keep, kl, torch.zeros_like(kl))
        rewards = -kl_coef * kl
        T = keep.shape[1]
        positions = torch.arange(T, device=keep.device).expand_as(keep)  # [B, T]
        last = torch.where(keep, positions, -1).max(dim=1).values  # [B] last set position
        rewards[torch.arange(len(last), device=last.device), last] += score.to(rewards.dtype)
    return rewards, kl


# ----------------------------------------------------------------------------------------
# 3. advantages


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eqs. 11-16), per row.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last step = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V

    Example: r = [0, 0, 1], V = [.5, .5, .5], gamma = lam = 1 -> A = [.5, .5, .5],
    returns = [1, 1, 1]; with lam = 0.95 -> A = [.45125, .475, .5].

    Positions with mask 0 are taken to be past the end of the response: their rewards and
    values count as 0 (whatever is stored there), and advantages and returns there are 0.
    (Masked positions *before* the response are also harmless: the recursion only looks
    forward and their outputs are zeroed; a gap in the middle of a response is not
    supported.) LLaVA-RLHF uses gamma = lam = 1.

    Args:
        rewards, values: [B, T] float.
        mask: [B, T] bool or 0/1 float.
    Returns:
        (advantages [B, T], returns [B, T]), computed under no_grad: they are regression
        and policy-gradient targets, never differentiated through.
    """
    _check_same_shape("gae", rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"gae: expected [B, T] tensors, got {tuple(rewards.shape)}")
    keep = _as_bool(mask)
    with torch.no_grad():
        zeros = torch.zeros_like(rewards)
        r = torch.where(keep, rewards, zeros)
        v = torch.where(keep, values.to(rewards.dtype), zeros)
        T = rewards.shape[1]
        advantages = torch.zeros_like(r)
        next_value = torch.zeros_like(r[:, 0])  # [B], V_{t+1}
        next_advantage = torch.zeros_like(r[:, 0])  # [B], A_{t+1}
        for t in reversed(range(T)):
            delta = r[:, t] + gamma * next_value - v[:, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = v[:, t]
            advantages[:, t] = next_advantage
        advantages = torch.where(keep, advantages, zeros)
        returns = torch.where(keep, advantages + v, zeros)
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """Normalise `x` to mean 0 and variance 1 over the valid positions.

        out = (x - mean) / sqrt(var + 1e-8)        (then + mean again if not shift_mean)

    mean and var are taken over all positions where mask is set (the whole batch at once, as
    LLaVA-RLHF whitens advantages). var is the *unbiased* (Bessel-corrected) variance,
    sum((x - mean)**2) / (n - 1), as TRL computes it. With shift_mean=False the mean is
    added back, so only the scale changes (TRL's option, used for rewards). Positions with
    mask 0 come out as 0.

    Args:
        x: any shape, float. mask: same shape, bool or 0/1 float; needs >= 2 set positions.
    """
    _check_same_shape("whiten", x=x, mask=mask)
    keep = _as_bool(mask)
    n = int(keep.sum())  # one host sync, once per rollout
    if n < 2:
        raise ValueError(f"whiten: needs at least 2 valid positions for the variance, got {n}")
    mean = masked_mean(x, keep)
    centred = torch.where(keep, x - mean, torch.zeros_like(x))
    var = (centred**2).sum() / (n - 1)
    out = centred * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(keep, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------
# 4. clipped losses


def _policy_terms(logprobs, old_logprobs, advantages, mask, clip_eps, where):
    """The two surrogate terms per token, [B, T] each, plus the bool mask."""
    _check_same_shape(where, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if not 0 < clip_eps < 1:
        raise ValueError(f"{where}: clip_eps must be in (0, 1), got {clip_eps}")
    keep = _as_bool(mask)
    # Zero the log-ratio (ratio 1) and the advantage at masked positions before exp, so that
    # garbage there cannot overflow into inf/NaN values or gradients.
    log_ratio = torch.where(keep, logprobs - old_logprobs, torch.zeros_like(logprobs))
    adv = torch.where(keep, advantages, torch.zeros_like(advantages))
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    return unclipped, clipped, keep


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """PPO's clipped surrogate objective, as a loss (Schulman et al. 2017, eq. 7).

        rho  = exp(logp - logp_old)
        loss = masked_mean( max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)) )

    The mean is over all valid tokens of the batch. LLaVA-RLHF: clip_eps = 0.2.

    Args:
        logprobs: [B, T] current policy's token log-probs (with grad).
        old_logprobs: [B, T] log-probs at rollout time. advantages: [B, T] (no grad).
        mask: [B, T] bool or 0/1 float.
    Returns:
        0-d loss. `ppo_policy_stats` gives the matching clip fraction and approximate KL.
    """
    unclipped, clipped, keep = _policy_terms(logprobs, old_logprobs, advantages, mask, clip_eps, "ppo_policy_loss")
    return masked_mean(torch.maximum(unclipped, clipped), keep)


@torch.no_grad()
def ppo_policy_stats(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
) -> dict:
    """Diagnostics for `ppo_policy_loss` (same arguments), as detached 0-d tensors.

    "clip_fraction": share of valid tokens where the clipped term is the larger one (their
        gradient is cut), as in the common PPO trainers;
    "approx_kl": masked mean of k3 = rho - 1 - log rho, an estimate of KL(pi_old || pi)
        from the rollout's samples (Schulman 2020); 0 when nothing moved.
    """
    unclipped, clipped, keep = _policy_terms(logprobs, old_logprobs, advantages, mask, clip_eps, "ppo_policy_stats")
    return {
        "clip_fraction": masked_mean((clipped > unclipped).to(unclipped.dtype), keep),
        "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), keep),
    }


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss (the PPO2 baselines form; ANCHORS §4).

        v_clip = clip(v, v_old - eps, v_old + eps)
        loss   = 0.5 * masked_mean( max((v - R)**2, (v_clip - R)**2) )

    LLaVA-RLHF: clip_eps = 0.2 and a value-loss coefficient of 0.1 applied by the caller.

    Args:
        values: [B, T] current value estimates (with grad). old_values: [B, T] at rollout.
        returns: [B, T] targets from `gae`. mask: [B, T] bool or 0/1 float.
    Returns:
        0-d loss (the 0.5 factor included).
    """
    _check_same_shape("ppo_value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    if not clip_eps > 0:
        raise ValueError(f"ppo_value_loss: clip_eps must be > 0, got {clip_eps}")
    keep = _as_bool(mask)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    loss = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(loss, keep)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the policy's next-token distribution over valid positions.

    Source: PPO's entropy term (Schulman et al. 2017, eq. 9), logged or used as a bonus.
    Computed chunk by chunk over the sequence (`optim.logprobs.token_entropy`), so no full
    float32 softmax of [B, T, V] is ever held.

    Args:
        logits: [B, T, V] any float dtype. mask: [B, T] bool or 0/1 float.
    Returns:
        0-d float32 tensor (float64 for float64 logits). Uniform logits over V give log V.
    """
    if logits.dim() != 3 or mask.shape != logits.shape[:2]:
        raise ValueError(
            f"masked_entropy: expected logits [B, T, V] and mask [B, T], got "
            f"{tuple(logits.shape)} and {tuple(mask.shape)}"
        )
    return masked_mean(token_entropy(logits), mask)
