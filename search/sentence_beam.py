"""CSR's sentence-level beam search (Zhou et al. 2024, arXiv 2405.14622, Sec. 3.2; ANCHORS §1).

A response is grown one *sentence* at a time. Per prompt, starting from the prompt alone:

    every live beam proposes C candidate sentences     (sampled, or CSR's released "diverse" groups)
    a candidate ends at a sentence delimiter, at end-of-sequence, or after max_sentence_tokens
    candidates whose text is shorter than min_chars characters are dropped
    every candidate gets a score from score_fn          (one call per depth, all candidates batched)
    cumulative score = parent's cumulative + candidate's score
    of all new nodes of the prompt, keep the top k and the bottom k by cumulative score
    kept nodes ended by end-of-sequence, or at the sentence / total-token cap, become responses;
    the others are the next depth's beams

until no beam is left. The calibrated reward of the paper is one choice of ``score_fn`` (see
``rewards.calibrated``); the default is the released code's self-score, the mean token log-prob.

Cost: the candidates of all beams of all prompts decode together in one batch (``search.engine``).
A candidate's cache row already holds its whole path, so the surviving nodes keep their rows
(``Decoder.reorder``) and the next sentence starts from logits that are already computed: no prefix is
ever re-encoded. ``reuse_cache=False`` instead re-encodes image + prompt + path for every beam at every
depth, as the released code does; it exists to measure that cost and to test that both agree.

Rules this implementation fixes (the paper leaves them open):

- Selection (``select_top_bottom``): nodes sorted by cumulative score, descending; ties keep
  proposal order (beam order, then candidate index). With more than k_top + k_bottom nodes, the
  first k_top and the last k_bottom are kept (disjoint); with fewer, all are kept, each once.
  Paper: k_top = k_bottom = k. The released code keeps top 1 + bottom 2 (``k=1, k_bottom=2``);
  "5 beams x 5 candidates" is ``k=3, k_bottom=2, n_candidates=5``.
- Finished nodes: a node whose sentence ended with end-of-sequence competes in the selection like
  any other; if kept it becomes a response (finish reason "eos") and does not continue.
  A kept node that reaches ``max_sentences`` sentences or ``max_total_tokens`` tokens becomes a
  response with finish reason "length".
- A candidate that is *only* end-of-sequence (its text is shorter than min_chars and it ended with
  end-of-sequence) is no sentence, but it says its beam may end here: the beam's path becomes a
  response ("eos") with that candidate's tokens appended unscored, at most once per beam, without
  taking part in the selection (the beam was already selected). Without this rule a path could only
  end by a cap, since a model usually emits end-of-sequence right after a delimiter.
- A prompt all of whose first-sentence candidates are dropped ends with no response.
- Seeds: prompt p has a seed (``mix_seeds(seed, p)`` from a base seed, or given per prompt);
  candidate c of the beam with path (c_1, ..., c_d) samples with ``mix_seeds(prompt_seed, c_1, ...,
  c_d, c)``: what a candidate is depends on its prompt's seed and its path, not on where it sits in
  the batch or which other prompts share the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .engine import Decoder, as_prompt
from .sampling_ops import mix_seeds


def default_decode_fn(ids: Sequence[int]) -> str:
    """Token ids as text when there is no tokenizer: the ids joined by spaces."""
    return " ".join(str(int(i)) for i in ids)


@dataclass
class Candidates:
    """All candidate sentences of one depth of the search, across prompts: what ``score_fn`` sees.

    Lists of length N (one entry per candidate). ``group`` identifies the sibling group (candidates of
    one parent beam), unique within the call: the released code's rank normalisation ranks inside it.
    ``image_index`` is the position in ``pixel_values`` of the first image of the candidate's prompt
    (-1 when it has none); ``pixel_values`` holds the images of every prompt of the call, in order.
    """

    token_ids: list[list[int]]
    logprobs: list[torch.Tensor]  # each [len(token_ids[i])] float32, the model's own log-probs
    texts: list[str]
    prompt_index: list[int]
    parent: list[int]  # index of the parent among its prompt's live beams at this depth
    group: list[int]
    image_index: list[int]
    prefix_token_ids: list[list[int]]  # the parent's path: the sentences before this one
    depth: int  # 0 for first sentences
    pixel_values: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.token_ids)


def mean_logprob_score(candidates: Candidates) -> torch.Tensor:
    """The released CSR code's self-generated score R_T: mean token log-prob of each sentence, [N]."""
    return torch.stack([lp.float().mean() for lp in candidates.logprobs]) if len(candidates) else torch.zeros(0)


