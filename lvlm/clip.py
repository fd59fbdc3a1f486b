"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

Two pre-norm transformer towers with ``quick_gelu`` MLPs:

- the vision tower (ViT, Dosovitskiy et al. 2021): a bias-free convolution cuts the image into
  patches, a learned class embedding is prepended, learned positions are added, ``pre_layrnorm``
  (sic, the checkpoint's spelling), the encoder layers, and ``post_layernorm`` on the class token;
- the text tower: token + learned position embeddings, encoder layers under a causal mask,
  ``final_layer_norm``, pooled at the end-of-text token.

``CLIPModel.encode_image`` / ``encode_text`` return the projected, *unnormalised* features; the CLIP
score (``rewards.clip_score``) normalises them. LLaVA uses the vision tower alone, reading the hidden
state of an inner layer (``CLIPVisionTransformer.hidden_state``). Names follow Hugging Face's
``CLIPModel`` so checkpoint keys map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def _activation(name: str):
    return quick_gelu if name == "quick_gelu" else F.gelu


# Up to this many positions, ``attention`` multiplies the matrices itself instead of calling PyTorch's
# fused kernel. On CPU the fused kernel's cost per (row, head) dominates for short sequences: forward +
# backward of the world CLIP's text attention (887 rows x 2 heads, T = 15, Dh = 32, 2 threads of an AMD
# EPYC) took 52 ms fused and 16 ms written out; at T >= 118 the two are equal (``tests/test_clip.py``
# checks they agree). Real CLIP's towers (77 text positions, 577 image positions) stay on the kernel.
SHORT_SEQUENCE = 32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(Dh) [+ causal mask]) v`` over
    q, k, v [B, heads, T, Dh]: written out for short sequences (``SHORT_SEQUENCE``), else fused."""
    T = q.shape[-2]
    if T > SHORT_SEQUENCE:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, heads, T, T]
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1) @ v


class CLIPAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, T, D = x.shape

        def split(t):  # [B, T, D] -> [B, heads, T, D / heads]
            return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)

        out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class CLIPMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.act = _activation(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: CLIPVisionConfig | CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(c.hidden_size, c.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, causal: bool = False):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c: CLIPVisionConfig | CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(c.num_patches + 1, c.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` [N, 3, H, W] -> [N, 1 + patches, hidden] (class token first)."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, D, h, w]
        patches = patches.flatten(2).transpose(1, 2)  # [N, h * w, D]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _check(self, pixel_values: torch.Tensor) -> None:
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; the vision tower expects "
                             f"[N, {', '.join(map(str, expected))}]")

    def hidden_state(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """The hidden state ``[N, 1 + patches, hidden]`` at index ``layer`` of Hugging Face's tuple
        (embeddings after ``pre_layrnorm``, layer 1, ..., layer L); -2 is the output of layer L-1.
        Layers after the requested one are not run. ``post_layernorm`` is not applied.
        """
        self._check(pixel_values)
        L = len(self.encoder.layers)
        run = layer if layer >= 0 else L + 1 + layer
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for block in self.encoder.layers[:run]:
            x = block(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled output ``[N, hidden]``: ``post_layernorm`` of the class token after the last layer."""
        return self.post_layernorm(self.hidden_state(pixel_values)[:, 0])


class CLIPVisionModel(nn.Module):
    """The vision tower alone, as LLaVA checkpoints hold it (``vision_tower.vision_model.*``)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(config)

    def hidden_state(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        return self.vision_model.hidden_state(pixel_values, layer)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def end_of_text_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where each row is pooled ([B] long). Hugging Face's rule: the first ``eos_token_id``; for the
        original OpenAI files, whose config says ``eos_token_id = 2``, the highest id in the row (the
        end-of-text token is the last id of that vocabulary). A row with no end token pools its last position.
        """
        if self.config.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        is_end = input_ids == self.config.eos_token_id
        last = torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1)
        return torch.where(is_end.any(-1), is_end.int().argmax(dim=-1), last)

    def forward(self, input_ids: torch.Tensor, *, length_groups: int = 1) -> torch.Tensor:
        """Pooled output ``[B, hidden]`` of right-padded ``input_ids`` [B, T].

        ``length_groups`` > 1: the rows, sorted by where they pool, run as that many groups of about
        equal size, each cut just after its longest row's pooled position. The tower is causal, so a
        row's pooled state never sees the positions after it: the features are the same, the padding
        computed less (the world CLIP's training texts are 66% real tokens when padded together).
        """
        T, T_max = input_ids.shape[1], self.config.max_position_embeddings
        if T > T_max:
            raise ValueError(f"CLIP text input has {T} tokens; the text tower takes at most {T_max} "
                             "(truncate with the CLIP tokenizer)")
        pooled_at = self.end_of_text_index(input_ids)  # [B]
        if length_groups > 1 and input_ids.shape[0] > length_groups:
            order = pooled_at.argsort(stable=True)
            parts = []
            for rows in order.chunk(length_groups):
                at = pooled_at[rows]
                parts.append(self._pooled(input_ids[rows, :int(at.max()) + 1], at))
            return torch.cat(parts).index_select(0, order.argsort())  # back in row order
        return self._pooled(input_ids, pooled_at)

    def _pooled(self, input_ids: torch.Tensor, pooled_at: torch.Tensor) -> torch.Tensor:
        """The final-normed state at ``pooled_at`` [B] of each row of ``input_ids`` [B, T]."""
        x = self.embeddings(input_ids)
        for block in self.encoder.layers:
            x = block(x, causal=True)
        x = self.final_layer_norm(x)
        return x[torch.arange(x.shape[0], device=x.device), pooled_at]


class CLIPModel(nn.Module):
    """Both towers, the bias-free projections into the joint space, and ``logit_scale`` (stored as a log)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text_config)
        self.vision_model = CLIPVisionTransformer(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised image features ``[N, projection_dim]``."""
        return self.visual_projection(self.vision_model(pixel_values))

    def encode_text(self, input_ids: torch.Tensor, *, length_groups: int = 1) -> torch.Tensor:
        """Projected, unnormalised text features ``[B, projection_dim]`` (``length_groups``: see
        ``CLIPTextTransformer.forward``)."""
        return self.text_projection(self.text_model(input_ids, length_groups=length_groups))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, *, length_groups: int = 1) -> torch.Tensor:
        """Contrastive logits ``[N_images, B_texts]``: ``exp(logit_scale) * cos``."""
        img = F.normalize(self.encode_image(pixel_values), dim=-1)
        txt = F.normalize(self.encode_text(input_ids, length_groups=length_groups), dim=-1)
        return self.logit_scale.exp() * img @ txt.T
