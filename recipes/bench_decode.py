"""Benchmark the decoding engine: batch-1 decode speed and CSR's sentence-level beam search.

    python recipes/bench_decode.py                                   # CPU, tiny random model
    python recipes/bench_decode.py --preset llava-1.5-7b --dtype bfloat16   # GPU, random 7B (13.5 GB)

Side by side, same model, same prompts (each with its image), same search settings:

(a) batch-1 greedy decode, tokens/s (on GPU with and without the CUDA graph, and as a share of the
    memory-bandwidth limit: a decode step must read every weight of the language model once, so
    tokens/s <= copy bandwidth / weight bytes; ANCHORS §6);
(b) sentence-level beam search with CSR's settings (5 beams = top 3 + bottom 2, 5 candidates per
    beam, at most 70 tokens per sentence), in finished responses/s:
      - our engine: all beams of all prompts decode together; every beam keeps its cache row;
      - our engine without CUDA graphs (GPU only; on CPU there are no graphs);
      - the naive baseline, the released CSR code's approach: for every beam at every depth, a fresh
        prefill of image + prompt + sentences so far, then its candidates (``reuse_cache=False``);
      - Hugging Face ``generate`` in that role, when transformers is installed (``--no-hf`` skips it):
        per beam, ``generate`` on the whole prefix with ``num_return_sequences`` sampled candidates.
    Each search is timed ``--beam-repeats`` times; the best time is reported.
    Work is forced to be comparable: no end-of-sequence id, a fixed number of sentences per response
    and a per-sentence cap, and per-candidate seeds that depend only on the path, so our engine and
    the naive baseline grow the very same tree (the script checks this).

With random weights the text means nothing; sentences end at a fixed set of "delimiter" ids sampled
at temperature 1. The last printed line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm.config import preset  # noqa: E402
from lvlm.llava import LlavaForConditionalGeneration  # noqa: E402
from recipes._common import built_on  # noqa: E402
from search.engine import Decoder  # noqa: E402
from search.sentence_beam import mean_logprob_score, sentence_beam_search  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, help="model preset (default: tiny-llava on CPU, llava-1.5-7b on GPU)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decode-tokens", type=int, default=256, help="(a): tokens decoded at batch 1")
    ap.add_argument("--prompts", type=int, default=None, help="(b): prompts per call (default 8 on CPU, 2 on GPU)")
    ap.add_argument("--beams", type=int, default=5, help="(b): kept nodes per depth: top ceil(b/2) + bottom floor(b/2)")
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--sentence-tokens", type=int, default=70)
    ap.add_argument("--sentences", type=int, default=3, help="(b): sentences per response (the sentence cap)")
    ap.add_argument("--delimiter-every", type=int, default=None,
                    help="(b): every n-th token id is a sentence delimiter (default 10 on tiny, 16 otherwise)")
    ap.add_argument("--text-tokens", type=int, default=16, help="text tokens around each prompt's image")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions of (a); the best is reported")
    ap.add_argument("--no-hf", action="store_true", help="(b): skip the Hugging Face generate baseline")
    ap.add_argument("--beam-repeats", type=int, default=2, help="(b): timed runs of each search; the best counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default 1 on CPU: the tiny model's ops are too small to split)")
    args = ap.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.preset = args.preset or ("llava-1.5-7b" if on_gpu else "tiny-llava")
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.prompts = args.prompts or (2 if on_gpu else 8)
    args.delimiter_every = args.delimiter_every or (10 if args.preset.startswith("tiny") else 16)
    return args


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def build_model(name: str, dtype: torch.dtype, device: torch.device):
    """A random-init model built directly on the device, in ``dtype`` (no float32 copy first)."""
    torch.manual_seed(0)
    with built_on(device, dtype):
        return LlavaForConditionalGeneration(preset(name)).eval()


def make_prompts(model, n: int, text_tokens: int, seed: int, device, dtype):
    """``n`` prompts ``text + image + text`` with random token ids and a random image each."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    V, size = cfg.text_config.vocab_size, cfg.vision_config.image_size
    reserved = {cfg.image_token_index, cfg.text_config.eos_token_id, cfg.text_config.bos_token_id}
    prompts = []
    for _ in range(n):
        ids = [t for t in torch.randint(4, V, (2 * text_tokens,), generator=g).tolist() if t not in reserved]
        half = len(ids) // 2
        ids = [cfg.text_config.bos_token_id] + ids[:half] + [cfg.image_token_index] * cfg.image_tokens_per_image \
            + ids[half:]
        prompts.append((ids, torch.randn(1, 3, size, size, generator=g).to(device, dtype)))
    return prompts


def copy_bandwidth(device, n_bytes: int = 2 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), best of ``iters`` copies."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(iters):
        _, seconds = timed(lambda: dst.copy_(src), device)
        best = min(best, seconds)
    return 2 * n_bytes / best


