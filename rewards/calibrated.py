"""CSR's calibrated reward: self-generated score plus CLIP image relevance, per sentence.

CSR (Zhou et al., "Calibrating Self-Rewarding Vision Language Models", arXiv 2405.14622,
Sec. 3.1-3.2) scores every candidate sentence s of its sentence-level beam search with

    R(s) = lambda * R_I(s) + (1 - lambda) * R_T(s),    lambda = 0.9      (paper, Eq. 3)

where R_T is the language model's own score of the sentence (the released code: the mean
token log-probability) and R_I = max(100 * cos(CLIP image, CLIP sentence), 0) is computed
elsewhere (`clip_score`). A response's score is the sum of its sentences' rewards; the
highest-scoring response becomes "chosen", the lowest "rejected".

The released code combines the two parts differently: inside each group of sibling
candidates (the children of one beam node) it replaces both raw scores by ranks / n, mixes
the ranks, and averages along the path; lower is better there. `rank_normalized_reward` and
`rank_path_score` give that variant.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

__all__ = [
    "self_score",
    "calibrated_reward",
    "rank_normalized_reward",
    "rank_path_score",
    "response_score",
]


def self_score(token_logprobs: torch.Tensor, mask: torch.Tensor, *, reduce: str = "mean") -> torch.Tensor:
    """R_T per sentence: the model's log-probability of the sentence's own tokens (CSR).

    token_logprobs: [S, T] log-probs of each sentence's tokens given image, prompt and the
    earlier sentences; mask: [S, T], bool or 0/1, True on the sentence's tokens.
    reduce="mean" (the released code's form: sum / number of tokens) or "sum".
    Returns float32 [S]. A sentence with no tokens is an error.
    """
    if token_logprobs.dim() != 2 or token_logprobs.shape != mask.shape:
        raise ValueError(
            f"self_score: token_logprobs {tuple(token_logprobs.shape)} and mask {tuple(mask.shape)} "
            "must both be [S, T]"
        )
    if reduce not in ("mean", "sum"):
        raise ValueError(f"self_score: reduce must be 'mean' or 'sum', got {reduce!r}")
    mask = mask.float()
    total = (token_logprobs.float() * mask).sum(dim=-1)  # [S]
    if reduce == "sum":
        return total
    n_tokens = mask.sum(dim=-1)  # [S]
    if bool((n_tokens == 0).any()):
        empty = torch.nonzero(n_tokens == 0).flatten().tolist()
        raise ValueError(f"self_score: sentences {empty} have no tokens in mask; their mean is undefined")
    return total / n_tokens


def calibrated_reward(clip_scores, self_scores, *, lam: float = 0.9) -> torch.Tensor:
    """R = lam * R_I + (1 - lam) * R_T per sentence (CSR, paper Eq. 3; lam = 0.9 in the paper).

    clip_scores: [S] image relevance R_I; self_scores: [S] self-generated scores R_T.
    Returns float32 [S].
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"calibrated_reward: lam must lie in [0, 1], got {lam}")
    clip_scores = torch.as_tensor(clip_scores, dtype=torch.float32)
    self_scores = torch.as_tensor(self_scores, dtype=torch.float32, device=clip_scores.device)
    if clip_scores.shape != self_scores.shape:
        raise ValueError(
            f"calibrated_reward: clip_scores {tuple(clip_scores.shape)} and self_scores "
            f"{tuple(self_scores.shape)} differ in shape"
        )
    return lam * clip_scores + (1.0 - lam) * self_scores


def _ranks_within_groups(scores: list[float], group_of: list[Hashable]) -> list[float]:
    """rank / n inside each group, the highest score ranked 1/n; ties keep input order."""
    members: dict[Hashable, list[int]] = {}
    for i, group in enumerate(group_of):
        members.setdefault(group, []).append(i)
    ranks = [0.0] * len(scores)
    for indices in members.values():
        ordered = sorted(indices, key=lambda i: scores[i], reverse=True)  # stable
        for position, i in enumerate(ordered):
            ranks[i] = (position + 1) / len(indices)
    return ranks


def rank_normalized_reward(
    clip_scores, self_scores, group_ids: Sequence[Hashable] | torch.Tensor, *, a: float = 0.9
) -> torch.Tensor:
    """The released CSR code's combination: (1 - a) * rank_T + a * rank_I; LOWER is better.

    clip_scores, self_scores: [S] raw scores of S candidate sentences; group_ids: [S], the
    group of sibling candidates each belongs to (candidates proposed from the same beam
    node). Inside a group of n candidates, each raw score is replaced by its rank / n,
    separately for the self score and the CLIP score: the highest score gets 1/n, the
    lowest n/n = 1 (as released: children sorted by score, descending; equal scores keep
    their input order). Returns float32 [S].
    """
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"rank_normalized_reward: a must lie in [0, 1], got {a}")
    clip_list = torch.as_tensor(clip_scores, dtype=torch.float32).flatten().tolist()
    self_list = torch.as_tensor(self_scores, dtype=torch.float32).flatten().tolist()
    groups = group_ids.flatten().tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if not (len(clip_list) == len(self_list) == len(groups)):
        raise ValueError(
            f"rank_normalized_reward: {len(clip_list)} clip scores, {len(self_list)} self scores and "
            f"{len(groups)} group ids; they must match"
        )
    rank_t = _ranks_within_groups(self_list, groups)
    rank_i = _ranks_within_groups(clip_list, groups)
    return torch.tensor([(1.0 - a) * t + a * i for t, i in zip(rank_t, rank_i)], dtype=torch.float32)


def rank_path_score(step_ranks, *, count_root: bool = False) -> torch.Tensor:
    """Average combined rank along one path of the beam tree (released CSR; lower is better).

    step_ranks: [L], the `rank_normalized_reward` of each sentence on the path. The released
    code sums them and divides by the number of nodes on the path including the root
    (prompt) node, i.e. by L + 1: pass count_root=True for that; the default divides by L.
    Returns a float32 scalar tensor.
    """
    step_ranks = torch.as_tensor(step_ranks, dtype=torch.float32).flatten()
    if step_ranks.numel() == 0:
        raise ValueError("rank_path_score: empty path")
    return step_ranks.sum() / (step_ranks.numel() + (1 if count_root else 0))


def response_score(sentence_rewards, mask=None) -> torch.Tensor:
    """A response's score: the sum of its sentences' calibrated rewards (CSR).

    sentence_rewards: [S] for one response, or [B, S] for a batch with mask [B, S] (bool or
    0/1) marking real sentences. Returns a float32 scalar, or [B].
    """
    rewards = torch.as_tensor(sentence_rewards, dtype=torch.float32)
    if mask is not None:
        mask = torch.as_tensor(mask, device=rewards.device)
        if mask.shape != rewards.shape:
            raise ValueError(f"response_score: mask {tuple(mask.shape)} and rewards {tuple(rewards.shape)} differ")
        rewards = rewards * mask.float()
    return rewards.sum(dim=-1)
