"""Choosing the next token inside the decode step: greedy, temperature, top-k, top-p, and the RNG.

Everything here works on whole batches of rows with static shapes and never reads a value back to
the host, so it can run inside a captured CUDA graph (``search.cuda_graph``).

The random numbers: a counter-based RNG
----------------------------------------
Each row carries its own int64 seed. The uniform noise for row ``b``, decode step ``t`` (the row's
own count of generated tokens) and vocabulary entry ``v`` is a pure function

    u[b, v] = hash(seed[b], t[b], v)            in (0, 1)

built from the 32-bit "lowbias32" integer mix (Chris Wellons' hash-prospector): a key per seed
(``seed_keys``, once per run) and a key per vocabulary entry (``vocab_keys``, once) are combined
with the counter at each step (``uniform_noise``). Why not ``torch.Generator``:

- one seed per row: a row's samples depend on its seed and nothing else, so they do not change when
  other rows join or leave the batch (tests check a batch against each row decoded alone);
- no generator state: nothing advances behind the scenes, so a CUDA graph can replay the step and a
  forked or reordered row simply keeps (or is given) a seed;
- vectorised: one elementwise kernel chain for all rows; a list of generators would need a Python
  loop over rows, which a graph cannot capture.

The integer arithmetic runs on int64 tensors holding 32-bit values. A product by a constant of 31
bits fits in int64; the one by a 32-bit constant is formed from 16-bit halves of it (``_mul32``):
nothing relies on signed overflow wrapping around.

Sampling with the noise: the Gumbel-max trick
----------------------------------------------
``argmax_v(logits[v] / T + g[v])`` with ``g = -log(-log u)`` is an exact sample from
``softmax(logits / T)`` (Gumbel 1954; Maddison et al. 2014). It is the log-space twin of gpt-fast's
exponential race ``argmax(p / E)`` with ``E = -log u``; working with logits avoids forming
probabilities that underflow at low temperatures. Filtered-out tokens get ``-inf`` and can never win.
Temperature 0 means greedy: plain ``argmax(logits)``, with no noise at all.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for int64 ``x`` in [0, 2^32) and a 32-bit constant ``c``, without overflow.

    For ``c < 2^31`` the product is below 2^63 and fits. Otherwise ``x * c = x * c_lo + (x * c_hi) * 2^16``;
    only the low 16 bits of ``x * c_hi`` survive the shift modulo 2^32, and every partial product
    stays below 2^48.
    """
    if c < (1 << 31):
        return (x * c) & MASK32
    lo = x * (c & 0xFFFF)
    hi = (x * (c >> 16)) & 0xFFFF
    return (lo + (hi << 16)) & MASK32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer mix (C. Wellons, "Prospecting for hash functions", 2018) on int64 tensors.

    ``x`` holds values in [0, 2^32); returns values in [0, 2^32). A bijection on 32-bit integers
    with low bias: flipping one input bit flips each output bit with probability close to 1/2.
    """
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per row from its int64 seed (any value): ``hash(hash(seed_hi) ^ seed_lo)``, [B].

    Constant during a run, so the engine computes it once per run, not per step."""
    seed_lo, seed_hi = seeds & MASK32, (seeds >> 32) & MASK32
    return lowbias32(lowbias32(seed_hi ^ 0x9E3779B9) ^ seed_lo)


def vocab_keys(vocab_size: int, device=None) -> torch.Tensor:
    """A 32-bit key per vocabulary entry: ``hash(v + constant)``, [V]. Constant: computed once."""
    return lowbias32(torch.arange(vocab_size, device=device, dtype=torch.int64) + 0x5BD1E995)


