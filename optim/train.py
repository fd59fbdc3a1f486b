"""One compact training loop for SFT, DPO, reward-model and PPO updates, on 1 or N processes.

    result = train(model, dataset, loss_fn, TrainConfig(out_dir=..., lr=...), collate_fn=...)

The recipe supplies what differs between methods: ``loss_fn(model, batch) -> (loss, metrics)``
(SFT cross-entropy, DPO on chosen/rejected, Bradley-Terry, ...), the examples (any indexable
sequence) and ``collate_fn`` (a list of examples -> one batch). Everything else is here:

- processes: ``python script.py`` or ``torchrun --nproc_per_node N script.py``; with N > 1 each
  process drives one device and holds a DDP replica of the model, or (``fsdp=True``) an FSDP2
  shard of it (``fully_shard`` per decoder layer, then the root);
- data: one deterministic permutation per epoch (from the seed), cut into global batches; each
  rank takes its contiguous slice of every global batch and walks it in micro-batches. The
  sequence of global batches does not depend on the number of processes. With
  ``group_by_length`` the global batch is sorted by ``dataset.length(i)`` instead, cut into
  micro-batches and dealt to the ranks (``rank_share_by_length``): each micro-batch holds
  examples of similar length and pads less, and the same examples make the same step (see
  "Loss normalisation") with fewer padded tokens computed;
- the update: gradients accumulated over ``global_batch / (micro_batch * world)`` micro-batches,
  AdamW on the trainable parameters only, linear warm-up + cosine decay, grad-norm clipping;
- safety: a checkpoint every ``save_every`` steps, written atomically and resumable, keeping the
  last ``keep_last``; a non-finite loss or gradient norm stops the run before the bad update;
- progress: a line every ``log_every`` seconds; every step's metrics in ``out_dir/metrics.jsonl``.

Loss normalisation. ``loss_fn`` returns the *mean* loss over the examples of its micro-batch.
Each micro-batch's loss is scaled by ``1 / accumulation`` and DDP/FSDP average gradients over
ranks, so the update uses the mean over all micro-batches of the global batch: with per-example
means, that is the mean over the global batch however it is split (N ranks x batch b gives the
same gradient as 1 rank x batch N*b). A loss that averages over *tokens* inside a micro-batch
weighs examples by their micro-batch's token count — common practice, but then the result
depends on the micro-batch size.

``loss_fn`` receives the wrapped model (DDP / FSDP) and must run it through its ``__call__``
(``model(input_ids, pixel_values)``) or ``hidden_states`` so that the wrappers' hooks run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import default_collate

from .distributed import all_reduce_sum, barrier, gather_objects, is_main_process, setup_distributed


@dataclass
class TrainConfig:
    out_dir: str
    lr: float = 1e-5
    weight_decay: float = 0.0  # applied to matrices only (dim >= 2), not to biases and norm weights
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03  # warm-up steps = ceil(warmup_ratio * total steps)
    epochs: int = 1
    max_steps: int | None = None  # when set, the run length in optimizer steps (overrides epochs)
    global_batch_size: int = 8  # examples per optimizer step, over all ranks
    micro_batch_size: int = 1  # examples per forward/backward on one rank
    # Cut each global batch into micro-batches of similar length (``dataset.length(i)``, sorted) and deal them
    # to the ranks (``rank_share_by_length``): with per-example mean losses the step is the same, the padding less.
    group_by_length: bool = False
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping (the norm is still logged)
    bf16: bool = True  # bfloat16 autocast on CUDA
    cpu_bf16: bool = False  # bfloat16 autocast on CPU too: fast on CPUs with AVX512-BF16 or AMX, slow elsewhere
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    save_every: int = 0  # checkpoint every this many steps (0: only at the end)
    keep_last: int = 2  # complete checkpoints to keep
    log_every: float = 10.0  # seconds between progress lines
    seed: int = 0
    fsdp: bool = False  # FSDP2 instead of DDP when world size > 1
    find_unused_parameters: bool = False  # DDP: allow trainable parameters that get no gradient in a step
    resume: bool = True  # continue from the newest complete checkpoint in out_dir


def batch_for_ranks(batch: int, micro: int, world: int) -> tuple[int, int]:
    """(global batch, micro-batch) near ``batch`` and ``micro`` that ``world`` ranks can split.

    The micro-batch is capped at ``batch // world`` (at least 1); the global batch is rounded down to a
    multiple of micro-batch x ranks, and is at least one micro-batch per rank. For recipes whose batch is
    an internal choice, not the user's: 32 with micro-batches of 16 gives (32, 16) on 1 or 2 ranks and
    (30, 10) on 3.
    """
    micro = max(1, min(micro, batch // world))
    return max(1, batch // (micro * world)) * micro * world, micro


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    total_steps: int
    metrics: dict = field(default_factory=dict)  # the last step's metrics
    checkpoint: str | None = None  # the final checkpoint's directory


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became inf/nan; the run stopped before applying that update."""


