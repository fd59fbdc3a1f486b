"""CSR's image-relevance score R_I: a clipped, scaled CLIP cosine between an image and a text.

CSR (Zhou et al., "Calibrating Self-Rewarding Vision Language Models", arXiv 2405.14622,
Sec. 3.1; ANCHORS section 1) checks every candidate sentence against the image with a CLIP
model (openai `clip-vit-large-patch14-336`), the sentence alone being the text:

    R_I(s) = max(100 * cos(F_I(image), F_T(s)), 0)

F_I and F_T are CLIP's projected image and text features (`lvlm.clip.CLIPModel.encode_image`
and `encode_text`, unnormalised; the cosine normalises them). The factor 100 is the fixed
scale of the CLIPScore convention, not the model's learned `logit_scale`.

Two pieces: `clip_text_ids` turns texts into CLIP token ids (start token, text, end token,
cut to CLIP's context), and `clip_score` runs both towers and combines them. A text whose
features point away from the image scores 0, never a negative number.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["clip_text_ids", "clip_score", "clip_score_from_features", "CLIP_SCORE_SCALE"]

CLIP_SCORE_SCALE = 100.0
CLIP_START_TOKEN = "<|startoftext|>"  # the start token of OpenAI CLIP's tokenizer.json


def _bos_id(tokenizer, bos) -> int | None:
    """The start-token id `clip_text_ids` puts first, or None for no start token."""
    if bos is False or bos is None:
        return None
    if bos is True:
        bos_id = getattr(tokenizer, "bos_id", None)  # an lvlm.tokenizer.Tokenizer knows its own
        if bos_id is None:
            raw = getattr(tokenizer, "raw", tokenizer)
            bos_id = raw.token_to_id(CLIP_START_TOKEN)
        if bos_id is None:
            raise ValueError(
                f"clip_text_ids: bos=True but the tokenizer has no start token (no bos_id and no "
                f"{CLIP_START_TOKEN!r}); pass bos=<id> or bos=False"
            )
        return int(bos_id)
    return int(bos)


def clip_text_ids(
    tokenizer, texts: Sequence[str], *, max_length: int, eos_id: int, pad_id: int, bos: bool | int = True
) -> torch.Tensor:
    """CLIP text-tower input for `texts`: `[start] + tokens + [end]`, cut to `max_length`, right-padded.

    tokenizer: an `lvlm.tokenizer.Tokenizer` or a raw `tokenizers.Tokenizer` (CLIP's own
    `tokenizer.json` for real models); its special-token post-processor is not applied, the
    start and end tokens are put in here. max_length: CLIP's context (77 for OpenAI CLIP,
    `text_config.max_position_embeddings`). eos_id: the end-of-text id (49407 for OpenAI CLIP).
    pad_id: the id that fills rows up to the longest row. bos: True = the tokenizer's start
    token (`tokenizer.bos_id`, else the id of "<|startoftext|>"), an int = that id, False = none.

    A text longer than the context keeps its first `max_length - 2` tokens (`- 1` without a
    start token) and the end token stays last, so the text tower always pools at an end
    token. An empty text becomes just start + end: it gets the score of CLIP's "empty
    caption" against the image, which is usually well above 0 -- callers that want 0 for
    empty sentences must mask them (CSR's beam search drops candidates under 4 characters
    before scoring).

    Pooling note: `lvlm.clip` pools at the first `eos_token_id` of a row, except when the
    config says `eos_token_id == 2` (the original OpenAI files), where it pools at the row's
    highest id: there `eos_id` must be the vocabulary's highest id (49407 is), and a pad id
    equal to it is harmless (argmax takes the first occurrence).
    Returns LongTensor [len(texts), T], T = the longest row (at most max_length).
    """
    start = _bos_id(tokenizer, bos)
    n_special = 1 + (start is not None)
    if max_length < n_special:
        raise ValueError(f"clip_text_ids: max_length={max_length} leaves no room for the start/end tokens")
    raw = getattr(tokenizer, "raw", tokenizer)
    rows = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"clip_text_ids: texts[{i}] is {type(text).__name__}, expected str")
        body = raw.encode(text, add_special_tokens=False).ids if text else []
        body = list(body[: max_length - n_special])
        rows.append(([start] if start is not None else []) + body + [int(eos_id)])
    if not rows:
        return torch.zeros(0, n_special, dtype=torch.long)
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), int(pad_id), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids


def clip_score_from_features(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """max(100 * cos(image_features[b], text_features[b]), 0) row by row (CSR's R_I).

    image_features, text_features: [B, D] projected CLIP features (unnormalised is fine).
    The cosine is taken in float32. Returns float32 [B].
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"clip_score_from_features: image features {tuple(image_features.shape)} and text features "
            f"{tuple(text_features.shape)} must both be [B, D]"
        )
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float().to(image.device), dim=-1)
    cos = (image * text).sum(dim=-1)  # [B]
    return (CLIP_SCORE_SCALE * cos).clamp(min=0.0)


@torch.no_grad()
def clip_score(clip, pixel_values: torch.Tensor, input_ids: torch.Tensor, *, image_index=None) -> torch.Tensor:
    """CSR's image-relevance score R_I = max(100 * cos(F_I(image), F_T(text)), 0) per text.

    clip: an `lvlm.clip.CLIPModel` (anything with `encode_image` / `encode_text`).
    pixel_values: [N, 3, H, W] CLIP-preprocessed images. input_ids: [B, T] CLIP text ids
    (see `clip_text_ids`). Which image goes with text b:
      - image_index None and N == B: image b (row by row);
      - image_index None and N == 1: the one image, for every text;
      - image_index [B] (long, values in [0, N)): image image_index[b].
    Every image is encoded once, all texts in one batch. Runs under no_grad.
    Source: CSR paper, Sec. 3.1 (R_I). Returns float32 [B] on the model's device.
    """
    if pixel_values.dim() != 4:
        raise ValueError(f"clip_score: pixel_values must be [N, 3, H, W], got {tuple(pixel_values.shape)}")
    if input_ids.dim() != 2:
        raise ValueError(f"clip_score: input_ids must be [B, T], got {tuple(input_ids.shape)}")
    N, B = pixel_values.shape[0], input_ids.shape[0]
    device = next(clip.parameters()).device if hasattr(clip, "parameters") else input_ids.device
    if image_index is None:
        if N == B:
            image_index = torch.arange(B)
        elif N == 1:
            image_index = torch.zeros(B, dtype=torch.long)
        else:
            raise ValueError(
                f"clip_score: {N} images for {B} texts; give one image, one per text, or image_index [B]"
            )
    image_index = torch.as_tensor(image_index, dtype=torch.long).flatten()
    if image_index.shape != (B,):
        raise ValueError(f"clip_score: image_index has {image_index.numel()} entries for {B} texts")
    if B and (int(image_index.min()) < 0 or int(image_index.max()) >= N):
        raise ValueError(f"clip_score: image_index values must lie in [0, {N}), got {image_index.tolist()}")
    if B == 0:
        return torch.zeros(0, device=device)
    image_features = clip.encode_image(pixel_values.to(device))  # [N, D], each image once
    text_features = clip.encode_text(input_ids.to(device))  # [B, D]
    return clip_score_from_features(image_features[image_index.to(device)], text_features)
