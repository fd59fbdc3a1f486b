"""The decoding engine: prefill once, fork the cache, decode every live row one token per step.

The released CSR code calls Hugging Face ``generate`` once per sentence at batch 1, re-encoding the
image and the whole prefix each time (ANCHORS §1). This engine pays for a prompt once:

    prefill   P prompts (images included) in one eager batched call -> cache rows 0..P-1
    fork      prompt p -> rows [p*n, (p+1)*n)          (one in-place row copy of the cache)
    decode    all rows together, one token per step    (``decode_step``; a CUDA graph on GPU)
    reorder   keep / duplicate rows when beams are pruned (``KVCache.reorder_``)

and a sentence-level beam search (``search.sentence_beam``) continues a beam from the cache row
that already holds its sentences: no prefix is ever encoded twice.

The decode step (``decode_step``)
---------------------------------
Each row has ``next_logits`` (the model's logits for its next token, float32) and per-row settings
and counters, all in preallocated device tensors (``RowState``). One step, for every row at once:

1. ``logprobs = log_softmax(next_logits)``: the log-probabilities of the *unmodified* model at
   temperature 1. These are what is recorded for each token, whatever the sampling settings: the beam
   search's self-score, DPO and PPO all need ``log pi(token | prefix)`` of the model itself.
2. choose the token: greedy, Gumbel-max sampling with temperature / top-k / top-p and a per-row
   counter-based RNG, or CSR's diverse-group greedy (``search.sampling_ops``). The image placeholder
   id is never chosen: a response holding it could not be scored again by a full forward, which
   would read it as an image slot;
3. write token and log-prob into the output buffers at the row's own position ``n_generated``;
4. stop flags: a row finishes on an end-of-sequence id ("eos"), on a sentence-delimiter id
   ("delimiter", a per-call option), or when it has generated its token budget ("length");
5. feed the token through the model (``forward_cached`` with ``n_new = active``): rows that were
   running at the start of the step append it to their cache, so the token that ended a sentence is
   in the cache and ``next_logits`` is ready for the next sentence. Finished rows keep feeding the pad
   token; their lengths do not advance (their write lands on the scratch position just past their
   prefix, harmless) and their ``next_logits`` are kept.

No host sync inside the step: no ``.item()``, no ``.tolist()``, no Python branch on a tensor value.
The generate loop reads ``done.all()`` back to the host only every ``sync_every`` steps.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from lvlm.kv_cache import KVCache

from .cuda_graph import capture_step
from .sampling_ops import diverse_greedy_tokens, mix_seeds, sample_tokens, seed_keys
from .sampling_ops import vocab_keys as make_vocab_keys

# Finish reasons, as stored in ``RowState.finish_reason``.
RUNNING, EOS, DELIMITER, LENGTH = 0, 1, 2, 3
FINISH_REASON_NAMES = {RUNNING: "running", EOS: "eos", DELIMITER: "delimiter", LENGTH: "length"}


# ---------------------------------------------------------------------------------------------
# Per-row state and the step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepConfig:
    """What the step does that is fixed for a whole run (one CUDA graph per config and batch bucket).

    mode: "greedy" (argmax), "sample" (per-row temperature, 0 = greedy), or "diverse" (CSR's released
    proposal: ``diverse_groups`` greedy groups with a Hamming ``diversity_penalty``).
    filter_logits: apply the per-row top-k / top-p (costs a sort of the vocabulary; off when unused).
    """

    mode: str = "sample"
    filter_logits: bool = False
    diverse_groups: int = 0
    diversity_penalty: float = 3.0


@dataclass
class RowState:
    """Every per-row tensor the decode step reads or writes. B rows, V vocabulary, W output slots."""

    next_logits: torch.Tensor  # [B, V] float32: logits for the row's next token
    tokens: torch.Tensor  # [B, W + 1] int64: generated tokens; the last column is scratch for finished rows
    logprobs: torch.Tensor  # [B, W + 1] float32: model log-prob (temperature 1) of each generated token
    n_generated: torch.Tensor  # [B] int64: tokens generated in this run (also the RNG counter)
    done: torch.Tensor  # [B] bool
    finish_reason: torch.Tensor  # [B] int64: RUNNING / EOS / DELIMITER / LENGTH
    budget: torch.Tensor  # [B] int64: max tokens this run
    seed_keys: torch.Tensor  # [B] int64: the RNG key of the row's seed (``sampling_ops.seed_keys``)
    temperature: torch.Tensor  # [B] float32, <= 0 means greedy
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32, 1 = off
    group: torch.Tensor  # [B] int64: diverse mode, the row's group index
    block: torch.Tensor  # [B] int64: diverse mode, rows with equal block are siblings
    is_eos: torch.Tensor  # [V] bool: end-of-sequence ids
    is_delimiter: torch.Tensor  # [V] bool: sentence-delimiter ids (may be all False)
    is_banned: torch.Tensor  # [V] bool: ids never chosen (the image placeholder)
    vocab_keys: torch.Tensor  # [V] int64: the RNG key of each vocabulary entry
    pad_id: int  # token fed by finished rows

    _PER_ROW = ("next_logits", "tokens", "logprobs", "n_generated", "done", "finish_reason", "budget", "seed_keys",
                "temperature", "top_k", "top_p", "group", "block")

    @classmethod
    def allocate(cls, batch: int, vocab_size: int, max_new_tokens: int, *, pad_id: int, device) -> "RowState":
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            next_logits=zeros(batch, vocab_size, dtype=torch.float32),
            tokens=zeros(batch, max_new_tokens + 1),
            logprobs=zeros(batch, max_new_tokens + 1, dtype=torch.float32),
            n_generated=zeros(batch), done=zeros(batch, dtype=torch.bool), finish_reason=zeros(batch),
            budget=zeros(batch), seed_keys=zeros(batch), temperature=zeros(batch, dtype=torch.float32),
            top_k=zeros(batch), top_p=zeros(batch, dtype=torch.float32), group=zeros(batch), block=zeros(batch),
            is_eos=zeros(vocab_size, dtype=torch.bool), is_delimiter=zeros(vocab_size, dtype=torch.bool),
            is_banned=zeros(vocab_size, dtype=torch.bool), vocab_keys=make_vocab_keys(vocab_size, device),
            pad_id=pad_id,
        )

    def per_row_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self._PER_ROW]

    def rows(self, n: int) -> "RowState":
        """A view of the first ``n`` rows (same storage: writes go to this state)."""
        return dataclasses.replace(self, **{name: getattr(self, name)[:n] for name in self._PER_ROW})


def cache_rows(cache: KVCache, n: int) -> KVCache:
    """A view of the first ``n`` rows of ``cache`` (same storage)."""
    return KVCache(k=cache.k[:, :n], v=cache.v[:, :n], lengths=cache.lengths[:n])


def decode_step(lm, cache: KVCache, state: RowState, config: StepConfig, attend_len: int | None = None) -> None:
    """One token for every row of ``state`` / ``cache`` (both B rows), in place, without host syncs.

    lm: the ``LlamaForCausalLM`` (``model.language_model``). See the module docstring for the five
    parts. The same function runs eagerly (CPU, or ``use_cuda_graph=False``) and inside a CUDA graph.
    attend_len: attend to cache positions [0, attend_len) only (eager runs pass a bound on the
    longest row, known on the host without a sync); None, the whole cache: static, for the graph.
    """
    active = ~state.done  # [B]: rows running at the start of this step
    logprobs = torch.log_softmax(state.next_logits, dim=-1)  # the model's own distribution, temperature 1
    logits = state.next_logits.masked_fill(state.is_banned, float("-inf"))  # what the choice may pick from

    if config.mode == "greedy":
        token = logits.argmax(dim=-1)
    elif config.mode == "sample":
        filters = (state.top_k, state.top_p) if config.filter_logits else (None, None)
        token = sample_tokens(logits, state.seed_keys, state.n_generated, state.temperature, *filters,
                              vocab=state.vocab_keys)
    else:  # "diverse"
        token = diverse_greedy_tokens(logprobs.masked_fill(state.is_banned, float("-inf")), state.group,
                                      state.block, active, config.diverse_groups, config.diversity_penalty)
    token = torch.where(active, token, state.pad_id)  # [B]
    token_logprob = logprobs.gather(1, token[:, None])  # [B, 1]

    # Record at the row's own position; finished rows write into the scratch column.
    column = torch.where(active, state.n_generated, state.tokens.shape[1] - 1)[:, None]  # [B, 1]
    state.tokens.scatter_(1, column, token[:, None])
    state.logprobs.scatter_(1, column, token_logprob)
    state.n_generated.add_(active.long())

    reason = torch.where(state.is_eos.index_select(0, token), EOS,
                         torch.where(state.is_delimiter.index_select(0, token), DELIMITER,
                                     torch.where(state.n_generated >= state.budget, LENGTH, RUNNING)))
    finished_now = active & (reason != RUNNING)
    state.finish_reason.copy_(torch.where(finished_now, reason, state.finish_reason))
    state.done.logical_or_(finished_now)

    # Feed the token: running rows append it to their cache and get logits for the next one.
    hidden = lm.forward_cached(lm.embed(token[:, None]), cache, attend_len=attend_len, n_new=active.long())
    new_logits = lm.lm_head(hidden[:, 0]).float()  # [B, V]
    state.next_logits.copy_(torch.where(active[:, None], new_logits, state.next_logits))


# ---------------------------------------------------------------------------------------------
# Prompts and results
# ---------------------------------------------------------------------------------------------


def as_prompt(prompt, where: str = "prompt") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalise a prompt to ``(input_ids [T] int64 CPU, pixel_values [N, 3, H, W] or None)``.

    Accepted: a list / 1-D tensor of token ids, or a pair ``(input_ids, pixel_values or None)``, where
    ``input_ids`` already repeats the image token once per image feature (the Hugging Face convention).
    """
    if isinstance(prompt, tuple):
        if len(prompt) != 2:
            raise ValueError(f"{where}: expected (input_ids, pixel_values), got a tuple of {len(prompt)}")
        ids, pixels = prompt
    else:
        ids, pixels = prompt, None
    ids = torch.as_tensor(ids, dtype=torch.long).cpu()
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"{where}: input_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    if pixels is not None:
        if not isinstance(pixels, torch.Tensor):
            raise ValueError(f"{where}: pixel_values must be a tensor or None, got {type(pixels).__name__}")
        if pixels.dim() == 3:
            pixels = pixels[None]
        if pixels.dim() != 4:
            raise ValueError(f"{where}: pixel_values must be [N, 3, H, W], got shape {tuple(pixels.shape)}")
    return ids, pixels


