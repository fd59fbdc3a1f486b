"""A preallocated, static key/value cache (the gpt-fast layout, ANCHORS §6).

Every layer's keys and values live in one tensor each, ``[layers, batch, kv_heads, max_seq, head_dim]``,
allocated once. Row ``b`` holds ``lengths[b]`` valid positions; the next token of row ``b`` is written at
position ``lengths[b]``. ``lengths`` is a device tensor updated in place, so the decode step has static
shapes and addresses and can be captured as a CUDA graph: nothing in it reads a value back to the host.

Rows are independent sequences: a prompt is prefilled into one row and then *forked* (copied) into as
many rows as there are beams or samples; pruning beams *reorders* rows. Both are one ``index_select``
over the batch dimension, done in place so the tensors keep their addresses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LlamaConfig


@dataclass
class KVCache:
    k: torch.Tensor  # [layers, batch, kv_heads, max_seq, head_dim]
    v: torch.Tensor  # [layers, batch, kv_heads, max_seq, head_dim]
    lengths: torch.Tensor  # [batch] int64: valid positions per row (= position of the next token)

    @classmethod
    def allocate(cls, config: LlamaConfig, batch: int, max_seq: int, *, dtype=torch.float32, device="cpu"):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_seq, config.head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq(self) -> int:
        return self.k.shape[3]

    def reset_(self) -> "KVCache":
        """Forget every row (keys and values are overwritten on the next write)."""
        self.lengths.zero_()
        return self

    def reorder_(self, rows: torch.Tensor) -> "KVCache":
        """Row ``i`` becomes a copy of old row ``rows[i]`` (``rows``: [batch] long, on the cache's device).

        Forking one prefilled prompt into n rows is ``reorder_(torch.zeros(n))`` on a cache whose row 0
        holds the prompt; pruning beams is ``reorder_(kept_parents)``. In place: addresses stay valid
        for a captured CUDA graph. Done layer by layer, so the scratch memory is one layer's worth.
        """
        if rows.shape != (self.batch,):
            raise ValueError(f"reorder_ expects {self.batch} row indices, got shape {tuple(rows.shape)}")
        for layer in range(self.k.shape[0]):
            self.k[layer].copy_(self.k[layer].index_select(0, rows))
            self.v[layer].copy_(self.v[layer].index_select(0, rows))
        self.lengths.copy_(self.lengths.index_select(0, rows))
        return self

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Write new keys/values ``[batch, kv_heads, T, head_dim]`` of ``layer`` at ``positions`` [batch, T]."""
        index = positions[:, None, :, None].expand_as(k)
        self.k[layer].scatter_(2, index, k.to(self.k.dtype))
        self.v[layer].scatter_(2, index, v.to(self.v.dtype))
