"""RLAIF-V's labeler verdicts: from the first answer token's logits to accepted claims and a score.

For every claim the labeler model reads "<image> {question} Please answer yes or no." and
produces one token. RLAIF-V (Yu et al., arXiv 2405.17220, Sec. 3.2) does not sample that
token: it compares the probability mass on "yes"-like tokens with the mass on "no"-like
tokens under the softmax of the first token's logits. A response's score is minus the number
of claims the labeler rejects.

`label_questions` runs the labeler model on all questions about one image in one batched
forward: the shared prompt head (system prompt, image tokens, the start of the user turn) is
encoded once and its key/value cache copied to every question's row; only each question's
own tokens are run per row. The verdict functions below it start from the logits tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lvlm.kv_cache import KVCache
from lvlm.tokenizer import SYSTEM, encode_prompt

__all__ = [
    "answer_token_id",
    "question_logits",
    "label_questions",
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


# ----------------------------------------------------------------------------------------
# The labeler's forward: all questions about one image, the shared head encoded once
# ----------------------------------------------------------------------------------------


def answer_token_id(tokenizer, word: str, *, after: str = "ASSISTANT:") -> int:
    """The token id with which the labeler's answer `word` starts, right after the prompt.

    The prompt ends with "ASSISTANT:" and the answer follows after a space, so the token that
    matters is the first token of " {word}" in that position -- for SentencePiece-style
    tokenizers the word-start form ("\u2581Yes"), not the bare "Yes". Found by encoding
    `after` and `after + " " + word` and taking the first token where they differ. A word that
    the tokenizer maps to its unknown token, or that starts with a bare word-start piece, is
    an error (P(<unk>) or P("\u2581") is not the probability of the word).
    tokenizer: an `lvlm.tokenizer.Tokenizer`.
    """
    base = tokenizer.encode(after, add_bos=False)
    full = tokenizer.encode(after + " " + word, add_bos=False)
    n = 0
    while n < min(len(base), len(full)) and base[n] == full[n]:
        n += 1
    if n >= len(full):
        raise ValueError(f"answer_token_id: {word!r} adds no token after {after!r}")
    token = full[n]
    if tokenizer.unk_id is not None and token == tokenizer.unk_id:
        raise ValueError(f"answer_token_id: {word!r} is not in the tokenizer's vocabulary ({tokenizer.path})")
    if not tokenizer.decode([token]).strip():
        raise ValueError(f"answer_token_id: {word!r} starts with the bare word-start token "
                         f"{tokenizer.raw.id_to_token(token)!r} (no letter of the word); the tokenizer at "
                         f"{tokenizer.path} has no single token for it")
    return token


def _common_prefix_length(rows: list[list[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != first[i] for r in rows):
            return i
    return n


@torch.no_grad()
def question_logits(
    labeler,
    tokenizer,
    pixel_values: torch.Tensor | None,
    questions: Sequence[str],
    *,
    image_tokens_per_image: int,
    max_rows: int = 64,
    system: str = SYSTEM,
) -> torch.Tensor:
    """The labeler's next-token logits [Q, V] after each question's prompt, one image shared by all.

    labeler: an `lvlm.llava.LlavaForConditionalGeneration`; tokenizer: its `lvlm.tokenizer.Tokenizer`.
    pixel_values: [1, 3, H, W], the image (or None for text-only questions). questions: Q
    texts, used as given, each rendered as a vicuna_v1 generation prompt
    `{system} USER: <image>\\n{question} ASSISTANT:`.

    Computation: all prompts are tokenised; their longest common token prefix (system prompt,
    image tokens, "USER:") is prefilled once into row 0 of a KV cache and copied to every row
    (`KVCache.reorder_`); each question's remaining tokens -- at least one per row, so that
    equal prompts still have a row to read -- run right-padded in one `forward_cached` call,
    `max_rows` questions at a time (the rows are reused: only the positions after the shared
    head are rewritten). The result equals running every full prompt alone through the model
    and reading its last position. Returns [Q, V] in the model's dtype, on its device.
    """
    questions = list(questions)
    if pixel_values is not None and (pixel_values.dim() != 4 or pixel_values.shape[0] != 1):
        raise ValueError(f"label_questions: pixel_values must be one image [1, 3, H, W], "
                         f"got {tuple(pixel_values.shape)}")
    if max_rows < 1:
        raise ValueError(f"label_questions: max_rows must be >= 1, got {max_rows}")
    device = next(labeler.parameters()).device
    vocab = labeler.language_model.lm_head.out_features
    if not questions:
        return torch.zeros(0, vocab, device=device)
    num_images = 0 if pixel_values is None else 1
    rows = [
        encode_prompt(tokenizer, q, num_images=num_images, image_tokens_per_image=image_tokens_per_image,
                      system=system)["input_ids"].tolist()
        for q in questions
    ]
    # The shared head; every row keeps at least one token of its own to read the logits at.
    head = min(_common_prefix_length(rows), min(len(r) for r in rows) - 1)
    image_id = labeler.config.image_token_index
    if any(image_id in r[head:] for r in rows):
        raise ValueError("label_questions: image tokens after the shared prompt head; the questions must not "
                         "contain <image> markers (the image goes in front of every question)")
    suffixes = [r[head:] for r in rows]

    dtype = labeler.language_model.lm_head.weight.dtype
    n_rows = min(max_rows, len(questions))
    cache = KVCache.allocate(labeler.config.text_config, n_rows, head + max(len(s) for s in suffixes),
                             dtype=dtype, device=device)
    # Prefill the head into row 0 through a one-row view of the same storage, then copy it to all rows.
    row0 = KVCache(k=cache.k[:, :1], v=cache.v[:, :1], lengths=cache.lengths[:1])
    head_ids = torch.tensor([rows[0][:head]], dtype=torch.long, device=device)
    px = None if pixel_values is None else pixel_values.to(device)
    labeler.prefill(head_ids, torch.tensor([head], device=device), row0, px)
    cache.reorder_(torch.zeros(n_rows, dtype=torch.long, device=device))

    logits = []
    pad = tokenizer.eos_id  # never read: padding sits after each row's real tokens (right padding)
    for start in range(0, len(suffixes), n_rows):
        chunk = suffixes[start : start + n_rows]
        lengths = torch.tensor([len(s) for s in chunk], dtype=torch.long, device=device)
        ids = torch.full((n_rows, int(lengths.max())), pad, dtype=torch.long, device=device)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        cache.lengths.fill_(head)  # every row restarts right after the shared head
        n_new = torch.zeros(n_rows, dtype=torch.long, device=device)
        n_new[: len(chunk)] = lengths
        hidden = labeler.language_model.forward_cached(labeler.embed(ids), cache, n_new=n_new)  # [R, S, D]
        last = hidden[torch.arange(len(chunk), device=device), lengths - 1]  # [r, D]
        logits.append(labeler.language_model.lm_head(last))
    return torch.cat(logits)  # [Q, V]


def label_questions(
    labeler,
    tokenizer,
    pixel_values: torch.Tensor | None,
    questions: Sequence[str],
    *,
    image_tokens_per_image: int,
    yes_words: Sequence[str] = ("yes", "Yes"),
    no_words: Sequence[str] = ("no", "No"),
    max_rows: int = 64,
    system: str = SYSTEM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RLAIF-V's "conquer" step for one image: the labeler's verdict on every question about it.

    Arguments as `question_logits` (questions are used as given: pass
    `rewards.claims.labeler_prompt(q)` to append RLAIF-V's " Please answer yes or no.").
    yes_words / no_words: the answer spellings whose first-token probabilities are summed
    (RLAIF-V: "yes"/"Yes" and "no"/"No"); their ids come from `answer_token_id`.
    The first answer token's logits give p_yes, p_no (`yes_no_probabilities`) and the verdict
    (`claim_accepted`: p_yes > p_no strictly, ties rejected). Source: RLAIF-V (arXiv
    2405.17220, Sec. 3.2), the released labeler's scoring.
    Returns (p_yes [Q] float32, p_no [Q] float32, accepted [Q] bool), on the model's device.
    """
    yes_ids = [answer_token_id(tokenizer, w) for w in yes_words]
    no_ids = [answer_token_id(tokenizer, w) for w in no_words]
    logits = question_logits(labeler, tokenizer, pixel_values, questions, image_tokens_per_image=image_tokens_per_image,
                             max_rows=max_rows, system=system)
    p_yes, p_no = yes_no_probabilities(logits, yes_ids, no_ids)
    return p_yes, p_no, claim_accepted(p_yes, p_no)
