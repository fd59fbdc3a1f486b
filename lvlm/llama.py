"""The Llama decoder (Touvron et al. 2023, "Llama 2"), as used by LLaVA-1.5 (Vicuna-v1.5).

Pre-norm transformer: RMSNorm -> attention with rotary position embeddings (RoPE, rotate-half form)
and grouped-query attention -> residual; RMSNorm -> SwiGLU MLP -> residual. Module and parameter
names follow the Hugging Face ``LlamaForCausalLM`` so a checkpoint's keys map one to one.

Two ways to run it:

- ``forward(input_ids | inputs_embeds)``: the whole sequence at once, causal mask, no cache. Used for
  training and for scoring log-probs. ``hidden_states(..., shared_prefix=P)`` computes a prefix that
  every row shares (a system prompt) once, as a batch of one, and lets every row attend to it.
- ``forward_cached(inputs_embeds, cache, ...)``: new tokens attend to what ``cache`` already holds for
  their row and are written into it. Prefill (a whole prompt into empty rows) and decode (one token
  per row) are the two uses; see ``lvlm.kv_cache``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .config import LlamaConfig
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of RoPE angles (Su et al. 2021), ``[B, T, head_dim]`` for ``positions`` [B, T].

    Frequencies ``theta^(-2i/head_dim)``; angles computed in float32, then cast to ``dtype``. The
    half-split layout (the angle vector repeated twice) goes with ``rotate_half``.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, heads, T, head_dim] by the angles whose cos/sin are [B, T, head_dim]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool, *,
                     float32: bool = False) -> torch.Tensor:
    """Causal scaled dot-product attention: q [B, H, Tq, Dh], k, v [B, Hkv, Tk, Dh], Tq <= Tk.

    The queries are the last Tq of the Tk positions: query i sits at position Tk - Tq + i and sees keys
    0 .. Tk - Tq + i (the causal mask aligned at the lower right; Tq == Tk is the usual one). Tq < Tk
    is a row's own positions after a shared prefix whose keys come first (``hidden_states``).

    ``float32``: under bfloat16 autocast, compute it in float32 instead (the output is float32). On CPU
    that is faster at the world's sizes: PyTorch's CPU flash-attention backward takes about twice as
    long in bfloat16 (T ~100-250, Dh 32; ``recipes/bench_world_step.py``).
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    mask = {"is_causal": True} if Tq == Tk else {"attn_mask": causal_lower_right(Tq, Tk)}
    if torch.is_autocast_enabled(q.device.type):
        if float32:
            with torch.autocast(q.device.type, enabled=False):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=gqa, **mask)
        if Tq != Tk:  # the mask object bypasses autocast's casts: make them here
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **mask)