@dataclass
class Sentence:
    text: str
    token_ids: list[int]  # the stopping token (delimiter / end-of-sequence) included
    logprobs: torch.Tensor  # [len(token_ids)] float32
    score: float
    finish_reason: str  # "delimiter" | "eos" | "length" (per-sentence token cap)


@dataclass
class Response:
    """A finished path: its sentences, their scores, and the response as one token sequence."""

    prompt_index: int
    sentences: list[Sentence]
    score: float  # cumulative: the sum of the sentences' scores
    tokens: list[int]  # every generated token, in order (a trailing end-of-sequence included)
    logprobs: torch.Tensor  # [len(tokens)] float32
    text: str
    finish_reason: str  # "eos" | "length"
    path: tuple[int, ...]  # candidate index chosen at each depth


@dataclass
class _Beam:
    prompt_index: int
    path: tuple[int, ...] = ()
    sentences: list[Sentence] = field(default_factory=list)
    score: float = 0.0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)

    def child(self, c: int, sentence: Sentence) -> "_Beam":
        return _Beam(self.prompt_index, self.path + (c,), self.sentences + [sentence], self.score + sentence.score,
                     self.tokens + sentence.token_ids, self.logprobs + [sentence.logprobs])


def select_top_bottom(scores: Sequence[float], k_top: int, k_bottom: int) -> list[int]:
    """Indices of the nodes kept at one depth: the k_top highest and k_bottom lowest ``scores`` (CSR).

    Sorted by score, descending, ties in input order (a stable sort). When there are no more than
    k_top + k_bottom nodes, all are kept. Returns indices in that sorted order.
    """
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if len(order) <= k_top + k_bottom:
        return order
    return order[:k_top] + order[len(order) - k_bottom:]


def chosen_and_rejected(responses: Sequence[Response]) -> tuple[Response, Response] | None:
    """CSR's preference pair for one prompt: the highest and the lowest cumulative score.

    Ties: the earliest of the best and the latest of the worst. None when there are fewer than two
    responses (no pair can be formed).
    """
    if len(responses) < 2:
        return None
    order = sorted(range(len(responses)), key=lambda i: -responses[i].score)
    return responses[order[0]], responses[order[-1]]