def uniform_noise(row_seed_keys: torch.Tensor, counters: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Uniform noise ``[B, V]`` float32 in (0, 1), a pure function of (seed, counter, vocabulary index).

    row_seed_keys: [B] from ``seed_keys``; counters: [B] int64 (the step index); vocab: [V] from
    ``vocab_keys``. ``bits = hash(hash(seed_key ^ counter) ^ vocab_key)``; its top 23 bits give
    ``u = (bits + 0.5) / 2^23``: the largest value, ``1 - 2^-24``, is exactly representable in float32,
    so ``u`` is never 0 or 1 and ``-log(-log u)`` is always finite.
    """
    step_keys = lowbias32(row_seed_keys ^ (counters & MASK32))  # [B]
    bits = lowbias32(step_keys[:, None] ^ vocab[None, :])  # [B, V]
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def gumbel_noise(row_seed_keys: torch.Tensor, counters: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``[B, V]`` float32: ``-log(-log u)`` of ``uniform_noise``."""
    return -torch.log(-torch.log(uniform_noise(row_seed_keys, counters, vocab)))


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to ``-inf`` every logit outside the row's top-k and top-p (nucleus) sets.

    logits: [B, V] float32, already divided by the temperature; top_k: [B] int64 (0 = no limit);
    top_p: [B] float32 (1.0 = no limit). Top-k then top-p, as Hugging Face's warpers apply them:
    top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (a token
    is kept when the mass strictly before it is below ``top_p``; the most likely token is always
    kept; Holtzman et al. 2020). Ties are ordered by vocabulary index (stable sort). Returns [B, V].
    """
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, V]
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, V)
    keep = rank[None, :] < k[:, None]
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = keep & (mass_before < top_p[:, None])
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample_tokens(logits: torch.Tensor, row_seed_keys: torch.Tensor, counters: torch.Tensor,
                  temperature: torch.Tensor, top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                  vocab: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of every row: Gumbel-max sampling at the row's temperature, greedy where it is 0.

    logits: [B, V] float32; row_seed_keys: [B] (``seed_keys(seeds)``); counters: [B] int64, the step
    index; vocab: [V] ``vocab_keys`` (computed here when None; see ``uniform_noise``);
    temperature: [B] float32, ``<= 0`` means greedy (``argmax(logits)`` exactly, first index on ties);
    top_k, top_p: [B] or None (no filtering; skipping it saves a sort of the vocabulary).
    Returns tokens [B] int64.
    """
    greedy = logits.argmax(dim=-1)
    sampling = temperature > 0
    scaled = logits / torch.where(sampling, temperature, 1.0)[:, None]
    if top_k is not None or top_p is not None:
        B = logits.shape[0]
        top_k = torch.zeros(B, dtype=torch.long, device=logits.device) if top_k is None else top_k
        top_p = torch.ones(B, dtype=torch.float32, device=logits.device) if top_p is None else top_p
        scaled = filter_top_k_top_p(scaled, top_k, top_p)
    vocab = vocab_keys(logits.shape[-1], logits.device) if vocab is None else vocab
    sampled = (scaled + gumbel_noise(row_seed_keys, counters, vocab)).argmax(dim=-1)
    return torch.where(sampling, sampled, greedy)


def diverse_greedy_tokens(logprobs: torch.Tensor, group: torch.Tensor, block: torch.Tensor, active: torch.Tensor,
                          n_groups: int, penalty: float) -> torch.Tensor:
    """Diverse beam search with groups of width 1: greedy per group with a Hamming diversity penalty.

    The released CSR code proposes its candidate sentences with Hugging Face's group beam search
    (Vijayakumar et al. 2018, "Diverse Beam Search"), ``num_beams = num_beam_groups = C``: each
    group holds one beam, so each group is greedy, except that group g's log-probs are first lowered
    by ``penalty * (number of earlier groups of the same parent that chose token v at this step)``.

    logprobs: [B, V] float32; group: [B] int64, the row's group index in 0..n_groups-1; block: [B]
    int64, rows with equal ``block`` are siblings (candidates of one parent); active: [B] bool, only
    running rows' choices count against later groups. Groups are processed in order 0..n_groups-1
    (a Python loop of fixed length, fine inside a CUDA graph). Returns tokens [B] int64.
    """
    siblings = (block[:, None] == block[None, :]).to(logprobs.dtype)  # [B, B]
    chosen_by_earlier = torch.zeros_like(logprobs)  # [B, V]: count per row's sibling block
    tokens = torch.zeros_like(group)
    for g in range(n_groups):
        pick = (logprobs - penalty * chosen_by_earlier).argmax(dim=-1)  # [B]
        in_group = group == g
        tokens = torch.where(in_group, pick, tokens)
        counts_now = (in_group & active).to(logprobs.dtype)[:, None]  # [B, 1]
        one_hot = torch.zeros_like(logprobs).scatter_(1, pick[:, None], counts_now)  # [B, V]
        chosen_by_earlier = chosen_by_earlier + siblings @ one_hot
    return tokens


def _lowbias32_int(x: int) -> int:
    """``lowbias32`` on a Python int (host side, for deriving seeds)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def mix_seeds(*values: int) -> int:
    """A 63-bit seed derived from a sequence of ints, e.g. ``mix_seeds(base, prompt, sample)``.

    Host-side helper (plain Python) for giving every row of a search its own reproducible seed that
    depends on *what* the row is (prompt, sample, path in a tree), not on *where* it sits in a batch.
    """
    hi, lo = 0x243F6A88, 0x85A308D3
    for value in values:
        value = int(value) & ((1 << 64) - 1)
        lo = _lowbias32_int(lo ^ _lowbias32_int(value & MASK32) ^ hi)
        hi = _lowbias32_int(hi ^ _lowbias32_int((value >> 32) ^ 0x9E3779B9) ^ lo)
    return ((hi & 0x7FFFFFFF) << 32) | lo