def weight_bytes_per_token(model) -> int:
    """Bytes of language-model weights one decode step reads: every parameter except the embedding
    table, of which it reads one row (the vision tower and projector are not used while decoding)."""
    lm = model.language_model
    embed = lm.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in lm.parameters())
    return total - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()


def bench_batch1_decode(model, prompt, n_tokens: int, use_cuda_graph: bool, repeats: int, device) -> float:
    """Tokens/s of greedy batch-1 decoding after a prefill (prefill not timed; best of ``repeats``)."""
    dec = Decoder(model, max_rows=1, max_seq=len(prompt[0]) + n_tokens + 1, max_new_tokens=n_tokens, eos_ids=[],
                  use_cuda_graph=use_cuda_graph)
    best = math.inf
    for i in range(repeats + 1):  # the first run warms up (and captures the graph)
        dec.prefill([prompt])
        _, seconds = timed(lambda: dec.run_until_stop(1, max_new_tokens=n_tokens, temperature=0.0), device)
        if i:
            best = min(best, seconds)
    return n_tokens / best


def bench_beam_search(model, prompts, args, *, reuse_cache: bool, use_cuda_graph: bool, device):
    """One timed sentence-level beam search; returns (responses, seconds, candidate tokens scored)."""
    counted = {"tokens": 0}

    def counting_score(candidates):
        counted["tokens"] += sum(len(t) for t in candidates.token_ids)
        return mean_logprob_score(candidates)

    V = model.config.text_config.vocab_size
    results, seconds = timed(lambda: sentence_beam_search(
        model, prompts, delimiter_ids=list(range(5, V, args.delimiter_every)), stop_ids=[],
        n_candidates=args.candidates, k=math.ceil(args.beams / 2), k_bottom=args.beams // 2,
        max_sentence_tokens=args.sentence_tokens, max_sentences=args.sentences,
        max_total_tokens=args.sentences * args.sentence_tokens, proposal="sample", temperature=1.0,
        score_fn=counting_score, seed=args.seed, reuse_cache=reuse_cache, use_cuda_graph=use_cuda_graph,
    ), device)
    return results, seconds, counted["tokens"]


