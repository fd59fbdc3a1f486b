"""RLAIF-V preference pairs: from scored responses to a length-balanced DPO dataset.

RLAIF-V (Yu et al., arXiv 2405.17220, Sec. 3.2 and the released `utils/get_preference_pairs.py`
and `utils/get_pairs_filter_shorten.py`) samples n responses per instruction, scores each with
S = -(rejected claims) (`rewards/labeler.py`), and builds pairs:

1. every pair of responses whose scores differ by at least 1; the higher score is chosen;
2. pairs where either response had a claim the labeler did not judge are dropped (the
   judged-claim count differs from the claim count);
3. at most 2 pairs per instruction are kept, drawn at random;
4. over the whole dataset, pairs whose rejected response is much longer than the chosen one
   are dropped, with the threshold picked so that chosen and rejected responses have the
   closest mean length (so DPO does not just learn "shorter is better").

Input, one dict per instruction::

    {"idx": 17, "question": "Describe the image.", "image": "images/17.png",
     # optional: "image_path" (default: image), "ds_name", "origin_dataset", "origin_split"
     "responses": [{"text": "...", "score": -1, "n_claims": 4, "n_judged": 4}, ...]}

Output records carry the RLAIF-V-Dataset field names (`ds_name`, `image`, `image_path`,
`question`, `chosen`, `rejected`, `origin_dataset`, `origin_split`, `idx`) plus
`chosen_score` and `rejected_score`.
"""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Mapping, Sequence

__all__ = [
    "LENGTH_THRESHOLDS",
    "word_count",
    "candidate_pairs",
    "build_preference_pairs",
    "length_balance",
]

# r in {0, 0.02, ..., 0.98}, kept as exact fractions so that a ratio equal to a threshold
# compares as equal (0.2 == 10/50), not as 0.2000000001.
LENGTH_THRESHOLDS = tuple(Fraction(k, 50) for k in range(50))

DEFAULT_DS_NAME = "RLAIF-V"


def word_count(text: str) -> int:
    """Words of a response, split on whitespace (the released length filter's count)."""
    return len(text.split())


def _response_field(response: Mapping, key: str, where: str):
    if key not in response:
        raise ValueError(f"{where}: response has no {key!r} field (has {sorted(response)})")
    return response[key]


def candidate_pairs(
    responses: Sequence[Mapping], *, min_score_gap: float = 1, where: str = "responses"
) -> list[tuple[int, int]]:
    """All (chosen, rejected) index pairs of one instruction's responses (RLAIF-V steps 1-2).

    responses: dicts with "text", "score", "n_claims", "n_judged".
    Pairs are enumerated as i < j in list order; a pair is kept when
    |score_i - score_j| >= min_score_gap, the higher score being chosen, and both responses
    had every claim judged (n_judged == n_claims). Pairs of identical texts (after
    stripping) are skipped: they carry no preference (the release drops them in its length
    filter).
    """
    scores, complete, texts = [], [], []
    for i, response in enumerate(responses):
        w = f"{where}[{i}]"
        scores.append(_response_field(response, "score", w))
        complete.append(_response_field(response, "n_judged", w) == _response_field(response, "n_claims", w))
        texts.append(_response_field(response, "text", w).strip())
    pairs = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if abs(scores[i] - scores[j]) < min_score_gap:
                continue
            if not (complete[i] and complete[j]) or texts[i] == texts[j]:
                continue
            pairs.append((i, j) if scores[i] > scores[j] else (j, i))
    return pairs


