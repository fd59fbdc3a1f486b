"""Direct Preference Optimization and the variants CSR and RLAIF-V use.

DPO (Rafailov et al. 2023) trains a policy on preference pairs (chosen y_w, rejected y_l)
without a reward model. With sequence log-probs from the policy and a frozen reference,

    h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))

and the loss is -log sigmoid(beta * h) (eq. 7 of the paper). `beta * (log pi - log ref)` is
the *implicit reward* of a response; the loss pushes the chosen one above the rejected one.

All functions take per-sequence log-probs [B] (see `optim.logprobs.sequence_logprobs`): the
caller decides between summed log-probs (CSR, RLAIF-V) and averaged ones (IPO).
"""

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Compute in float32 at least (bf16 log-probs would lose the small differences DPO uses)."""
    return x if x.dtype == torch.float64 else x.float()


def _check_pairs(where: str, **tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if any(s != first for s in shapes.values()) or len(first) != 1:
        raise ValueError(f"{where}: expected log-probs of equal shape [B], got {shapes}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards of both responses.

    With h = (pc - pr) - (rc - rr) (policy/reference, chosen/rejected log-probs):

    * "sigmoid" -- DPO, Rafailov et al. 2023 eq. 7, with conservative-DPO label smoothing
      eps (the preference label is assumed flipped with probability eps; Mitchell 2023):
      -logsigmoid(beta*h) * (1 - eps) - logsigmoid(-beta*h) * eps.
      CSR and RLAIF-V use this with beta = 0.1 and eps = 0 (ANCHORS §1, §2).
    * "hinge"   -- SLiC-style hinge (Zhao et al. 2023): relu(1 - beta*h).
    * "ipo"     -- IPO (Azar et al. 2023, eq. 17): (h - 1/(2*beta))**2; the paper means it
      for *averaged* log-probs (`sequence_logprobs(..., average=True)`).

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] log-probs under the trained policy.
        reference_chosen_logps, reference_rejected_logps: [B] log-probs under the frozen
            reference (no gradient is expected through them, but none is cut here).
        beta: strength of the implicit KL constraint, > 0.
        label_smoothing: eps in [0, 0.5]; only the "sigmoid" loss uses it.
        loss_type: one of DPO_LOSS_TYPES.

    Returns:
        losses [B] (not yet averaged), chosen_rewards [B] = beta*(pc - rc) and
        rejected_rewards [B] = beta*(pr - rr), both detached. float32 (float64 if given).
    """
    _check_pairs(
        "dpo_loss",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; allowed: {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(
            f"dpo_loss: label_smoothing={label_smoothing} only applies to loss_type='sigmoid', "
            f"not {loss_type!r}"
        )

    pc, pr = _as_float(policy_chosen_logps), _as_float(policy_rejected_logps)
    rc, rr = _as_float(reference_chosen_logps), _as_float(reference_rejected_logps)
    h = (pc - pr) - (rc - rr)  # [B], how much more the policy prefers y_w than the reference does

    if loss_type == "sigmoid":
        eps = label_smoothing
        losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # "ipo"
        losses = (h - 1 / (2 * beta)) ** 2

    chosen_rewards = (beta * (pc - rc)).detach()
    rejected_rewards = (beta * (pr - rr)).detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_with_sft_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    policy_chosen_avg_logps: torch.Tensor | None = None,
    w_dpo: float = 1.0,
    w_sft: float = 0.0,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RLAIF-V's training objective: weighted DPO plus an SFT term on the chosen response.

        loss = w_dpo * mean(dpo_losses) - w_sft * mean(policy_chosen_avg_logps)

    Source: RLAIF-V (ANCHORS §2, step 6), defaults w_dpo = 1, w_sft = 0. Following the
    released code's behaviour, the SFT term uses the policy's *per-token-averaged* log-prob
    of the chosen response (`sequence_logprobs(..., average=True)`), while the DPO term uses
    the summed log-probs passed as the first four arguments.

    Args:
        the four [B] log-probs: as in `dpo_loss`.
        policy_chosen_avg_logps: [B] mean token log-prob of the chosen response under the
            policy; required when w_sft != 0.
        w_dpo, w_sft: weights of the two terms.
        beta, label_smoothing, loss_type: passed to `dpo_loss`.

    Returns:
        (loss, a 0-d tensor; chosen_rewards [B]; rejected_rewards [B]), rewards detached.
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
    )
    loss = w_dpo * losses.mean()
    if w_sft != 0.0:
        if policy_chosen_avg_logps is None:
            raise ValueError(f"dpo_with_sft_loss: w_sft={w_sft} needs policy_chosen_avg_logps")
        if policy_chosen_avg_logps.shape != policy_chosen_logps.shape:
            raise ValueError(
                "dpo_with_sft_loss: policy_chosen_avg_logps must have shape "
                f"{tuple(policy_chosen_logps.shape)}, got {tuple(policy_chosen_avg_logps.shape)}"
            )
        loss = loss - w_sft * _as_float(policy_chosen_avg_logps).mean()
    return loss, chosen_rewards, rejected_rewards


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Batch statistics of implicit (DPO) or explicit (reward-model) rewards, for logging.

    Source: the metrics DPO trainers conventionally log (TRL's `rewards/accuracies`,
    `rewards/margins`, ...).

    Args:
        chosen_rewards, rejected_rewards: [B].

    Returns:
        dict of detached 0-d float32 tensors (not Python floats, so a training loop can
        all-reduce them across ranks before calling `.item()`):
        "reward_accuracy": share of pairs with chosen > rejected (ties count as wrong),
        "reward_margin": mean of chosen - rejected,
        "chosen_reward", "rejected_reward": the two means.
    """
    _check_pairs("preference_metrics", chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    chosen = chosen_rewards.detach().float()
    rejected = rejected_rewards.detach().float()
    return {
        "reward_accuracy": (chosen > rejected).float().mean(),
        "reward_margin": (chosen - rejected).mean(),
        "chosen_reward": chosen.mean(),
        "rejected_reward": rejected.mean(),
    }
