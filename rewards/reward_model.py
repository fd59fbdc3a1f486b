"""Fact-RLHF's reward model: the LVLM with a scalar head read at the last token of its input.

LLaVA-RLHF (Sun et al., arXiv 2309.14525, Sec. 2.2-2.3; ANCHORS section 3) trains its reward
model from the SFT vision-language model: the language-model head is set aside and a linear
head `Linear(hidden, 1)` maps the final-normed hidden state of the input's LAST token to a
score. The input is the conversation followed by an evaluation turn that may list the image's
ground-truth captions ("factually augmented", `rewards.fact_prompt`), ending in "... the quality
score of my last response is"; the score is read there. Training (Bradley-Terry,
`optim.reward_model_loss`) and LoRA on the backbone live in `optim`; this file holds the model,
its save/load, the value model made from it, and the input builder.

On disk a reward model is a normal Hugging Face LLaVA directory (`lvlm.save_lvlm`: the backbone,
LM head included, loadable by anything that reads LLaVA) plus `score_head.safetensors` (keys
"weight" [1, hidden] and "bias" [1]) and `reward_model.json`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import uuid
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lvlm.checkpoint import load_lvlm, save_lvlm
from lvlm.llava import LlavaForConditionalGeneration
from lvlm.records import read_json
from lvlm.tokenizer import SYSTEM, pad_batch

from .fact_prompt import END_OF_TURN, IMAGE_TOKEN, fact_prompt

__all__ = [
    "RewardModel",
    "save_reward_model",
    "load_reward_model",
    "value_model_from",
    "reward_inputs",
    "score_batch",
    "HEAD_FILE",
    "META_FILE",
]

HEAD_FILE = "score_head.safetensors"
META_FILE = "reward_model.json"


class RewardModel(nn.Module):
    """An `LlavaForConditionalGeneration` backbone plus `score_head = Linear(hidden, 1)` (LLaVA-RLHF).

    Head initialisation: bias zero (as released); weight normal with std 1 / sqrt(hidden + 1),
    the scalar-head init of Ziegler et al.'s lm-human-preferences, so that on RMS-normed hidden
    states the initial scores are of order 1. The head is created in the backbone's dtype and on
    its device (one dtype per module keeps FSDP flat-parameter wrapping simple); scores come
    out in float32. The backbone's `lm_head` is never used.
    """

    def __init__(self, backbone: LlavaForConditionalGeneration):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.text_config.hidden_size
        weight = backbone.language_model.model.embed_tokens.weight
        self.score_head = nn.Linear(hidden, 1, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.score_head.weight.normal_(0.0, 1.0 / math.sqrt(hidden + 1))
            self.score_head.bias.zero_()

    @property
    def config(self):
        return self.backbone.config

    def token_scores(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The head applied at every position: float32 [B, T] (a value model reads these per token)."""
        hidden = self.backbone.hidden_states(input_ids, pixel_values)  # [B, T, D], final-normed
        return self.score_head(hidden.to(self.score_head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                lengths: torch.Tensor) -> torch.Tensor:
        """Scores [B] float32 of right-padded inputs: the head at each row's last real token.

        input_ids: [B, T], row b's real tokens at 0 .. lengths[b] - 1 (padding after them is
        never seen by the real tokens: causal attention); pixel_values: [N, 3, H, W], the images
        whose token blocks appear in input_ids (None for none); lengths: [B] long, >= 1.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"RewardModel: input_ids must be [B, T], got {tuple(input_ids.shape)}")
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=input_ids.device).flatten()
        B, T = input_ids.shape
        if lengths.shape != (B,):
            raise ValueError(f"RewardModel: {lengths.numel()} lengths for {B} rows")
        if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"RewardModel: lengths must lie in [1, {T}], got {lengths.tolist()}")
        hidden = self.backbone.hidden_states(input_ids, pixel_values)  # [B, T, D]
        last = hidden[torch.arange(B, device=hidden.device), lengths - 1]  # [B, D]
        return self.score_head(last.to(self.score_head.weight.dtype)).squeeze(-1).float()


def value_model_from(reward_model: RewardModel) -> RewardModel:
    """The PPO value model: a copy of the reward model whose head is a NEW zeroed head (LLaVA-RLHF).

    Both weight and bias are zero, so every value is exactly 0 at the start: the first
    value-loss steps see returns against a neutral baseline instead of the reward model's
    scores of partial responses. The head still learns (its weight gradient is the hidden
    state), and the backbone follows once the weight is non-zero. The backbone is an
    independent deep copy (same values, separate tensors). For a 7B model, loading the
    reward model a second time and zeroing its head is the same thing without the copy in
    memory. The value model reads `token_scores` (one value per position); it is not given
    the facts (LLaVA-RLHF): build its inputs with use_facts=False.
    """
    value_model = copy.deepcopy(reward_model)
    with torch.no_grad():
        value_model.score_head.weight.zero_()
        value_model.score_head.bias.zero_()
    return value_model


# ----------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------


def save_reward_model(reward_model: RewardModel, path: str | Path, **save_options) -> Path:
    """Write the backbone (`lvlm.save_lvlm`, same options), `score_head.safetensors` and `reward_model.json`.

    The backbone must be plain (merge LoRA first: `optim.merge_lora`). The head file and the
    json are written under temporary names and renamed; the json comes last, so a directory
    with `reward_model.json` holds a complete reward model.
    """
    if not isinstance(reward_model, RewardModel):
        raise ValueError(f"save_reward_model takes a RewardModel, got {type(reward_model).__name__}")
    path = Path(save_lvlm(reward_model.backbone, path, **save_options))
    head = {name: t.detach().to("cpu").contiguous() for name, t in reward_model.score_head.state_dict().items()}
    meta = {
        "format": "reward_model",
        "head_file": HEAD_FILE,
        "hidden_size": reward_model.config.text_config.hidden_size,
        "score_position": "last real token (right padding)",
        "prompt": "rewards.fact_prompt",
    }
    tag = f".tmp-{uuid.uuid4().hex[:8]}"
    tmp_head, tmp_meta = path / (HEAD_FILE + tag), path / (META_FILE + tag)
    try:
        save_file(head, tmp_head, metadata={"format": "pt"})
        os.replace(tmp_head, path / HEAD_FILE)
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_meta, path / META_FILE)
    finally:
        tmp_head.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return path


def load_reward_model(path: str | Path, *, dtype: torch.dtype | str | None = None, device="cpu") -> RewardModel:
    """A `RewardModel` from a directory written by `save_reward_model` (dtype / device as `lvlm.load_lvlm`)."""
    path = Path(path)
    meta_file = path / META_FILE
    meta = read_json(meta_file, f"{META_FILE} (not a saved reward model)")
    head_file = path / meta.get("head_file", HEAD_FILE)
    if not head_file.is_file():
        raise FileNotFoundError(f"load_reward_model: {meta_file} names {head_file.name}, which is missing")
    reward_model = RewardModel(load_lvlm(path, dtype=dtype, device=device))
    head = load_file(head_file)
    expected = {name: tuple(t.shape) for name, t in reward_model.score_head.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in head.items()}
    if found != expected:
        raise ValueError(f"load_reward_model: {head_file} holds {found}, expected {expected}")
    with torch.no_grad():
        for name, t in reward_model.score_head.state_dict().items():
            t.copy_(head[name])
    return reward_model


# ----------------------------------------------------------------------------------------
# Inputs and batched scoring
# ----------------------------------------------------------------------------------------


def reward_inputs(
    tokenizer,
    question: str,
    response: str,
    captions: Sequence[str] = (),
    *,
    image_tokens_per_image: int,
    seed: int | None = None,
    use_facts: bool = True,
    max_length: int | None = None,
    system: str = SYSTEM,
) -> torch.Tensor:
    """The reward model's input ids [T] for one (question, response): `rewards.fact_prompt` tokenised.

    tokenizer: an `lvlm.tokenizer.Tokenizer`. The text is
    `{system} USER: <image>\\n{question} ASSISTANT: {response}</s> USER: Please evaluate ...`
    (captions shuffled by `random.Random(seed)`, left out with use_facts=False). BOS first;
    "</s>" must become the end-of-sequence id and "<image>" the image id, which is then
    repeated `image_tokens_per_image` times (Hugging Face LLaVA convention) -- both are
    checked, since a tokenizer without them as added tokens would spell them out in pieces.
    An input longer than `max_length` tokens is an error (cutting it would drop the
    evaluation turn the score is read after). Source: LLaVA-RLHF, Sec. 2.3.
    """
    text = fact_prompt(system, question, response, captions, seed=seed, use_facts=use_facts)
    ids = tokenizer.encode(text, add_bos=True)
    n_end = text.count(END_OF_TURN)
    if ids.count(tokenizer.eos_id) != n_end:
        raise ValueError(f"reward_inputs: the text has {n_end} {END_OF_TURN!r} but its ids hold "
                         f"{ids.count(tokenizer.eos_id)} end-of-sequence tokens; the tokenizer at "
                         f"{tokenizer.path} must treat {END_OF_TURN!r} as one special token")
    image_id = tokenizer.image_token_id
    if text.count(IMAGE_TOKEN) != 1 or ids.count(image_id) != 1:
        raise ValueError(f"reward_inputs: expected exactly one {IMAGE_TOKEN!r} (in front of the question), found "
                         f"{text.count(IMAGE_TOKEN)} in the text and {ids.count(image_id)} image tokens; "
                         "the response must not contain it")
    at = ids.index(image_id)
    ids = ids[:at] + [image_id] * image_tokens_per_image + ids[at + 1 :]
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"reward_inputs: the reward-model input is {len(ids)} tokens (image included), more "
                         f"than max_length={max_length}; shorten the response or raise max_length")
    return torch.tensor(ids, dtype=torch.long)


def _item_fields(item, i: int) -> tuple[str, str, Sequence[str]]:
    if isinstance(item, Mapping):
        missing = [k for k in ("question", "response") if k not in item]
        if missing:
            raise ValueError(f"score_batch: items[{i}] has no {missing} field(s)")
        return item["question"], item["response"], item.get("captions", ())
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return item[0], item[1], item[2]
    raise ValueError(f"score_batch: items[{i}] must be a mapping with question/response/captions or a "
                     f"(question, response, captions) tuple, got {type(item).__name__}")


@torch.no_grad()
def score_batch(
    reward_model: RewardModel,
    tokenizer,
    items: Sequence,
    pixel_values: torch.Tensor,
    *,
    image_tokens_per_image: int,
    use_facts: bool = True,
    seed: int | Sequence[int | None] | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    system: str = SYSTEM,
) -> torch.Tensor:
    """Reward-model scores of many (question, response, captions) items, batched, under no_grad.

    items: N mappings with "question", "response" and "captions" (optional with
    use_facts=False), or (question, response, captions) tuples. pixel_values: [N, 3, H, W],
    item i's image in row i. seed: None (captions keep their order), an int (item i shuffles
    with seed + i), or one seed per item. Rows are right-padded with the end-of-sequence id
    (padding is never seen by the real tokens, and the score is read at each row's last real
    token). Returns float32 [N] on the CPU.
    """
    items = list(items)
    N = len(items)
    if pixel_values is None or pixel_values.dim() != 4 or pixel_values.shape[0] != N:
        shape = None if pixel_values is None else tuple(pixel_values.shape)
        raise ValueError(f"score_batch: pixel_values must be [{N}, 3, H, W] (one image per item), got {shape}")
    if batch_size < 1:
        raise ValueError(f"score_batch: batch_size must be >= 1, got {batch_size}")
    if seed is None or isinstance(seed, int):
        seeds = [None if seed is None else seed + i for i in range(N)]
    else:
        seeds = list(seed)
        if len(seeds) != N:
            raise ValueError(f"score_batch: {len(seeds)} seeds for {N} items")
    rows = []
    for i, item in enumerate(items):
        question, response, captions = _item_fields(item, i)
        rows.append(reward_inputs(tokenizer, question, response, captions,
                                  image_tokens_per_image=image_tokens_per_image, seed=seeds[i],
                                  use_facts=use_facts, max_length=max_length, system=system))
    device = next(reward_model.parameters()).device
    scores = []
    for start in range(0, N, batch_size):
        ids, lengths = pad_batch(rows[start : start + batch_size], tokenizer.eos_id)
        px = pixel_values[start : start + batch_size].to(device)
        scores.append(reward_model(ids.to(device), px, lengths.to(device)).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)
