"""Fact-RLHF reward shaping: length penalty, symbolic rewards and the missing-end penalty.

LLaVA-RLHF (Sun et al., arXiv 2309.14525, Sec. 2.3 and the released `RLHF/models/ppo_trainer.py`)
adds three hand-written terms to the reward model's score of a rollout:

- a length penalty, -10 * response_tokens / max_response_tokens, so that the policy does not
  buy reward with length;
- a symbolic reward for questions with a known answer (A-OKVQA multiple choice and VQA
  yes/no questions), 2 * correct;
- a penalty of -8 for a response that never emits the end token (it ran out of budget).

Coefficients are the released training script's values (`train_rl_model.sh`:
INCOMPLETE_RESPONSE=-8.0, LENGTH_BONUS=-10.0, CORRECT_BONUS=2.0).

Where the ×10 reward scale goes (released code): the sequence score built here
(`shaped_score`) is added, at the last response position, to the per-token KL penalty
-beta * kl_t; the resulting per-token rewards — KL terms included — are multiplied by
`REWARD_SCALE` = 10 at the start of GAE (the released setting `whiten_rewards=False`).
So the scale applies after these penalties and is the PPO code's job, not this file's.
"""

from __future__ import annotations

import torch

__all__ = [
    "REWARD_SCALE",
    "LENGTH_PENALTY_COEF",
    "SYMBOLIC_COEF",
    "MISSING_END_PENALTY",
    "length_penalty",
    "symbolic_reward",
    "missing_end_penalty",
    "shaped_score",
]

REWARD_SCALE = 10.0  # multiplies the per-token shaped rewards (KL included) before GAE
LENGTH_PENALTY_COEF = 10.0
SYMBOLIC_COEF = 2.0
MISSING_END_PENALTY = -8.0


def length_penalty(response_tokens, max_response_tokens: int, *, coef: float = LENGTH_PENALTY_COEF, multiplier=1.0):
    """-coef * multiplier * response_tokens / max_response_tokens (LLaVA-RLHF, as released).

    response_tokens: int, float or tensor [B] — the response's non-padding tokens (the
    release counts the end token too). max_response_tokens: the rollout budget (896 in the
    release). multiplier: the release's per-example "length_bonus" data field (1.0 when
    absent), float or tensor [B]. Returns a float or a float32 tensor [B].
    """
    if max_response_tokens <= 0:
        raise ValueError(f"length_penalty: max_response_tokens must be positive, got {max_response_tokens}")
    if isinstance(response_tokens, torch.Tensor):
        response_tokens = response_tokens.float()
    return -coef * multiplier * response_tokens / max_response_tokens


_KINDS = ("general", "multiple_choice", "yes_no")


def symbolic_reward(response: str, *, kind: str, truth: str | bool | None = None, coef: float = SYMBOLIC_COEF,
                    reward_yes: bool = False) -> float:
    """coef * correct for questions with a known answer (LLaVA-RLHF's released rule).

    kind="general": 0 (no known answer).
    kind="multiple_choice", truth = the right letter, e.g. "B": correct = 1 when the
      stripped response starts with "B." or contains "correct option is B." (with the
      period, as released), else 0.
    kind="yes_no", truth = "yes"/"no" (or True/False): for truth "no", correct = +0.5 when
      the stripped response starts with "No", -0.5 when it starts with "Yes", else 0
      (`startswith`, as released: "Not really" counts as "No"); for truth "yes", 0 — the
      release gives no symbolic reward there. Both halves are multiplied by coef, so with
      the default coef 2 the yes/no reward is +1 / -1.
    reward_yes=True (not in the release): truth "yes" is scored the mirror way, +0.5 for a
      response starting with "Yes" and -0.5 for one starting with "No", so that the rule does
      not only ever push towards "No".
    """
    if kind not in _KINDS:
        raise ValueError(f"symbolic_reward: kind must be one of {_KINDS}, got {kind!r}")
    if kind == "general":
        return 0.0
    text = response.strip()
    if kind == "multiple_choice":
        if not (isinstance(truth, str) and len(truth.strip()) == 1 and truth.strip().isalpha()):
            raise ValueError(f"symbolic_reward: multiple_choice needs truth = one option letter, got {truth!r}")
        letter = truth.strip().upper()
        correct = text.startswith(letter + ".") or f"correct option is {letter}." in response
        return coef * (1.0 if correct else 0.0)
    if isinstance(truth, str) and truth.strip().lower() in ("yes", "no"):
        truth_is_yes = truth.strip().lower() == "yes"
    elif isinstance(truth, bool):
        truth_is_yes = truth
    else:
        raise ValueError(f"symbolic_reward: yes_no needs truth = 'yes' / 'no' or a bool, got {truth!r}")
    if truth_is_yes:
        if not reward_yes:
            return 0.0
        return coef * (0.5 if text.startswith("Yes") else -0.5 if text.startswith("No") else 0.0)
    if text.startswith("No"):
        return coef * 0.5
    if text.startswith("Yes"):
        return coef * -0.5
    return 0.0


def missing_end_penalty(has_end, *, penalty: float = MISSING_END_PENALTY):
    """`penalty` for a response that never emitted the end token, 0 otherwise (LLaVA-RLHF).

    has_end: bool or bool tensor [B]. Returns a float or a float32 tensor [B].
    """
    if isinstance(has_end, torch.Tensor):
        return torch.where(has_end.bool(), 0.0, penalty).float()
    return 0.0 if has_end else penalty


def shaped_score(
    rm_score: torch.Tensor,
    *,
    response_tokens,
    max_response_tokens: int,
    has_end: torch.Tensor,
    symbolic=0.0,
    length_coef: float = LENGTH_PENALTY_COEF,
    length_multiplier=1.0,
    end_penalty: float = MISSING_END_PENALTY,
    relative_end_penalty: bool = True,
    reward_bias: float = 0.0,
) -> torch.Tensor:
    """The sequence-level score of a rollout: reward model + shaping (LLaVA-RLHF, as released).

    score = rm_score + missing_end_penalty(has_end) + length_penalty(...) + symbolic + reward_bias

    rm_score: [B] reward-model scores; response_tokens: [B] (or int) response lengths;
    has_end: bool [B]; symbolic: [B] or float, already multiplied by its coefficient (see
    `symbolic_reward`). With `relative_end_penalty=False` a response without an end token
    gets the score `end_penalty` instead of rm_score + end_penalty (the release's other
    mode; its script uses the relative one). `REWARD_SCALE` is not applied here (see the
    module docstring). Returns float32 [B].
    """
    rm_score = rm_score.float()
    has_end = torch.as_tensor(has_end, dtype=torch.bool, device=rm_score.device)
    if has_end.shape != rm_score.shape:
        raise ValueError(f"shaped_score: has_end {tuple(has_end.shape)} and rm_score {tuple(rm_score.shape)} differ")
    if relative_end_penalty:
        score = rm_score + missing_end_penalty(has_end, penalty=end_penalty)
    else:
        score = torch.where(has_end, rm_score, torch.full_like(rm_score, end_penalty))
    response_tokens = torch.as_tensor(response_tokens, device=rm_score.device)
    score = score + length_penalty(response_tokens, max_response_tokens, coef=length_coef, multiplier=length_multiplier)
    symbolic = torch.as_tensor(symbolic, dtype=torch.float32, device=rm_score.device)
    return score + symbolic + reward_bias