@contextlib.contextmanager
def attention_in_float32(model: nn.Module, enabled: bool = True):
    """Within the block, every ``Attention`` of ``model`` computes in float32 under autocast
    (``causal_attention(float32=True)``); afterwards, as by default, in the autocast dtype."""
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    for m in attention:
        m.float32_attention = enabled
    try:
        yield
    finally:
        for m in attention:
            m.float32_attention = False


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (Ainslie et al. 2023) and RoPE.

    ``float32_attention`` (an attribute, default False): see ``causal_attention``.
    """

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)
        self.float32_attention = False

    def project(self, x, cos, sin):
        """x [B, T, D] -> q [B, H, T, Dh], k, v [B, Hkv, T, Dh], with RoPE applied to q and k."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v):
        """Causal attention (``causal_attention``) of q [B, H, T, Dh] over k, v, then the output projection."""
        B, _, T, _ = q.shape
        out = causal_attention(q, k, v, self.n_kv != self.n_heads, float32=self.float32_attention)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x, cos, sin, *, cache: KVCache | None = None, layer: int = 0,
                positions: torch.Tensor | None = None, attend_len: int | None = None):
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is None:
            return self.attend(q, k, v)
        cache.write(layer, k, v, positions)
        S = attend_len or cache.max_seq
        keys, values = cache.k[layer, :, :, :S], cache.v[layer, :, :, :S]  # [B, Hkv, S, Dh]
        # Query t of row b sees cache positions 0 .. positions[b, t] (its prefix and itself).
        visible = torch.arange(S, device=x.device) <= positions[:, :, None]  # [B, T, S]
        out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype),
                                             attn_mask=visible[:, None], enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, *, prefix=None, **cache_args):
        """``x`` [B, T, D] -> [B, T, D]; with ``prefix`` [1, P, D], the pair (prefix, x) of
        ``forward_shared_prefix`` (called through here so that module hooks, FSDP2's among them, run)."""
        if prefix is not None:
            return self.forward_shared_prefix(prefix, x, cos, sin)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, **cache_args)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_shared_prefix(self, prefix, x, cos, sin):
        """The layer over a prefix that every row shares, ``prefix`` [1, P, D], and each row's own positions
        after it, ``x`` [B, T - P, D]; RoPE ``cos``/``sin`` [1, T, Dh] for all T positions. The prefix is
        computed once and its keys and values are seen by every row: what ``forward`` gives on the whole
        [B, T, D] batch, with (B - 1) x P positions fewer computed. Returns (prefix, x) after the layer."""
        P = prefix.shape[1]
        attention = self.self_attn
        q_prefix, k_prefix, v_prefix = attention.project(self.input_layernorm(prefix), cos[:, :P], sin[:, :P])
        q, k, v = attention.project(self.input_layernorm(x), cos[:, P:], sin[:, P:])
        rows = (x.shape[0], -1, -1, -1)
        k, v = torch.cat([k_prefix.expand(rows), k], dim=2), torch.cat([v_prefix.expand(rows), v], dim=2)
        prefix = prefix + attention.attend(q_prefix, k_prefix, v_prefix)
        x = x + attention.attend(q, k, v)  # [B, T - P] queries over [B, T] keys, lower-right causal
        prefix = prefix + self.mlp(self.post_attention_layernorm(prefix))
        return prefix, x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, the decoder layers and the final norm (HF ``LlamaModel``)."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama with its language-model head; ``logits = lm_head(norm(decoder(embeddings)))``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def hidden_states(self, inputs_embeds: torch.Tensor, *, shared_prefix: int = 0) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, hidden]`` of a whole sequence, causal, no cache.

        ``shared_prefix`` P > 0: the first P positions of ``inputs_embeds`` are the same in every row (a
        system prompt); they run once, as a batch of one, and every row attends to their keys and values
        (``DecoderLayer.forward_shared_prefix``). The result is the same; the prefix's states are copied
        into every row of it. Training saves (B - 1) x P positions of every layer, forward and backward
        (the vicuna_v1 system prompt is 32 of the built-in world's 110-180 tokens a conversation).
        """
        B, T, _ = inputs_embeds.shape
        positions = torch.arange(T, device=inputs_embeds.device)[None]  # [1, T]: the same for every row
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        checkpointing = self.gradient_checkpointing and self.training
        if 0 < shared_prefix < T and B > 1:
            prefix, x = inputs_embeds[:1, :shared_prefix], inputs_embeds[:, shared_prefix:]
            for layer in self.model.layers:
                if checkpointing:
                    prefix, x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, prefix=prefix, use_reentrant=False)
                else:
                    prefix, x = layer(x, cos, sin, prefix=prefix)
            # The final norm over the whole [B, T, D], as the models of docs/WORLD_BUILDS.md were trained: norming
            # the prefix and x apart is the same math, but it sums the norm weight's gradient in another order,
            # and the world's chain, fed those last bits, built other models (SFT CHAIR_s 24.0% against 32.0%).
            return self.model.norm(torch.cat([prefix.expand(B, -1, -1), x], dim=1))
        x = inputs_embeds
        for layer in self.model.layers:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None):
        """Logits ``[B, T, vocab]`` for a whole (right-padded) batch."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        return self.lm_head(self.hidden_states(inputs_embeds))

    def forward_cached(self, inputs_embeds: torch.Tensor, cache: KVCache, *, attend_len: int | None = None,
                       n_new: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``inputs_embeds`` [B, T, hidden] as the next T positions of each cache row.

        Token t of row b goes to position ``cache.lengths[b] + t``, attends to the row's earlier positions
        and itself, and its key/value are written there. Afterwards ``cache.lengths += n_new`` (default T;
        pass the per-row count of real tokens when rows are right-padded). ``attend_len`` bounds the key
        positions looked at (prefill into empty rows passes T); the default, the whole cache, keeps
        shapes static for CUDA-graph capture. Returns final-normed hidden states [B, T, hidden].
        The caller keeps ``lengths + T <= cache.max_seq``.
        """
        B, T, _ = inputs_embeds.shape
        positions = cache.lengths[:, None] + torch.arange(T, device=inputs_embeds.device)  # [B, T]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache=cache, layer=i, positions=positions, attend_len=attend_len)
        cache.lengths.add_(T if n_new is None else n_new)
        return self.model.norm(x)
