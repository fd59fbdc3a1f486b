"""Bradley-Terry loss for training a reward model on preference pairs (LLaVA-RLHF stage 2).

The Bradley-Terry model says P(chosen preferred) = sigmoid(r_chosen - r_rejected); the
reward model is fitted by maximum likelihood, i.e. binary cross-entropy on the score
difference with target 1 (Ouyang et al. 2022, eq. 1). LLaVA-RLHF adds a small penalty on
the mean score so rewards stay centred near 0 (the loss alone only fixes differences).
"""

import torch
import torch.nn.functional as F


def _check_scores(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, where: str) -> None:
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(
            f"{where}: chosen_scores and rejected_scores must both be [B], got "
            f"{tuple(chosen_scores.shape)} and {tuple(rejected_scores.shape)}"
        )


def reward_model_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, center_coef: float = 0.0
) -> torch.Tensor:
    """Bradley-Terry reward-model loss with LLaVA-RLHF's centering term.

        loss = mean_b BCEWithLogits(r_chosen[b] - r_rejected[b], target=1)
               + center_coef * |mean_b (r_chosen[b] + r_rejected[b])|

    BCEWithLogits(d, 1) = -log sigmoid(d) = log(1 + exp(-d)).

    Source: ANCHORS §3 (LLaVA-RLHF's released reward-model loss; center_coef = 1e-3 there).

    Args:
        chosen_scores, rejected_scores: [B] scalar rewards of the preferred / other response.
        center_coef: weight of the centering term (0 disables it).

    Returns:
        0-d tensor, float32 (float64 if the scores are float64).
    """
    _check_scores(chosen_scores, rejected_scores, "reward_model_loss")
    if center_coef < 0:
        raise ValueError(f"reward_model_loss: center_coef must be >= 0, got {center_coef}")
    dtype = torch.float64 if chosen_scores.dtype == torch.float64 else torch.float32
    chosen, rejected = chosen_scores.to(dtype), rejected_scores.to(dtype)
    diff = chosen - rejected  # [B]
    loss = F.binary_cross_entropy_with_logits(diff, torch.ones_like(diff))  # mean over B
    if center_coef:
        loss = loss + center_coef * (chosen + rejected).mean().abs()
    return loss


def reward_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Share of pairs the reward model ranks correctly (chosen strictly above rejected).

    Source: the reward-model accuracy LLaVA-RLHF reports (65-70% held out is normal, ANCHORS §3).

    Args:
        chosen_scores, rejected_scores: [B].
    Returns:
        detached 0-d float32 tensor in [0, 1]; ties count as wrong.
    """
    _check_scores(chosen_scores, rejected_scores, "reward_accuracy")
    return (chosen_scores.detach() > rejected_scores.detach()).float().mean()