# ---------------------------------------------------------------------------------------------
# the learning-rate schedule and the data order
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay to 0.

    Warm-up: ``peak * (step + 1) / warmup_steps`` for ``step < warmup_steps``; then
    ``peak * 0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps)))``
    (cosine annealing, Loshchilov & Hutter 2017, without restarts). This is the schedule of the
    released CSR / RLAIF-V / LLaVA-RLHF code (Hugging Face's cosine-with-warm-up), except that there
    the first warm-up step has lr 0.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def global_batch_indices(n_examples: int, global_batch_size: int, *, seed: int, epoch: int, batch: int) -> list[int]:
    """The example indices of global batch ``batch`` of ``epoch``: a slice of a fixed permutation.

    The permutation of epoch e is drawn from ``numpy.random.default_rng([seed, e])``, so it depends
    only on (seed, epoch) — not on the number of processes, and not on where a run was resumed.
    An epoch has ``n_examples // global_batch_size`` batches; the remainder is skipped.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[batch * global_batch_size:(batch + 1) * global_batch_size].tolist()


# ---------------------------------------------------------------------------------------------
# RNG state (python, numpy, torch, cuda), as tensors and plain values so torch.load(weights_only)
# ---------------------------------------------------------------------------------------------


def rank_share_by_length(batch: list[int], length, *, micro_batch_size: int, rank: int, world: int) -> list[int]:
    """This rank's examples of a global batch under ``group_by_length``, in the order it walks them.

    The batch is sorted by ``length(i)`` (stably: ties keep the permutation's order) and cut into
    micro-batches, which are dealt to the ranks back and forth -- 0, 1, ..., W-1, then W-1, ..., 0,
    and so on -- so that each rank gets short and long ones alike and none waits long for the others at
    the gradient all-reduce. Every micro-batch has the same size, so with per-example mean losses the
    step is the one the whole batch makes, however it is dealt. One rank: the sorted batch.
    """
    ordered = sorted(batch, key=length)
    mine = []
    for j in range(len(ordered) // micro_batch_size):
        turn, seat = divmod(j, world)
        if (seat if turn % 2 == 0 else world - 1 - seat) == rank:
            mine += ordered[j * micro_batch_size:(j + 1) * micro_batch_size]
    return mine


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# checkpoints: out_dir/ckpt-000100/{trainable.pt, optimizer.pt, trainer_state.pt}
# ---------------------------------------------------------------------------------------------

_CKPT = re.compile(r"ckpt-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first (``*.tmp`` directories are unfinished)."""
    out_dir = Path(out_dir)
    found = [p for p in out_dir.glob("ckpt-*") if p.is_dir() and _CKPT.search(p.name)]
    return sorted(found, key=lambda p: int(_CKPT.search(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def load_trainable(model: nn.Module, ckpt_dir: str | Path) -> None:
    """Load a checkpoint's trainable weights (``trainable.pt``) into ``model`` (plain, DDP-inner or FSDP).

    The checkpoint must hold exactly the model's trainable parameters (e.g. the same LoRA modules).
    """
    ckpt_dir = Path(ckpt_dir)
    state = torch.load(ckpt_dir / "trainable.pt", map_location="cpu", weights_only=True)
    expected = set(_trainable_names(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"checkpoint {ckpt_dir} does not match the model's trainable parameters: missing "
                         f"{missing[:3]} ({len(missing)}), unexpected {extra[:3]} ({len(extra)}); was it "
                         "written for a model with the same LoRA / freezing?")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer, trainer_state: dict,
                    keep_last: int) -> Path:
    """Write ``out_dir/ckpt-{step:06d}`` atomically: into ``ckpt-{step:06d}.tmp``, then one rename.

    Holds the trainable weights (full tensors even under FSDP: gathered to rank 0's CPU), the
    optimizer state (keyed by parameter name), and ``trainer_state`` plus every rank's RNG state.
    Collective: every rank calls it; only rank 0 writes; the others wait at a barrier. Afterwards
    only the newest ``keep_last`` checkpoints remain.
    """
    weights = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    rng = gather_objects(_rng_state())
    final = out_dir / f"ckpt-{step:06d}"
    if is_main_process():
        tmp = out_dir / f"ckpt-{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(weights, tmp / "trainable.pt")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save({**trainer_state, "rng": rng}, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _resume(ckpt: Path, model: nn.Module, optimizer, rank: int, world: int) -> dict:
    """Load weights, optimizer state and this rank's RNG state from ``ckpt``; return its trainer state."""
    load_trainable(model, ckpt)
    optim_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    if len(state["rng"]) == world:
        _set_rng_state(state["rng"][rank])
    elif is_main_process():
        print(f"note: {ckpt} was written by {len(state['rng'])} processes, now {world}: RNG streams restart "
              "(data order is unaffected)", flush=True)
    return state


# ---------------------------------------------------------------------------------------------
# wrapping the model for DDP / FSDP2
# ---------------------------------------------------------------------------------------------


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``'s module tree whose parameters and buffers live on the meta device."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _fsdp_shard(model: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """An FSDP2-sharded copy of ``model`` (``fully_shard`` per Llama decoder layer, then the root),
    initialised from rank 0's weights. ``model`` itself stays as it is (on its device, usually CPU).

    The copy is built on the meta device, sharded, materialised on ``device`` and filled by
    broadcasting rank 0's full state dict, so no rank holds two full copies on the accelerator.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from lvlm.llama import DecoderLayer

    policy = MixedPrecisionPolicy()
    if bf16 and device.type == "cuda":  # compute in bf16, reduce gradients in fp32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shell = _meta_copy(model)
    for module in shell.modules():
        if isinstance(module, DecoderLayer):
            fully_shard(module, mp_policy=policy)
    fully_shard(shell, mp_policy=policy)
    if hasattr(shell, "hidden_states"):  # so that loss_fn may call model.hidden_states(...) too
        register_fsdp_forward_method(shell, "hidden_states")
    shell.to_empty(device=device)
    full = model.state_dict() if is_main_process() else {}
    set_model_state_dict(shell, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buf in model.named_buffers():  # non-persistent buffers are not in the state dict
            shell.get_buffer(name).copy_(buf)
    return shell


@torch.no_grad()
def _copy_trainable_back(shell: nn.Module, model: nn.Module) -> None:
    """Gather each trainable parameter of the FSDP ``shell`` (collective) into the plain ``model``."""
    for name, p in shell.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            target = model.get_parameter(name)
            target.copy_(full.to(target.device, target.dtype))


def _grad_sync(model: nn.Module, enabled: bool):
    """Context in which backward() does (or, on accumulation micro-steps, does not) reduce gradients."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of the gradients (over all ranks under FSDP), clipped to ``max_norm`` if given."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):  # FSDP: each rank has the norm of its shards; combine them
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return norm


def _check_config(c: TrainConfig) -> None:
    positive = {"lr": c.lr, "global_batch_size": c.global_batch_size, "micro_batch_size": c.micro_batch_size,
                "keep_last": c.keep_last}
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"TrainConfig.{name} must be > 0, got {value!r}")
    if c.save_every < 0 or not 0.0 <= c.warmup_ratio <= 1.0 or (c.grad_clip is not None and c.grad_clip <= 0):
        raise ValueError(f"TrainConfig: need save_every >= 0, 0 <= warmup_ratio <= 1 and grad_clip > 0 or None; got "
                         f"save_every={c.save_every}, warmup_ratio={c.warmup_ratio}, grad_clip={c.grad_clip}")


def _format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def train(model: nn.Module, dataset, loss_fn, config: TrainConfig, *, collate_fn=default_collate) -> TrainResult:
    """Train ``model`` in place on ``dataset`` by minimising ``loss_fn``; see the module docstring.

    Args:
        model: the module to train; its parameters with ``requires_grad`` are trained (for LoRA:
            the adapters). Every rank must pass the same model (DDP/FSDP start from rank 0's weights).
        dataset: indexable examples (``len`` and ``[i]``).
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``: ``loss`` a scalar tensor, the mean over
            the micro-batch's examples; ``metrics`` a dict of scalars (floats or 0-d tensors), averaged
            over the step — except ``"tokens"``, summed, which gives the tokens/s figure. May also
            return ``loss`` alone.
        config: ``TrainConfig``.
        collate_fn: list of examples -> batch (tensors anywhere inside dicts/lists/tuples are moved
            to this rank's device).

    Returns:
        ``TrainResult`` with the last step's metrics. The model is left trained, unwrapped, in place
        (under FSDP the trainable weights are gathered back into it). A rerun of a finished run
        (``out_dir/done.json`` present) trains nothing: it loads the final trainable weights into the
        model and returns the stored result.

    Raises:
        NonFiniteLossError: the loss or gradient norm of a step was inf/nan (the update is not applied;
            the last checkpoint on disk is the last good state).
        ValueError: inconsistent batch sizes, an empty dataset, no trainable parameters, an
            ``out_dir`` holding checkpoints of another run, or ``group_by_length`` with a dataset
            that has no ``length(index)``.
    """
    c = config
    _check_config(c)
    if c.group_by_length and not callable(getattr(dataset, "length", None)):
        raise ValueError(f"TrainConfig.group_by_length needs a dataset with a length(index) method; "
                         f"{type(dataset).__name__} has none")
    rank, world, device = setup_distributed()
    out_dir = Path(c.out_dir)
    if c.global_batch_size % (c.micro_batch_size * world):
        raise ValueError(f"global_batch_size={c.global_batch_size} is not divisible by micro_batch_size="
                         f"{c.micro_batch_size} x world_size={world}")
    accumulation = c.global_batch_size // (c.micro_batch_size * world)
    per_rank = c.micro_batch_size * accumulation  # examples of each global batch this rank sees
    steps_per_epoch = len(dataset) // c.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} examples, fewer than one global batch "
                         f"({c.global_batch_size})")
    total_steps = c.max_steps if c.max_steps is not None else c.epochs * steps_per_epoch
    if total_steps < 1:
        raise ValueError(f"nothing to train: max_steps={c.max_steps}, epochs={c.epochs}")
    warmup_steps = math.ceil(c.warmup_ratio * total_steps)
    log = print if is_main_process() else (lambda *a, **k: None)

    # -- a finished run: load its result and stop ----------------------------------------------
    done_file = out_dir / "done.json"
    if done_file.is_file():
        done = json.loads(done_file.read_text())
        load_trainable(model, done["checkpoint"])
        log(f"{out_dir} holds a finished run ({done['step']} steps); loaded its weights from {done['checkpoint']}")
        return TrainResult(done["step"], done["total_steps"], done["metrics"], done["checkpoint"])
    if list_checkpoints(out_dir) and not c.resume:
        raise ValueError(f"{out_dir} already holds checkpoints; pass resume=True to continue that run or "
                         "choose an empty out_dir")
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob("ckpt-*.tmp"):  # a save interrupted by a crash
            shutil.rmtree(stale, ignore_errors=True)
    barrier()

    # -- model, optimizer ------------------------------------------------------------------------
    random.seed(c.seed + rank)
    np.random.seed(c.seed + rank)
    torch.manual_seed(c.seed + rank)  # dropout streams differ per rank
    if c.activation_checkpointing:
        for module in model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
    use_fsdp = c.fsdp and world > 1
    if c.fsdp and world == 1:
        log("note: fsdp=True with one process: training without FSDP")
    if use_fsdp:
        inner = _fsdp_shard(model, device, c.bf16)  # the sharded copy that trains
        wrapped = inner
    else:
        inner = model.to(device)
        wrapped = DistributedDataParallel(inner, device_ids=[device] if device.type == "cuda" else None,
                                          find_unused_parameters=c.find_unused_parameters) if world > 1 else inner
    named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    params = [p for _, p in named]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=c.lr, betas=tuple(c.betas))

    # -- resume ----------------------------------------------------------------------------------
    step, last_metrics = 0, {}
    ckpt = latest_checkpoint(out_dir) if c.resume else None
    if ckpt is not None:
        state = _resume(ckpt, inner, optimizer, rank, world)
        for key in ("global_batch_size", "seed"):
            if state["config"][key] != getattr(c, key):
                raise ValueError(f"{ckpt} was written with {key}={state['config'][key]}, this run has "
                                 f"{getattr(c, key)}: the data order would differ; use another out_dir")
        step = state["step"]
        log(f"resuming from {ckpt} at step {step}/{total_steps}")
        if (out_dir / "metrics.jsonl").is_file():  # drop the lines of steps after the checkpoint
            kept = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
            kept = [m for m in kept if m["step"] <= step]
            last_metrics = {k: v for k, v in kept[-1].items() if k not in ("step", "epoch", "time")} if kept else {}
        barrier()  # every rank has read the file before rank 0 rewrites it
        if is_main_process() and (out_dir / "metrics.jsonl").is_file():
            (out_dir / "metrics.jsonl.tmp").write_text("".join(json.dumps(m) + "\n" for m in kept))
            (out_dir / "metrics.jsonl.tmp").replace(out_dir / "metrics.jsonl")

    n_trainable = sum(p.numel() for p in params) if not use_fsdp else sum(
        model.get_parameter(n).numel() for n, _ in named)
    log(f"training: {total_steps} steps ({steps_per_epoch}/epoch), global batch {c.global_batch_size} = "
        f"{world} rank(s) x {accumulation} accumulation x {c.micro_batch_size} micro, "
        f"{n_trainable:,} trainable parameters, {'FSDP2' if use_fsdp else 'DDP' if world > 1 else 'one process'}"
        f" on {device}")
    use_bf16 = c.bf16 if device.type == "cuda" else c.cpu_bf16 if device.type == "cpu" else False
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    was_training = model.training
    wrapped.train()

    # -- steps -----------------------------------------------------------------------------------
    metrics: dict = last_metrics
    started, last_log, tokens_since_log, first_step = time.time(), time.time(), 0.0, step
    saved_at = ckpt
    while step < total_steps:
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        indices = global_batch_indices(len(dataset), c.global_batch_size, seed=c.seed, epoch=epoch,
                                       batch=batch_in_epoch)
        if c.group_by_length:
            indices = rank_share_by_length(indices, dataset.length, micro_batch_size=c.micro_batch_size,
                                           rank=rank, world=world)
        else:
            indices = indices[rank * per_rank:(rank + 1) * per_rank]
        lr = lr_at(step, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=c.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss_sum = torch.zeros((), device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        for i in range(accumulation):
            batch = _to_device(collate_fn([dataset[j] for j in indices[i * c.micro_batch_size:
                                                                      (i + 1) * c.micro_batch_size]]), device)
            with _grad_sync(wrapped, enabled=i == accumulation - 1):
                with autocast():
                    out = loss_fn(wrapped, batch)
                loss, micro_metrics = out if isinstance(out, tuple) else (out, {})
                if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
                    raise ValueError("loss_fn must return a scalar tensor that requires grad (got "
                                     f"{type(loss).__name__} {getattr(loss, 'shape', '')})")
                (loss / accumulation).backward()
            loss_sum += loss.detach().float()
            for k, v in micro_metrics.items():
                v = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float32)
                if v.numel() != 1:
                    raise ValueError(f"loss_fn metric {k!r} must be a scalar, got shape {tuple(v.shape)}")
                metric_sums[k] = metric_sums.get(k, 0.0) + v.to(device)

        # The loss and metrics summed over micro-batches and ranks, and the gradient norm (already
        # global), read in the one host sync of the step.
        keys = sorted(metric_sums)
        totals = all_reduce_sum(torch.stack([loss_sum] + [metric_sums[k].reshape(()) for k in keys]))
        grad_norm = _clip_grad_norm(params, c.grad_clip)  # clips in place; applied only if all is finite
        *totals, grad_norm = torch.cat([totals, grad_norm.reshape(1).to(totals)]).tolist()
        n_micro = accumulation * world
        step_loss = totals[0] / n_micro
        if not math.isfinite(step_loss):
            raise NonFiniteLossError(
                f"non-finite loss ({step_loss}) at step {step + 1}/{total_steps} (epoch {epoch}); the update was "
                f"not applied. Last good checkpoint: {saved_at or 'none'}")
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm ({grad_norm}) at step {step + 1}/{total_steps} (epoch {epoch}); the "
                f"update was not applied. Last good checkpoint: {saved_at or 'none'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        metrics = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm}
        metrics.update({k: (v if k == "tokens" else v / n_micro) for k, v in zip(keys, totals[1:])})
        if is_main_process():
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, "time": round(time.time() - started, 3),
                                    **metrics}) + "\n")
        tokens_since_log += metrics.get("tokens", 0.0)
        now = time.time()
        if now - last_log >= c.log_every or step == total_steps:
            rate = (f"{tokens_since_log / max(now - last_log, 1e-9):,.0f} tok/s" if "tokens" in metrics else
                    f"{(step - first_step) * c.global_batch_size / max(now - started, 1e-9):.2f} examples/s")
            eta = (now - started) / (step - first_step) * (total_steps - step)
            log(f"step {step}/{total_steps}  loss {step_loss:.4f}  lr {lr:.2e}  grad_norm {grad_norm:.3f}  "
                f"{rate}  elapsed {_format_seconds(now - started)}  eta {_format_seconds(eta)}", flush=True)
            last_log, tokens_since_log = now, 0.0

        if (c.save_every and step % c.save_every == 0) or step == total_steps:
            saved_at = save_checkpoint(out_dir, step, inner, optimizer,
                                       {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch + 1,
                                        "config": asdict(c)}, c.keep_last)

    # -- finish ----------------------------------------------------------------------------------
    if use_fsdp:
        _copy_trainable_back(inner, model)
    model.train(was_training)
    if is_main_process():
        record = {"step": step, "total_steps": total_steps, "metrics": metrics,
                  "checkpoint": str(saved_at) if saved_at else None}
        (out_dir / "done.json.tmp").write_text(json.dumps(record, indent=2) + "\n")
        (out_dir / "done.json.tmp").replace(done_file)
    barrier()
    return TrainResult(step, total_steps, metrics, str(saved_at) if saved_at else None)
