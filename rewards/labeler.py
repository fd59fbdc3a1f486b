"""RLAIF-V's labeler verdicts: from the first answer token's logits to accepted claims and a score.

For every claim the labeler model reads "<image> {question} Please answer yes or no." and
produces one token. RLAIF-V (Yu et al., arXiv 2405.17220, Sec. 3.2) does not sample that
token: it compares the probability mass on "yes"-like tokens with the mass on "no"-like
tokens under the softmax of the first token's logits. A response's score is minus the number
of claims the labeler rejects.

The model forward that produces the logits lives with the model code; this file starts from
the logits tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "yes_no_probabilities",
    "claim_accepted",
    "rejected_per_response",
    "response_score",
]


def _token_ids(ids: Sequence[int], vocab_size: int, name: str) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError(f"yes_no_probabilities: {name} is empty; give at least one token id")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"yes_no_probabilities: {name} {bad} outside the vocabulary [0, {vocab_size})")
    return sorted(set(ids))  # a token listed twice (e.g. "yes" == "Yes" after lower-casing) counts once


def yes_no_probabilities(
    logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """P(yes-like) and P(no-like) of the first answer token (RLAIF-V, as released).

    logits: [N, V], the next-token logits at the position right after each question.
    yes_ids: token ids of the "yes" spellings (the release uses "yes" and "Yes");
    no_ids: token ids of the "no" spellings ("no", "No"). Repeated ids count once; an id
    in both lists is an error.

    The softmax is taken over the full vocabulary in float32, then
    p_yes = sum of P(id) over yes_ids and p_no = sum over no_ids.
    Returns (p_yes [N], p_no [N]), float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"yes_no_probabilities: logits must be [N, V], got shape {tuple(logits.shape)}")
    vocab_size = logits.shape[1]
    yes = _token_ids(yes_ids, vocab_size, "yes_ids")
    no = _token_ids(no_ids, vocab_size, "no_ids")
    both = set(yes) & set(no)
    if both:
        raise ValueError(f"yes_no_probabilities: token ids {sorted(both)} are in both yes_ids and no_ids")
    probs = torch.softmax(logits.float(), dim=-1)  # [N, V]
    p_yes = probs[:, yes].sum(dim=-1)  # [N]
    p_no = probs[:, no].sum(dim=-1)  # [N]
    return p_yes, p_no


def claim_accepted(p_yes: torch.Tensor, p_no: torch.Tensor) -> torch.Tensor:
    """A claim is accepted only when p_yes > p_no strictly; a tie rejects it (RLAIF-V).

    p_yes, p_no: [N]. Returns a bool tensor [N].
    """
    if p_yes.shape != p_no.shape:
        raise ValueError(f"claim_accepted: p_yes {tuple(p_yes.shape)} and p_no {tuple(p_no.shape)} differ in shape")
    return p_yes > p_no


def rejected_per_response(
    accepted: torch.Tensor, response_ids: torch.Tensor, n_responses: int
) -> torch.Tensor:
    """Number of rejected claims of each response.

    accepted: bool [N], one entry per claim (from `claim_accepted`); response_ids: long [N],
    the response each claim came from, in [0, n_responses). Returns long [n_responses]
    (a response with no claims has 0 rejected).
    """
    if accepted.shape != response_ids.shape or accepted.dim() != 1:
        raise ValueError(
            f"rejected_per_response: accepted {tuple(accepted.shape)} and response_ids "
            f"{tuple(response_ids.shape)} must be the same 1-D shape"
        )
    if response_ids.numel() and (response_ids.min() < 0 or response_ids.max() >= n_responses):
        raise ValueError(f"rejected_per_response: response_ids must lie in [0, {n_responses})")
    rejected = (~accepted.bool()).long()  # [N]
    counts = torch.zeros(n_responses, dtype=torch.long, device=accepted.device)
    return counts.index_add_(0, response_ids.long(), rejected)


def response_score(n_rejected):
    """RLAIF-V's response score S = -(number of rejected claims). Int or tensor in, same out."""
    return -n_rejected