def sentence_beam_search(
    model,
    prompts: Sequence,
    *,
    delimiter_ids: Sequence[int],
    n_candidates: int = 5,
    k: int = 2,
    k_bottom: int | None = None,
    max_sentence_tokens: int = 70,
    max_sentences: int | None = None,
    max_total_tokens: int = 512,
    proposal: str = "sample",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    diversity_penalty: float = 3.0,
    score_fn: Callable[[Candidates], torch.Tensor] | None = None,
    decode_fn: Callable[[Sequence[int]], str] | None = None,
    min_chars: int = 4,
    stop_ids: Sequence[int] | None = None,
    seed: int | Sequence[int] = 0,
    reuse_cache: bool = True,
    use_cuda_graph: bool = True,
    sync_every: int = 8,
) -> list[list[Response]]:
    """Run CSR's sentence-level beam search for every prompt (independent searches, one batch).

    prompts: token ids or ``(input_ids, pixel_values or None)`` each (see ``engine.as_prompt``).
    delimiter_ids: token ids that end a sentence ("." and friends). n_candidates: C, candidates per
    beam. k, k_bottom: nodes kept per depth (k_bottom defaults to k: the paper). proposal: "sample"
    (temperature / top_k / top_p, per-candidate seeds) or "diverse" (the released code: C greedy groups
    with Hamming ``diversity_penalty``). score_fn: ``Candidates -> [N]`` scores (default: mean token
    log-prob). decode_fn: ids -> text (default: ids joined by spaces). stop_ids: end-of-sequence ids
    (default: the config's). seed: a base seed, or one seed per prompt (see the module docstring).
    Returns, per prompt, its finished ``Response``s in the order they ended.
    """
    if proposal not in ("sample", "diverse"):
        raise ValueError(f"sentence_beam_search: proposal must be 'sample' or 'diverse', got {proposal!r}")
    k_bottom = k if k_bottom is None else k_bottom
    if n_candidates < 1 or k < 0 or k_bottom < 0 or k + k_bottom < 1:
        raise ValueError(f"sentence_beam_search: need n_candidates >= 1 and k + k_bottom >= 1, got "
                         f"n_candidates={n_candidates}, k={k}, k_bottom={k_bottom}")
    if max_sentence_tokens < 1 or max_total_tokens < 1 or (max_sentences is not None and max_sentences < 1):
        raise ValueError("sentence_beam_search: max_sentence_tokens, max_total_tokens and max_sentences must be >= 1")
    score_fn = score_fn or mean_logprob_score
    decode_fn = decode_fn or default_decode_fn
    items = [as_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    if not items:
        return []
    P, C = len(items), n_candidates
    if isinstance(seed, int):
        prompt_seeds = [mix_seeds(seed, p) for p in range(P)]
    elif len(seed) == P:
        prompt_seeds = [int(s) for s in seed]
    else:
        raise ValueError(f"sentence_beam_search: seed must be an int or one int per prompt ({P}), got {len(seed)}")
    eos_ids = set([model.config.text_config.eos_token_id] if stop_ids is None else [int(i) for i in stop_ids])
    images = [px for _, px in items if px is not None]
    pixel_values = torch.cat(images) if images else None
    first_image, n_images = [], 0
    for _, px in items:
        first_image.append(n_images if px is not None else -1)
        n_images += 0 if px is None else px.shape[0]

    decode_kwargs = dict(temperature=temperature if proposal == "sample" else 0.0, top_k=top_k, top_p=top_p,
                         delimiter_ids=list(delimiter_ids),
                         diverse_groups=C if proposal == "diverse" else 0, diversity_penalty=diversity_penalty)
    longest = max(len(ids) for ids, _ in items)
    decoder = None
    if reuse_cache:
        decoder = Decoder(model, max_rows=P * (k + k_bottom) * C, max_seq=longest + max_total_tokens + 1,
                          max_new_tokens=max_sentence_tokens, eos_ids=sorted(eos_ids),
                          use_cuda_graph=use_cuda_graph, sync_every=sync_every)
        decoder.prefill(items)  # row p holds prompt p: the root beam of each search

    beams = [_Beam(p) for p in range(P)]  # beam i lives in decoder row i
    responses: list[list[Response]] = [[] for _ in range(P)]

    def finish(beam: _Beam, reason: str, extra_tokens=(), extra_logprobs=None) -> None:
        tokens = beam.tokens + list(extra_tokens)
        logprobs = torch.cat(beam.logprobs + ([extra_logprobs] if extra_logprobs is not None else []))
        text = decode_fn([t for t in tokens if t not in eos_ids])
        responses[beam.prompt_index].append(
            Response(beam.prompt_index, beam.sentences, beam.score, tokens, logprobs, text, reason, beam.path))

    depth = 0
    while beams:
        # 1. Propose: row j*C + c is candidate c of beam j.
        seeds = [mix_seeds(prompt_seeds[b.prompt_index], *b.path, c) for b in beams for c in range(C)]
        budgets = [min(max_sentence_tokens, max_total_tokens - len(b.tokens)) for b in beams for _ in range(C)]
        if reuse_cache:
            decoder.reorder([j for j in range(len(beams)) for _ in range(C)])
            out = decoder.run_until_stop(len(beams) * C, max_new_tokens=budgets, seeds=seeds, **decode_kwargs)
            rows = [(*out.row(r), out.finish_reason[r]) for r in range(len(beams) * C)]
        else:
            rows = []
            for j, beam in enumerate(beams):
                ids, px = items[beam.prompt_index]
                rows += _propose_from_scratch(model, torch.cat([ids, torch.tensor(beam.tokens, dtype=torch.long)]), px,
                                              C, eos_ids, budgets[j * C:(j + 1) * C], seeds[j * C:(j + 1) * C],
                                              decode_kwargs, use_cuda_graph, sync_every)

        # 2. Candidates: drop short ones; an end-of-sequence-only candidate ends its beam's path.
        kept_rows, texts = [], []
        ended_by_eos = set()
        for r, (tokens, logprobs, reason) in enumerate(rows):
            j = r // C
            text = decode_fn([t for t in tokens if t not in eos_ids])
            if len(text.strip()) >= min_chars:
                kept_rows.append(r)
                texts.append(text)
            elif reason == "eos" and beams[j].sentences and j not in ended_by_eos:
                ended_by_eos.add(j)
                finish(beams[j], "eos", tokens, logprobs)
        parent_in_prompt, beams_so_far = [], {}  # beam j is its prompt's parent_in_prompt[j]-th beam
        for beam in beams:
            parent_in_prompt.append(beams_so_far.get(beam.prompt_index, 0))
            beams_so_far[beam.prompt_index] = parent_in_prompt[-1] + 1
        candidates = Candidates(
            token_ids=[rows[r][0] for r in kept_rows], logprobs=[rows[r][1] for r in kept_rows], texts=texts,
            prompt_index=[beams[r // C].prompt_index for r in kept_rows],
            parent=[parent_in_prompt[r // C] for r in kept_rows], group=[r // C for r in kept_rows],
            image_index=[first_image[beams[r // C].prompt_index] for r in kept_rows],
            prefix_token_ids=[beams[r // C].tokens for r in kept_rows], depth=depth, pixel_values=pixel_values)

        # 3. Score all candidates of this depth at once (one host sync per depth).
        scores = score_fn(candidates) if len(candidates) else torch.zeros(0)
        scores = torch.as_tensor(scores, dtype=torch.float32).flatten().cpu().tolist()
        if len(scores) != len(candidates):
            raise ValueError(f"score_fn returned {len(scores)} scores for {len(candidates)} candidates")

        # 4. Select per prompt; kept nodes either finish or become the next beams.
        next_beams, next_rows = [], []
        for p in range(P):
            mine = [i for i in range(len(kept_rows)) if candidates.prompt_index[i] == p]
            children = []
            for i in mine:
                r = kept_rows[i]
                tokens, logprobs, reason = rows[r]
                sentence = Sentence(texts[i], tokens, logprobs, scores[i], reason)
                children.append((beams[r // C].child(r % C, sentence), r, reason))
            for i in select_top_bottom([child.score for child, _, _ in children], k, k_bottom):
                child, r, reason = children[i]
                if reason == "eos":
                    finish(child, "eos")
                elif (max_sentences is not None and len(child.sentences) >= max_sentences) or \
                        len(child.tokens) >= max_total_tokens:
                    finish(child, "length")
                else:
                    next_beams.append(child)
                    next_rows.append(r)
        if reuse_cache and next_rows:
            decoder.reorder(next_rows)  # the kept candidates' rows become beam rows 0..len-1
        beams = next_beams
        depth += 1
    return responses


def _propose_from_scratch(model, prefix_ids: torch.Tensor, pixel_values, n: int, eos_ids, budgets, seeds,
                          decode_kwargs, use_cuda_graph, sync_every) -> list[tuple[list[int], torch.Tensor, str]]:
    """The released code's way to propose ``n`` candidates for one beam: a fresh prefill of image +
    prompt + the beam's sentences (nothing reused), then ``n`` rows decoded. Same seeds, same tokens."""
    decoder = Decoder(model, max_rows=n, max_seq=len(prefix_ids) + max(budgets) + 1, max_new_tokens=max(budgets),
                      eos_ids=sorted(eos_ids), use_cuda_graph=use_cuda_graph, sync_every=sync_every)
    decoder.prefill([(prefix_ids, pixel_values)])
    decoder.fork(n, 1)
    out = decoder.run_until_stop(n, max_new_tokens=budgets, seeds=seeds, **decode_kwargs)
    return [(*out.row(r), out.finish_reason[r]) for r in range(n)]