@dataclass
class DecodeOutput:
    """What one ``Decoder.run_until_stop`` produced, copied to the CPU (n rows)."""

    tokens: torch.Tensor  # [n, W] int64; row i is valid up to n_tokens[i]
    logprobs: torch.Tensor  # [n, W] float32: model log-prob (temperature 1) of each token
    n_tokens: torch.Tensor  # [n] int64
    finish_reason: list[str]  # "eos" | "delimiter" | "length"

    def row(self, i: int) -> tuple[list[int], torch.Tensor]:
        n = int(self.n_tokens[i])
        return self.tokens[i, :n].tolist(), self.logprobs[i, :n].clone()


@dataclass
class Generation:
    """One generated continuation of one prompt."""

    prompt_index: int
    sample_index: int
    tokens: list[int]  # generated token ids, the stopping token included
    logprobs: torch.Tensor  # [len(tokens)] float32: log pi(token | prefix) at temperature 1
    finish_reason: str  # "eos" | "delimiter" | "length"

    @property
    def logprob_sum(self) -> float:
        return float(self.logprobs.sum())


def _per_row(value, n: int, name: str, dtype) -> torch.Tensor:
    """A scalar broadcast to ``n`` rows, or a length-``n`` sequence, as a CPU tensor."""
    t = torch.as_tensor(value, dtype=dtype)
    if t.dim() == 0:
        return t.expand(n).clone()
    if t.shape != (n,):
        raise ValueError(f"{name}: expected a scalar or {n} values (one per row), got shape {tuple(t.shape)}")
    return t


