"""Capturing the decode step as a CUDA graph, and replaying it (ANCHORS §6; the gpt-fast recipe).

At batch 1 a 7B decoder step is a few hundred small kernels. Launched one by one from Python, the
GPU idles between them; recorded once into a ``torch.cuda.CUDAGraph`` and replayed, they run back to
back and the step approaches the memory-bandwidth limit. The rules a graph imposes:

- static shapes and addresses: the step reads and writes only preallocated buffers (the KV cache,
  the per-row state of ``search.engine``), updated in place; positions and lengths are device tensors;
- no host syncs inside (no ``.item()``, no Python branching on tensor values);
- warm up before capture, on a side stream, so lazy initialisation (cuBLAS handles, workspaces,
  autotuning) happens outside the recording;
- one graph per batch-size bucket (the engine rounds the number of rows up to a power of two), all
  sharing one memory pool (``torch.cuda.graph_pool_handle()``): only one graph runs at a time, so
  their intermediate tensors can share memory.

Prefill stays eager: it runs once per prompt batch and its shapes vary.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def capture_step(step: Callable[[], None], *, pool, state: Sequence[torch.Tensor], done: torch.Tensor,
                 warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Record ``step`` (a no-argument function that updates buffers in place) as a CUDA graph.

    ``state``: every buffer the step mutates that holds live data (the per-row state and the cache
    lengths); they are saved before the warm-up runs and restored afterwards, so capturing leaves
    the decoder exactly as it was. ``done``: the per-row finished flags; during warm-up every row is
    marked finished, so the warm-up steps run the very same kernels but advance no row (a finished
    row writes only to scratch places: the output buffers' spare column and the cache position just
    past its valid prefix). Capture itself launches nothing, it only records.
    Returns the graph; ``graph.replay()`` runs one step.
    """
    saved = [t.clone() for t in state]
    done.fill_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    for t, value in zip(state, saved):
        t.copy_(value)
    return graph
