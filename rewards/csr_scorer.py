"""CSR's calibrated sentence scorer, in the shape `search.sentence_beam.sentence_beam_search` calls.

CSR (Zhou et al., arXiv 2405.14622, Sec. 3.1-3.2; ANCHORS section 1) guides its sentence-level
beam search with the calibrated reward of each candidate sentence s:

    R(s) = lam * R_I(s) + (1 - lam) * R_T(s)       lam = 0.9 (paper, Eq. 3)

R_T: the model's own score of the sentence, the mean token log-probability in the released
code (`rewards.calibrated.self_score`); R_I: the clipped CLIP score of the sentence alone
against the prompt's image (`rewards.clip_score`). The search adds the sentence scores along
each path, so a response's score is the sum of its sentences' rewards.

The search hands the scorer all candidates of one depth at once (a `Candidates` batch, see
`search/sentence_beam.py`): token ids, their log-probs, texts, which prompt each belongs to,
and its sibling group. `CalibratedScorer` keeps the CLIP image features of every prompt
(encoded once, when it is built) and, per call, runs ONE batched `encode_text` over all
candidate texts of the depth.

`redundant_cos` (not in the paper; None, the paper, turns it off): a sentence whose CLIP text features
have cosine >= redundant_cos with those of an earlier sentence of its own path earns R_I = 0. It says
nothing the path has not said; without the rule a CLIP that cannot tell where an object is pays again
for "In the centre, there is an orange star." after "At the top, there is an orange star.", and the
summed reward makes the chosen response the one that repeats (on the built-in world, docs/CSR.md).
It is Maximal Marginal Relevance's redundancy term (Carbonell and Goldstein 1998) used as a gate.
The text features of every scored sentence are kept by path, so each candidate is compared with its
own ancestors only.

`normalize="rank"` gives the released code's variant: within each sibling group (candidates
of one parent) both raw scores are replaced by rank / n and mixed as
`(1 - lam) * rank_T + lam * rank_I`, where LOWER is better. The scorer returns the NEGATED
value, so that higher is better for the search, as for the default. Note the search then
sums these along the path; the released code averages them (`rewards.calibrated.rank_path_score`
on the sentence ranks = -Response.score / len(sentences)), and `recipes/csr.py` chooses its pairs
by that average.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .calibrated import calibrated_reward, rank_normalized_reward, self_score
from .clip_score import clip_score_from_features

__all__ = ["CalibratedScorer"]


def _stack_images(pixel_values_per_prompt) -> torch.Tensor:
    """[P, 3, H, W] from a tensor of that shape or a sequence of P tensors [3, H, W] / [1, 3, H, W]."""
    if isinstance(pixel_values_per_prompt, torch.Tensor):
        images = pixel_values_per_prompt
    else:
        images = []
        for p, px in enumerate(pixel_values_per_prompt):
            if not isinstance(px, torch.Tensor):
                raise ValueError(f"CalibratedScorer: pixel_values_per_prompt[{p}] is {type(px).__name__}; "
                                 "every prompt needs its CLIP image when lam > 0")
            images.append(px[None] if px.dim() == 3 else px)
        if not images:
            raise ValueError("CalibratedScorer: pixel_values_per_prompt is empty")
        bad = [p for p, px in enumerate(images) if px.dim() != 4 or px.shape[0] != 1]
        if bad:
            raise ValueError(f"CalibratedScorer: pixel_values_per_prompt{bad} must each be one image, "
                             "[3, H, W] or [1, 3, H, W]")
        images = torch.cat(images)
    if images.dim() != 4:
        raise ValueError(f"CalibratedScorer: pixel_values_per_prompt must be [P, 3, H, W], got {tuple(images.shape)}")
    return images


class CalibratedScorer:
    """`score_fn` for `sentence_beam_search`: CSR's calibrated reward of every candidate, [N].

    clip: an `lvlm.clip.CLIPModel` (may be None when lam == 0: CLIP is then never used).
    clip_tokenize_fn: texts (list[str]) -> CLIP input ids [N, T], e.g.
        `functools.partial(rewards.clip_score.clip_text_ids, clip_tokenizer, max_length=77,
        eos_id=49407, pad_id=49407)`.
    pixel_values_per_prompt: the CLIP-preprocessed image of each prompt of the search call,
        in the order of its `prompts`: [P, 3, H, W], or a list of P tensors [3, H, W] or
        [1, 3, H, W]. (CLIP's own preprocessing, which may differ from the LVLM's.) Ignored
        when lam == 0.
    lam: weight of R_I (paper: 0.9; 0 = self score only, 1 = CLIP only).
    self_reduce: "mean" (released code) or "sum" of the sentence's token log-probs for R_T.
    normalize: None (paper: lam * R_I + (1 - lam) * R_T, higher is better) or "rank" (the
        released code's rank mix inside sibling groups; returned negated, see the module
        docstring).
    redundant_cos: None (paper) or a cosine in (-1, 1]: a sentence this close, in CLIP's text features,
        to an earlier sentence of its path gets R_I = 0 (see the module docstring).
    text_batch_size: at most this many texts per `encode_text` call.

    After each call, `last_clip_scores` (R_I), `last_self_scores` (R_T) and `last_scores` (what
    was returned) hold float32 [N] CPU tensors, and `parts_by_path` maps (prompt_index, token
    ids of the path up to and including the sentence) -> (R_I, R_T) for every sentence scored
    so far; `sentence_parts(response)` reads a finished response's parts from it, for logging.
    """

    def __init__(
        self,
        clip,
        clip_tokenize_fn: Callable[[list[str]], torch.Tensor] | None,
        pixel_values_per_prompt=None,
        *,
        lam: float = 0.9,
        self_reduce: str = "mean",
        normalize: str | None = None,
        redundant_cos: float | None = None,
        text_batch_size: int = 256,
    ):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"CalibratedScorer: lam must lie in [0, 1], got {lam}")
        if self_reduce not in ("mean", "sum"):
            raise ValueError(f"CalibratedScorer: self_reduce must be 'mean' or 'sum', got {self_reduce!r}")
        if normalize not in (None, "rank"):
            raise ValueError(f"CalibratedScorer: normalize must be None or 'rank', got {normalize!r}")
        if redundant_cos is not None and not -1.0 < redundant_cos <= 1.0:
            raise ValueError(f"CalibratedScorer: redundant_cos must be None or lie in (-1, 1], got {redundant_cos}")
        if text_batch_size < 1:
            raise ValueError(f"CalibratedScorer: text_batch_size must be >= 1, got {text_batch_size}")
        self.lam, self.self_reduce, self.normalize = lam, self_reduce, normalize
        self.redundant_cos = redundant_cos
        self.text_batch_size = text_batch_size
        self.uses_clip = lam > 0
        self.clip, self.clip_tokenize_fn, self.image_features = None, None, None
        if self.uses_clip:
            if clip is None or clip_tokenize_fn is None or pixel_values_per_prompt is None:
                raise ValueError("CalibratedScorer: lam > 0 needs clip, clip_tokenize_fn and pixel_values_per_prompt")
            self.clip, self.clip_tokenize_fn = clip, clip_tokenize_fn
            self.device = next(clip.parameters()).device
            images = _stack_images(pixel_values_per_prompt)
            with torch.no_grad():  # once per search: every depth reuses these
                self.image_features = F.normalize(clip.encode_image(images.to(self.device)).float(), dim=-1)  # [P, D]
        self.last_clip_scores = torch.zeros(0)
        self.last_self_scores = torch.zeros(0)
        self.last_scores = torch.zeros(0)
        self.parts_by_path: dict[tuple[int, tuple[int, ...]], tuple[float, float]] = {}
        # (prompt_index, path token ids) -> unit CLIP text features [d, D] of the path's d sentences
        self.features_by_path: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    # -- the two parts ---------------------------------------------------------------------

    def self_scores(self, logprobs: Sequence[torch.Tensor]) -> torch.Tensor:
        """R_T [N] from each candidate's token log-probs (a list of 1-D tensors of any lengths)."""
        lengths = [int(lp.numel()) for lp in logprobs]
        padded = torch.zeros(len(logprobs), max(lengths))
        for i, lp in enumerate(logprobs):
            padded[i, : lengths[i]] = lp.detach().float().flatten().cpu()
        mask = torch.arange(padded.shape[1]) < torch.tensor(lengths)[:, None]  # [N, T]
        return self_score(padded, mask, reduce=self.self_reduce)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP's text features [N, D] (float32, on the CLIP's device), encoded in batches."""
        features = []
        for start in range(0, len(texts), self.text_batch_size):
            chunk = list(texts[start : start + self.text_batch_size])
            ids = torch.as_tensor(self.clip_tokenize_fn(chunk), dtype=torch.long)
            if ids.dim() != 2 or ids.shape[0] != len(chunk):
                raise ValueError(f"CalibratedScorer: clip_tokenize_fn returned shape {tuple(ids.shape)} for "
                                 f"{len(chunk)} texts; expected [{len(chunk)}, T]")
            features.append(self.clip.encode_text(ids.to(self.device)).float())
        return torch.cat(features)

    def clip_scores(self, text_features: torch.Tensor, prompt_index: Sequence[int]) -> torch.Tensor:
        """R_I [N] of each text's features [N, D] against its prompt's image (encoded once, at construction)."""
        prompt_index = torch.as_tensor(list(prompt_index), dtype=torch.long)
        P = self.image_features.shape[0]
        if len(prompt_index) and (int(prompt_index.min()) < 0 or int(prompt_index.max()) >= P):
            raise ValueError(f"CalibratedScorer: candidates come from prompts {sorted(set(prompt_index.tolist()))} "
                             f"but the scorer holds images of {P} prompts")
        images = self.image_features[prompt_index.to(self.device)]
        return clip_score_from_features(images, text_features).cpu()

    def zero_redundant(self, r_i: torch.Tensor, text_features: torch.Tensor, candidates) -> torch.Tensor:
        """R_I with 0 for every candidate within ``redundant_cos`` of an earlier sentence of its path; records
        each candidate's path features for the next depth."""
        r_i = r_i.clone()
        unit = F.normalize(text_features, dim=-1).cpu()  # [N, D]
        for i in range(len(candidates)):
            prompt = candidates.prompt_index[i]
            earlier = self.features_by_path.get((prompt, tuple(candidates.prefix_token_ids[i])))  # [d, D] or None
            if earlier is not None and float((earlier @ unit[i]).max()) >= self.redundant_cos:
                r_i[i] = 0.0
            path = tuple(candidates.prefix_token_ids[i]) + tuple(candidates.token_ids[i])
            mine = unit[i : i + 1]
            self.features_by_path[(prompt, path)] = mine if earlier is None else torch.cat([earlier, mine])
        return r_i

    # -- the score_fn ----------------------------------------------------------------------

    def __call__(self, candidates) -> torch.Tensor:
        """Scores [N] (float32, CPU) of one depth's candidates; higher is better for the search."""
        N = len(candidates)
        if N == 0:
            self.last_clip_scores = self.last_self_scores = self.last_scores = torch.zeros(0)
            return torch.zeros(0)
        empty = [i for i, lp in enumerate(candidates.logprobs) if lp.numel() == 0]
        if empty:
            raise ValueError(f"CalibratedScorer: candidates {empty} have no tokens")
        r_t = self.self_scores(candidates.logprobs)  # [N]
        if self.uses_clip:
            features = self.text_features(candidates.texts)  # [N, D]
            r_i = self.clip_scores(features, candidates.prompt_index)
            if self.redundant_cos is not None:
                r_i = self.zero_redundant(r_i, features, candidates)
        else:
            r_i = torch.zeros(N)
        if self.normalize == "rank":
            scores = -rank_normalized_reward(r_i, r_t, list(candidates.group), a=self.lam)
        else:
            scores = calibrated_reward(r_i, r_t, lam=self.lam)
        self.last_clip_scores, self.last_self_scores, self.last_scores = r_i, r_t, scores
        for i in range(N):
            path = tuple(candidates.prefix_token_ids[i]) + tuple(candidates.token_ids[i])
            self.parts_by_path[(candidates.prompt_index[i], path)] = (float(r_i[i]), float(r_t[i]))
        return scores

    def sentence_parts(self, response) -> list[tuple[float, float]]:
        """(R_I, R_T) of each sentence of a finished `Response` of the search this scorer guided."""
        parts, path = [], ()
        for sentence in response.sentences:
            path = path + tuple(sentence.token_ids)
            key = (response.prompt_index, path)
            if key not in self.parts_by_path:
                raise ValueError(f"CalibratedScorer.sentence_parts: no scored sentence for prompt "
                                 f"{response.prompt_index} at path length {len(path)}; was this response "
                                 "produced by a search that used this scorer?")
            parts.append(self.parts_by_path[key])
        return parts