# ---------------------------------------------------------------------------------------------
# The decoder session
# ---------------------------------------------------------------------------------------------


class Decoder:
    """A decoding session: the KV cache, the per-row state, and the operations on rows.

    model: a ``LlavaForConditionalGeneration``. max_rows: how many rows (prompts x beams x candidates)
    can be alive at once. max_seq: cache positions per row (longest prompt + every token it will
    generate + 1 scratch position). max_new_tokens: the most tokens one ``run_until_stop`` may generate
    per row. eos_ids: end-of-sequence ids (default: the config's ``eos_token_id``). The cache has the
    model's dtype (bf16 on GPU when the model is bf16). use_cuda_graph: capture the decode step per
    batch bucket on CUDA (ignored on CPU). sync_every: steps between reads of the done flags.
    compact: at those reads, move still-running rows to the front once at most half of the stepped rows
    run, and step fewer rows (finished rows cost a full step each otherwise: all of their attention
    and, on CPU, all of their compute). Callers never see it: rows are put back after the run.
    """

    def __init__(self, model, *, max_rows: int, max_seq: int, max_new_tokens: int,
                 eos_ids: Sequence[int] | None = None, use_cuda_graph: bool = True, sync_every: int = 8,
                 compact: bool = True):
        if max_rows < 1 or max_new_tokens < 1 or sync_every < 1:
            raise ValueError(f"Decoder: max_rows ({max_rows}), max_new_tokens ({max_new_tokens}) and sync_every "
                             f"({sync_every}) must be >= 1")
        self.model = model
        self.lm = model.language_model
        text = model.config.text_config
        self.vocab_size = text.vocab_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else text.pad_token_id
        self.pad_id = pad if pad is not None and 0 <= pad < self.vocab_size else 0
        self.max_rows, self.max_seq, self.max_new_tokens = max_rows, max_seq, max_new_tokens
        self.sync_every, self.compact = sync_every, compact
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda"
        self.cache = KVCache.allocate(text, max_rows, max_seq, dtype=self.dtype, device=self.device)
        self.state = RowState.allocate(max_rows, self.vocab_size, max_new_tokens, pad_id=self.pad_id,
                                       device=self.device)
        eos_ids = [text.eos_token_id] if eos_ids is None else list(eos_ids)
        self.state.is_eos.copy_(self._vocab_mask(eos_ids, "eos_ids"))
        image_token = model.config.image_token_index
        self.state.is_banned.copy_(self._vocab_mask([image_token] if 0 <= image_token < self.vocab_size else [],
                                                    "image_token_index"))
        self._graphs: dict = {}
        self._pool = None

    def _vocab_mask(self, ids: Sequence[int], name: str) -> torch.Tensor:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{name}: token ids {bad} lie outside the vocabulary [0, {self.vocab_size})")
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[ids] = True
        return mask.to(self.device)

    # -- rows -------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompts: Sequence) -> None:
        """Prefill ``prompts`` (see ``as_prompt``) into rows 0..P-1 in one batched eager call.

        Right-pads the prompts, concatenates their images in prompt order, runs
        ``model.prefill`` and keeps each row's last-token logits as its ``next_logits``.
        """
        items = [as_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        P = len(items)
        if not 1 <= P <= self.max_rows:
            raise ValueError(f"Decoder.prefill: {P} prompts for a decoder of {self.max_rows} rows")
        lengths = [len(ids) for ids, _ in items]
        if max(lengths) >= self.max_seq:
            raise ValueError(f"Decoder.prefill: a prompt of {max(lengths)} tokens leaves no room in a cache of "
                             f"{self.max_seq} positions")
        input_ids = torch.full((P, max(lengths)), self.pad_id, dtype=torch.long)
        for i, (ids, _) in enumerate(items):
            input_ids[i, : len(ids)] = ids
        images = [px for _, px in items if px is not None]
        pixels = torch.cat(images).to(self.device, self.dtype) if images else None
        logits = self.model.prefill(input_ids.to(self.device), torch.tensor(lengths, device=self.device),
                                    cache_rows(self.cache, P), pixels)
        self.state.next_logits[:P].copy_(logits.float())

    @torch.no_grad()
    def reorder(self, rows: Sequence[int] | torch.Tensor) -> None:
        """New row i becomes a copy of old row ``rows[i]`` (cache and ``next_logits``), for i < len(rows).

        Rows from ``len(rows)`` on keep their contents. Used for forking and for pruning beams.
        """
        rows = torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
        m = rows.numel()
        if m > self.max_rows or (m and (int(rows.min()) < 0 or int(rows.max()) >= self.max_rows)):
            raise ValueError(f"Decoder.reorder: {m} row indices (range {rows.min().item() if m else '-'}.."
                             f"{rows.max().item() if m else '-'}) for a decoder of {self.max_rows} rows")
        if m == 0:
            return
        span = max(m, int(rows.max()) + 1)  # only rows [0, span) take part: the copy costs span rows
        index = torch.arange(span)
        index[:m] = rows
        index = index.to(self.device)
        cache_rows(self.cache, span).reorder_(index)
        logits = self.state.next_logits[:span]
        logits.copy_(logits.index_select(0, index))

    def _permute_rows(self, order: torch.Tensor) -> None:
        """Row i becomes old row ``order[i]`` for i < len(order), in the cache and in every per-row state
        tensor (``order`` a permutation of 0..len-1). In place: captured graphs stay valid."""
        index = order.to(self.device)
        cache_rows(self.cache, len(order)).reorder_(index)
        for t in self.state.per_row_tensors():
            t[: len(order)].copy_(t[: len(order)].index_select(0, index))

    def fork(self, n: int, n_prompts: int) -> None:
        """Prompt row p -> rows [p*n, (p+1)*n), for p < n_prompts (one cache copy)."""
        if n_prompts * n > self.max_rows:
            raise ValueError(f"Decoder.fork: {n_prompts} prompts x {n} rows exceed the decoder's {self.max_rows} rows")
        self.reorder(torch.arange(n_prompts * n) // n)

    # -- decoding ---------------------------------------------------------------------------

    def _bucket(self, n: int) -> int:
        """Rows a step runs on: ``n`` eagerly; with graphs, the next power of two (at most max_rows)."""
        if not self.use_cuda_graph:
            return n
        return min(1 << (n - 1).bit_length(), self.max_rows)

    def _step_function(self, b: int, config: StepConfig):
        """The step on rows [0, b): eager, or the replay of the CUDA graph captured for (b, config)."""
        step = functools.partial(decode_step, self.lm, cache_rows(self.cache, b), self.state.rows(b), config)
        if not self.use_cuda_graph:
            return step
        key = (b, config)
        if key not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            self._graphs[key] = capture_step(step, pool=self._pool,
                                             state=self.state.per_row_tensors() + [self.cache.lengths],
                                             done=self.state.done)
        return self._graphs[key].replay

    @torch.no_grad()
    def run_until_stop(self, n_rows: int, *, max_new_tokens: int | Sequence[int], seeds: int | Sequence[int] = 0,
                       temperature: float | Sequence[float] = 0.0, top_k: int | Sequence[int] = 0,
                       top_p: float | Sequence[float] = 1.0, delimiter_ids: Sequence[int] | None = None,
                       diverse_groups: int = 0, diversity_penalty: float = 3.0,
                       sibling_block: Sequence[int] | None = None) -> DecodeOutput:
        """Decode rows [0, n_rows) from their ``next_logits`` until every row has stopped.

        max_new_tokens: per-row token budget (scalar or n_rows values, each <= the decoder's
        max_new_tokens). seeds: one int64 per row (a scalar gives every row the same seed).
        temperature / top_k / top_p: scalars or per row; temperature 0 is greedy.
        delimiter_ids: extra stop ids for this run (sentence ends), finish reason "delimiter".
        diverse_groups > 0: CSR's released proposal instead of sampling: row i is group
        ``i % diverse_groups`` of the sibling block ``sibling_block[i]`` (default ``i // diverse_groups``).
        Host syncs: one every ``sync_every`` steps (the done flags), one at the start (the cache
        lengths) and one at the end (the copy of the outputs). Returns ``DecodeOutput``.
        """
        n = n_rows
        if not 1 <= n <= self.max_rows:
            raise ValueError(f"run_until_stop: n_rows = {n} outside 1..{self.max_rows}")
        budget = _per_row(max_new_tokens, n, "max_new_tokens", torch.long)
        if int(budget.min()) < 1 or int(budget.max()) > self.max_new_tokens:
            raise ValueError(f"run_until_stop: max_new_tokens must lie in 1..{self.max_new_tokens} (the decoder's "
                             f"max_new_tokens), got {int(budget.min())}..{int(budget.max())}")
        temperature = _per_row(temperature, n, "temperature", torch.float32)
        top_k = _per_row(top_k, n, "top_k", torch.long)
        top_p = _per_row(top_p, n, "top_p", torch.float32)
        if bool((top_p <= 0).any()) or bool((top_p > 1).any()) or bool((top_k < 0).any()):
            raise ValueError("run_until_stop: top_p must lie in (0, 1] and top_k be >= 0")
        if diverse_groups > 0:
            config = StepConfig("diverse", False, diverse_groups, float(diversity_penalty))
        elif bool((temperature > 0).any()):
            config = StepConfig("sample", bool((top_k > 0).any() or (top_p < 1).any()))
        else:
            config = StepConfig("greedy")
        lengths = self.cache.lengths[:n].cpu()
        longest, room = int(lengths.max()), int((lengths + budget).max())
        if room >= self.max_seq:
            raise ValueError(f"run_until_stop: a row would reach {room} cache positions; the decoder has "
                             f"{self.max_seq} (one is kept as scratch): allocate a larger max_seq")

        b = self._bucket(n)  # rows [n, b) are padding: finished from the start
        s = self.state

        def fill(t: torch.Tensor, values: torch.Tensor, pad_value) -> None:
            t[:b].fill_(pad_value)
            t[:n].copy_(values)

        fill(s.budget, budget, 1)
        fill(s.seed_keys, seed_keys(_per_row(seeds, n, "seeds", torch.long)), 0)
        fill(s.temperature, temperature, 0.0)
        fill(s.top_k, top_k, 0)
        fill(s.top_p, top_p, 1.0)
        group = torch.arange(n) % max(diverse_groups, 1)
        block = (torch.arange(n) // max(diverse_groups, 1) if sibling_block is None
                 else _per_row(sibling_block, n, "sibling_block", torch.long))
        fill(s.group, group, 0)
        fill(s.block, block, -1)
        s.done[:b].copy_(torch.arange(b) >= n)
        s.n_generated[:b].zero_()
        s.finish_reason[:b].zero_()
        s.is_delimiter.copy_(self._vocab_mask(delimiter_ids or [], "delimiter_ids"))

        # The loop. Every sync_every steps, one host sync reads the done flags back: stop when all rows
        # are done; when at most half the rows are still running, move them to the front (a row
        # permutation of the cache and the state) and step only a smaller bucket of rows from then on.
        live = b  # the step runs on rows [0, live)
        holds = torch.arange(b)  # holds[i]: the row that row i held when the run started
        step = self._step_function(live, config)
        n_steps = int(budget.max())
        # On CPU, a step attends only to the positions filled so far (a bound known on the host); on
        # CUDA, eager steps run exactly the kernels the graph replays, so each can check the other.
        bound_attention = self.device.type == "cpu"
        for i in range(n_steps):
            if bound_attention:
                step(attend_len=min(self.max_seq, longest + i + 1))
            else:
                step()
            if (i + 1) % self.sync_every or i + 1 == n_steps:
                continue
            done = s.done[:live].cpu()  # the one host sync of every sync_every steps
            if bool(done.all()):
                break
            n_live = int((~done).sum())
            if self.compact and n_live <= live // 2:
                order = torch.cat([(~done).nonzero()[:, 0], done.nonzero()[:, 0]])  # running rows first
                self._permute_rows(order)
                holds[:live] = holds[:live][order]
                live = self._bucket(n_live)
                step = self._step_function(live, config)
        if not torch.equal(holds, torch.arange(b)):
            self._permute_rows(torch.argsort(holds))  # every row back in its place
        width = int(s.n_generated[:n].max())
        return DecodeOutput(
            tokens=s.tokens[:n, :width].cpu(), logprobs=s.logprobs[:n, :width].cpu(),
            n_tokens=s.n_generated[:n].cpu(),
            finish_reason=[FINISH_REASON_NAMES[r] for r in s.finish_reason[:n].tolist()],
        )


# ---------------------------------------------------------------------------------------------
# The public entry point
# ---------------------------------------------------------------------------------------------


def row_seeds(seeds: int | Sequence[int], n_prompts: int, n: int) -> list[int]:
    """Per-row seeds: an int is a base seed, row (p, j) gets ``mix_seeds(base, p, j)``; a sequence of
    ``n_prompts * n`` ints is used as is (row order: prompt-major)."""
    if isinstance(seeds, int):
        return [mix_seeds(seeds, p, j) for p in range(n_prompts) for j in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n_prompts * n:
        raise ValueError(f"seeds: expected one int or {n_prompts} x {n} = {n_prompts * n} values, got {len(seeds)}")
    return seeds


def generate(model, prompts: Sequence, *, n: int = 1, max_new_tokens: int = 128, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seeds: int | Sequence[int] = 0,
             stop_ids: Sequence[int] | None = None, delimiter_ids: Sequence[int] | None = None,
             use_cuda_graph: bool = True, sync_every: int = 8) -> list[Generation]:
    """Generate ``n`` continuations of each prompt: one batched prefill, a fork, one batched decode.

    prompts: a list of prompts (token ids, or ``(input_ids, pixel_values or None)``; see ``as_prompt``).
    temperature 0 is greedy; top_k 0 and top_p 1 are off. seeds: a base seed (row (p, j) gets
    ``mix_seeds(seed, p, j)``) or one seed per row; a row's tokens depend only on its prompt, its seed
    and the settings, never on the other rows. stop_ids: end-of-sequence ids (default the config's
    ``eos_token_id``; ``[]`` for none). delimiter_ids: also stop at these (e.g. sentence ends).
    Returns ``len(prompts) * n`` ``Generation``s, prompt-major (row p * n + j is sample j of prompt p).
    """
    items = [as_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    if not items:
        return []
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"generate: n ({n}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    P = len(items)
    seeds = row_seeds(seeds, P, n)
    longest = max(len(ids) for ids, _ in items)
    decoder = Decoder(model, max_rows=P * n, max_seq=longest + max_new_tokens + 1, max_new_tokens=max_new_tokens,
                      eos_ids=stop_ids, use_cuda_graph=use_cuda_graph, sync_every=sync_every)
    decoder.prefill(items)
    if n > 1:
        decoder.fork(n, P)
    out = decoder.run_until_stop(P * n, max_new_tokens=max_new_tokens, seeds=seeds, temperature=temperature,
                                 top_k=top_k, top_p=top_p, delimiter_ids=delimiter_ids)
    results = []
    for r in range(P * n):
        tokens, logprobs = out.row(r)
        results.append(Generation(r // n, r % n, tokens, logprobs, out.finish_reason[r]))
    return results