def bench_hf_generate(hf, model, prompts, args, device):
    """Hugging Face ``generate`` as the released code uses it: per beam, the whole prefix, C samples.

    hf: ``to_hf_llava(model)``. The same number of beams, depths and candidates as our search (beam
    selection is skipped: it costs nothing next to generation); different random numbers, so the
    sentences differ. Returns (responses, seconds, tokens generated).
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    V = model.config.text_config.vocab_size
    is_delimiter = torch.zeros(V + 64, dtype=torch.bool)
    is_delimiter[5:V:args.delimiter_every] = True
    delimiters = is_delimiter.to(device)

    class StopAtDelimiter(StoppingCriteria):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores, **kwargs):  # per-row "finished" flags
            return (delimiters[input_ids[:, self.start:]]).any(dim=1)

    C, beams_per_depth = args.candidates, args.beams
    pad = model.config.pad_token_id or 0

    def run():
        n_responses, n_tokens = 0, 0
        for ids, px in prompts:
            paths = [[]]
            for depth in range(args.sentences):
                new_paths = []
                for path in paths:
                    prefix = torch.tensor([ids + path], device=device)
                    out = hf.generate(input_ids=prefix, pixel_values=px, attention_mask=torch.ones_like(prefix),
                                      do_sample=True, temperature=1.0, top_k=0, max_new_tokens=args.sentence_tokens,
                                      num_return_sequences=C, pad_token_id=pad, eos_token_id=None,
                                      suppress_tokens=[model.config.image_token_index],  # as our engine
                                      stopping_criteria=StoppingCriteriaList([StopAtDelimiter(prefix.shape[1])]))
                    for row in out[:, prefix.shape[1]:].tolist():
                        end = next((i + 1 for i, t in enumerate(row) if t < V and is_delimiter[t]), len(row))
                        n_tokens += end
                        new_paths.append(path + row[:end])
                paths = new_paths[:beams_per_depth]
            n_responses += len(paths)
        return n_responses, n_tokens

    (n_responses, n_tokens), seconds = timed(run, device)
    return n_responses, seconds, n_tokens


def to_hf_llava(model):
    """Our random model as a transformers ``LlavaForConditionalGeneration`` with the same weights
    (built directly on the model's device and in its dtype)."""
    import transformers  # optional; ImportError means skip

    config = transformers.LlavaConfig.from_dict(model.config.to_hf())
    param = next(model.parameters())
    with built_on(param.device, param.dtype):
        hf = transformers.LlavaForConditionalGeneration(config).eval()
    ours = model.state_dict()
    theirs = hf.state_dict()

    def their_name(name: str) -> str:
        for a, b in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
            if name.startswith(a):
                candidate = b + name[len(a):]
                if candidate in theirs:
                    return candidate
                return candidate.replace("vision_tower.vision_model.", "vision_tower.")
        return name

    mapped = {their_name(k): v for k, v in ours.items()}
    missing = [k for k in theirs if k not in mapped]
    if missing:
        raise RuntimeError(f"cannot map weights to transformers' Llava: {missing[:3]} ... missing")
    hf.load_state_dict({k: mapped[k] for k in theirs})
    return hf


def main():
    args = parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    print(f"config: {json.dumps(vars(args))}", flush=True)
    model = build_model(args.preset, dtype, device)
    prompts = make_prompts(model, args.prompts, args.text_tokens, args.seed, device, dtype)
    on_gpu = device.type == "cuda"
    report = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "preset": args.preset,
              "dtype": args.dtype, "prompt_tokens": len(prompts[0][0])}

    # (a) batch-1 greedy decode.
    with torch.no_grad():
        report["decode_tok_s"] = bench_batch1_decode(model, prompts[0], args.decode_tokens, True, args.repeats, device)
        print(f"(a) batch-1 greedy decode{' (CUDA graph)' if on_gpu else ''}: {report['decode_tok_s']:.1f} tokens/s")
        if on_gpu:
            report["decode_tok_s_no_graph"] = bench_batch1_decode(model, prompts[0], args.decode_tokens, False,
                                                                  args.repeats, device)
            bandwidth = copy_bandwidth(device)
            per_token = weight_bytes_per_token(model)
            limit = bandwidth / per_token
            report.update(copy_bandwidth_GBps=bandwidth / 1e9, weight_GB_per_token=per_token / 1e9,
                          decode_limit_tok_s=limit, decode_pct_of_limit=100 * report["decode_tok_s"] / limit)
            print(f"    without graph: {report['decode_tok_s_no_graph']:.1f} tokens/s")
            print(f"    copy bandwidth {bandwidth / 1e9:.0f} GB/s, weights {per_token / 1e9:.2f} GB per token -> "
                  f"limit {limit:.0f} tokens/s; decode at {report['decode_pct_of_limit']:.0f}% of it")

    # (b) sentence-level beam search: ours vs the naive baseline (same tree).
    print(f"(b) sentence-level beam search: {args.prompts} prompts, {args.beams} beams x {args.candidates} candidates, "
          f"{args.sentences} sentences of at most {args.sentence_tokens} tokens", flush=True)
    bench_beam_search(model, prompts[:1], args, reuse_cache=True, use_cuda_graph=True, device=device)  # warm-up
    runs = {"ours": dict(reuse_cache=True, use_cuda_graph=True)}
    if on_gpu:
        runs["ours_no_graph"] = dict(reuse_cache=True, use_cuda_graph=False)
    runs["naive"] = dict(reuse_cache=False, use_cuda_graph=False)
    trees = {}
    for name, kw in runs.items():
        timings = [bench_beam_search(model, prompts, args, device=device, **kw) for _ in range(args.beam_repeats)]
        results, seconds, tokens = min(timings, key=lambda t: t[1])
        n = sum(len(r) for r in results)
        trees[name] = [[tuple(x.tokens) for x in r] for r in results]
        report.update({f"beam_{name}_responses_per_s": n / seconds, f"beam_{name}_seconds": seconds,
                       f"beam_{name}_responses": n, f"beam_{name}_tokens": tokens,
                       f"beam_{name}_tokens_per_s": tokens / seconds})
        print(f"    {name:>14}: {n} responses, {tokens} candidate tokens in {seconds:.2f} s -> "
              f"{n / seconds:.2f} responses/s, {tokens / seconds:.0f} tokens/s", flush=True)
    report["beam_same_responses"] = all(t == trees["ours"] for t in trees.values())
    print(f"    same responses from every method: {report['beam_same_responses']}")
    if not args.no_hf:
        try:
            hf = to_hf_llava(model)
            n, seconds, tokens = min((bench_hf_generate(hf, model, prompts, args, device)
                                      for _ in range(args.beam_repeats)), key=lambda t: t[1])
            del hf
            report.update(beam_hf_responses_per_s=n / seconds, beam_hf_seconds=seconds, beam_hf_responses=n,
                          beam_hf_tokens=tokens, beam_hf_tokens_per_s=tokens / seconds)
            print(f"    {'hf_generate':>14}: {n} responses, {tokens} tokens in {seconds:.2f} s -> "
                  f"{n / seconds:.2f} responses/s, {tokens / seconds:.0f} tokens/s")
        except Exception as e:  # optional baseline: report why it did not run
            report["beam_hf_skipped"] = f"{type(e).__name__}: {e}"[:200]
            print(f"    hf_generate skipped: {report['beam_hf_skipped']}")
    for name in [k for k in runs if k != "ours"] + (["hf"] if "beam_hf_responses_per_s" in report else []):
        ratio = report["beam_ours_responses_per_s"] / report[f"beam_{name}_responses_per_s"]
        report[f"speedup_vs_{name}"] = ratio
        print(f"    ours / {name}: {ratio:.1f}x")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}))


if __name__ == "__main__":
    main()