def build_preference_pairs(
    instructions: Sequence[Mapping],
    *,
    seed: int = 0,
    max_pairs_per_instruction: int = 2,
    min_score_gap: float = 1,
    balance_lengths: bool = True,
) -> list[dict]:
    """RLAIF-V's pair construction over a dataset (steps 1-4 of the module docstring).

    Order of operations (so a seed reproduces the same dataset):
      1. one `random.Random(seed)` is created for the whole call;
      2. instructions are visited in input order; for each, `candidate_pairs` lists its
         pairs (i < j order, filters applied);
      3. if it has more than `max_pairs_per_instruction` pairs, `rng.sample(pairs, k)` picks
         k of them (in the order `sample` returns); otherwise all are kept in i < j order
         and the RNG is not touched;
      4. records are made in that order, then `length_balance` filters the whole list.

    Returns the list of records (see the module docstring).
    """
    if max_pairs_per_instruction < 1:
        raise ValueError(f"max_pairs_per_instruction must be >= 1, got {max_pairs_per_instruction}")
    rng = random.Random(seed)
    records = []
    for n, instruction in enumerate(instructions):
        where = f"instruction {n}"
        for key in ("idx", "question", "image", "responses"):
            if key not in instruction:
                raise ValueError(f"{where}: missing field {key!r} (has {sorted(instruction)})")
        responses = instruction["responses"]
        pairs = candidate_pairs(responses, min_score_gap=min_score_gap, where=f"{where} responses")
        if len(pairs) > max_pairs_per_instruction:
            pairs = rng.sample(pairs, max_pairs_per_instruction)
        for chosen, rejected in pairs:
            records.append(
                {
                    "ds_name": instruction.get("ds_name", DEFAULT_DS_NAME),
                    "image": instruction["image"],
                    "image_path": instruction.get("image_path", instruction["image"]),
                    "question": instruction["question"],
                    "chosen": responses[chosen]["text"],
                    "rejected": responses[rejected]["text"],
                    "origin_dataset": instruction.get("origin_dataset", ""),
                    "origin_split": instruction.get("origin_split", ""),
                    "idx": instruction["idx"],
                    "chosen_score": responses[chosen]["score"],
                    "rejected_score": responses[rejected]["score"],
                }
            )
    if balance_lengths:
        records, _ = length_balance(records)
    return records


def _longer_rejected_ratio(record: Mapping) -> Fraction:
    """(len_rejected - len_chosen) / len_rejected in words; 0 when the rejected text is empty."""
    chosen, rejected = word_count(record["chosen"]), word_count(record["rejected"])
    return Fraction(rejected - chosen, rejected) if rejected else Fraction(0)


def length_balance(
    records: Sequence[Mapping],
    *,
    thresholds: Sequence[Fraction | float] = LENGTH_THRESHOLDS,
    relative: bool = False,
) -> tuple[list, Fraction | float | None]:
    """RLAIF-V's length balancing: drop pairs whose rejected answer is much longer.

    For each threshold r, the kept set is the pairs with
    (len_rejected - len_chosen) / len_rejected <= r (word counts; a larger r keeps more).
    The r whose kept set has the smallest gap |mean chosen length - mean rejected length|
    wins; thresholds that keep nothing are skipped. Ties go to the larger r, which keeps
    the most data. (The released script takes the first minimum, i.e. the smaller r, and
    measures the gap relative to the mean rejected length: `relative=True` uses that gap.)
    Gaps are compared exactly (rational arithmetic), so ties are real ties.

    records: dicts with "chosen" and "rejected" texts. Returns (kept records in input
    order, chosen r); r is None when `records` is empty.
    """
    if not records:
        return [], None
    ratios = [_longer_rejected_ratio(r) for r in records]
    best = None  # (gap, r as given, kept records, r as a fraction)
    for r in thresholds:
        r_exact = r if isinstance(r, Fraction) else Fraction(str(r))  # 0.2 -> 1/5 exactly
        kept = [rec for rec, ratio in zip(records, ratios) if ratio <= r_exact]
        if not kept:
            continue
        chosen_words = sum(word_count(rec["chosen"]) for rec in kept)
        rejected_words = sum(word_count(rec["rejected"]) for rec in kept)
        if relative:
            if rejected_words == 0:
                continue  # relative gap undefined
            gap = Fraction(abs(chosen_words - rejected_words), rejected_words)
        else:
            gap = Fraction(abs(chosen_words - rejected_words), len(kept))
        if best is None or gap < best[0] or (gap == best[0] and r_exact > best[3]):
            best = (gap, r, kept, r_exact)
    if best is None:
        return [], None
    return list(best[2]), best[1]
