"""LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning").

    image --CLIP ViT--> hidden state of layer ``vision_feature_layer`` (-2), CLS dropped
          --projector: linear_1, exact GELU, linear_2--> one embedding per patch
    text  --embed_tokens--> token embeddings; the positions holding the image token take the
          image embeddings, in order --Llama--> logits

The Hugging Face convention for ``input_ids``: each image occupies as many positions as it has
features (576 at 336 px), all holding ``image_token_index``. Several images per batch and text-only
rows both work; images are consumed in row-major order of their image-token blocks.

Entry points: ``forward`` (whole sequences, training and scoring), ``prefill`` (prompts into an
empty ``KVCache``, rows of different lengths), ``decode`` (one token per row). The search engine
builds on the last two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIPVisionModel
from .config import LlavaConfig
from .kv_cache import KVCache
from .llama import LlamaForCausalLM


class MultiModalProjector(nn.Module):
    """LLaVA-1.5's two-layer MLP from the vision width to the language width."""

    def __init__(self, c: LlavaConfig):
        super().__init__()
        bias = c.multimodal_projector_bias
        self.linear_1 = nn.Linear(c.vision_config.hidden_size, c.text_config.hidden_size, bias=bias)
        self.linear_2 = nn.Linear(c.text_config.hidden_size, c.text_config.hidden_size, bias=bias)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


def shared_prefix_length(input_ids: torch.Tensor, image_token_id: int) -> int:
    """How many leading positions hold the same token in every row of ``input_ids`` [B, T], stopping at
    the first image token (image features differ between rows). One host sync."""
    differs = (input_ids != input_ids[:1]).any(0) | (input_ids[0] == image_token_id)  # [T]
    return int(differs.int().argmax()) if bool(differs.any()) else input_ids.shape[1]


class LlavaForConditionalGeneration(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = LlamaForCausalLM(config.text_config)

    # -- the image path --------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` [N, 3, H, W] -> projected features [N, image_tokens_per_image, text hidden]."""
        c = self.config
        hidden = self.vision_tower.hidden_state(pixel_values, c.vision_feature_layer)  # [N, 1 + P, Dv]
        if c.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # drop CLS
        return self.multi_modal_projector(hidden)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with image features written into the image-token positions."""
        is_image = input_ids == self.config.image_token_index
        # The image token id may lie outside the embedding table; its rows are overwritten anyway.
        embeds = self.language_model.embed(input_ids.masked_fill(is_image, 0))
        n_slots = int(is_image.sum())  # one host sync per prompt batch, never per decoded token
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        per_image = self.config.image_tokens_per_image
        if n_slots != n_images * per_image:
            raise ValueError(
                f"input_ids hold {n_slots} image-token positions but {n_images} image(s) give "
                f"{n_images * per_image} features ({per_image} per image); expand each <image> marker "
                f"to {per_image} copies of token {self.config.image_token_index}"
            )
        if n_images == 0:
            return embeds
        features = self.image_features(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(is_image[..., None], features)

    # -- the three entry points -------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                logits_at: torch.Tensor | None = None, share_prefix: bool = False) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for whole right-padded sequences (causal, no cache).

        ``logits_at`` ([B, T] bool): only those positions' logits, ``[N, vocab]`` in row-major order --
        a loss that scores a few tokens of each sequence skips the vocabulary projection (and its
        backward) everywhere else. ``share_prefix``: the tokens every row starts with (the system
        prompt, up to the first image token) run once for the whole batch (``shared_prefix_length``,
        ``LlamaForCausalLM.hidden_states``); the logits are the same.
        """
        hidden = self.hidden_states(input_ids, pixel_values, share_prefix=share_prefix)  # [B, T, D]
        if logits_at is None:
            return self.language_model.lm_head(hidden)
        if logits_at.shape != input_ids.shape or logits_at.dtype != torch.bool:
            raise ValueError(f"logits_at must be a bool tensor of the input's shape {tuple(input_ids.shape)}, "
                             f"got {logits_at.dtype} {tuple(logits_at.shape)}")
        return self.language_model.lm_head(hidden[logits_at])  # [N, vocab]

    def hidden_states(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                      share_prefix: bool = False) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, hidden]`` (a scalar head reads these: reward/value models)."""
        prefix = shared_prefix_length(input_ids, self.config.image_token_index) if share_prefix else 0
        return self.language_model.hidden_states(self.embed(input_ids, pixel_values), shared_prefix=prefix)

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Write right-padded prompts ``input_ids`` [B, T] (row b has ``lengths[b]`` real tokens) into
        empty cache rows 0..B-1 and return the logits at each row's last real token, ``[B, vocab]``.
        """
        B, T = input_ids.shape
        if B != cache.batch:
            raise ValueError(f"prefill of {B} prompts into a KV cache of {cache.batch} rows")
        if T > cache.max_seq:
            raise ValueError(f"prompt of {T} tokens does not fit a KV cache of {cache.max_seq} positions")
        lengths = lengths.to(cache.lengths.device)
        cache.reset_()
        hidden = self.language_model.forward_cached(self.embed(input_ids, pixel_values), cache,
                                                    attend_len=T, n_new=lengths)
        last = hidden[torch.arange(B, device=hidden.device), lengths - 1]  # [B, D]
        return self.language_model.lm_head(last)

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append one token per row (``tokens`` [B]) and return the next-token logits ``[B, vocab]``.

        Static shapes, no host sync: this is the step a CUDA graph captures.
        """
        embeds = self.language_model.embed(tokens[:, None])
        return self.language_model.lm_head(self.language_model.forward_cached(embeds, cache)[:, 0])
