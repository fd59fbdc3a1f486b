"""Benchmark one training step of the world's LVLM stages, the build's way against the others, side by side.

    python recipes/bench_world_step.py                 # stages 0 (grounding) and SFT, 2 threads
    python recipes/bench_world_step.py --clip --variants float32   # and CLIP's step
    python recipes/bench_world_step.py --threads 1 --steps 10 --variants float32 "bf16 (build)"
    python recipes/bench_world_step.py --data          # the data work before each stage's first step

``recipes/world_models.py`` trains its LVLMs on the CPU; this times what one of its optimizer steps
costs (batch 32, the stage's own conversations, forward + backward + AdamW, data included), in one
run for every variant, on the same batches:

- ``float32``: no autocast, the 32 conversations in one micro-batch, padded together;
- ``by length``: float32, 2 micro-batches of 16 of similar length (``TrainConfig.group_by_length``);
- ``by length+prefix``: and the system prompt that starts every conversation computed once per
  micro-batch (``sft_loss(share_prefix=True)``);
- ``bf16``: the first under bfloat16 autocast (``WorldModelsConfig.lvlm_bf16``);
- ``bf16 (build)``: the third under bfloat16 autocast -- the build's setting;
- ``bf16, fp32 attn``: ``bf16`` with the attention in float32 (``Attention.float32_attention``).

With ``--processes``, the step through ``optim.train`` as the build runs it, in one process of two threads
against two ranks of one thread each (``PROCESS_VARIANTS``; DDP over Gloo, as under torchrun), new
processes for each.

With ``--data``, only the data work the build does around the steps (``DATA_STAGES``, ``data_seconds``): each
LVLM stage's conversations made and encoded, one call per conversation against the build's batched
``ConversationDataset``, and CLIP's texts tokenized per step, all at once against each distinct text once.

With ``--clip``, CLIP's step too (``clip_loss``, batch 128 and its hard negatives, ~900 texts):
its attention by PyTorch's fused kernel or written out (``lvlm.clip.attention``), its text tower in
one group or in four of similar length (``clip_text_length_groups``), rounds interleaved.

Every variant computes the same step up to rounding. On CPUs without bfloat16 instructions (AVX512-BF16
or AMX) the bfloat16 rows are much slower. The model has random weights of the world's default size;
the step's cost does not depend on them. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm.llama import attention_in_float32  # noqa: E402
from lvlm.llava import LlavaForConditionalGeneration  # noqa: E402
from lvlm.tokenizer import Tokenizer, encode_conversation  # noqa: E402
from recipes import world_models as wm  # noqa: E402
from recipes.sft import ConversationDataset, set_trainable, sft_collate_for, sft_loss, train_sft  # noqa: E402

STAGES = {"grounding": (wm.world_grounding_records, "text"), "sft": (wm.world_sft_records, "assistant")}


# name -> (bfloat16 autocast, float32 attention under it, micro-batches by length (0: one, unsorted), share prefix)
VARIANTS = {"float32": (False, False, 0, False), "by length": (False, False, 2, False),
            "by length+prefix": (False, False, 2, True), "bf16": (True, False, 0, False),
            "bf16 (build)": (True, False, 2, True), "bf16, fp32 attn": (True, True, 0, False)}


def micro_batches(dataset, collate, rows: range, parts: int) -> list:
    """One step's micro-batches: ``rows`` as one batch (``parts`` 0), or sorted by length and cut in ``parts``."""
    if parts == 0:
        return [collate([dataset[j] for j in rows])]
    ordered = sorted(rows, key=dataset.length)
    size = len(ordered) // parts
    return [collate([dataset[j] for j in ordered[i * size:(i + 1) * size]]) for i in range(parts)]


def step_seconds(model, steps, *, bf16: bool, fp32_attention: bool, share_prefix: bool) -> float:
    """Mean seconds of one optimizer step over ``steps`` (lists of micro-batches; after two warm-up steps)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    with attention_in_float32(model, fp32_attention):
        for i, micro in enumerate(steps):
            if i == 2:
                started = time.perf_counter()
            for batch in micro:
                with autocast():
                    loss, _ = sft_loss(model, batch, share_prefix=share_prefix)
                (loss / len(micro)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / (len(steps) - 2)


# CLIP's step (``clip_loss``, batch 128 with its hard negatives): name -> (attention written out for short
# texts, ``lvlm.clip.SHORT_SEQUENCE``; text tower length groups)
CLIP_VARIANTS = {"fused attention": (False, 1), "written out": (True, 1), "written out, 4 groups (build)": (True, 4)}


def clip_step_ms(c, steps: int) -> dict:
    """Mean ms of one CLIP optimizer step per ``CLIP_VARIANTS`` entry, on the same batches, rounds interleaved."""
    from tokenizers import Tokenizer as RawTokenizer

    import lvlm.clip
    from lvlm.clip import CLIPModel

    raw = RawTokenizer.from_str(wm.clip_tokenizer_json(c))
    torch.manual_seed(0)
    model = CLIPModel(wm.clip_config(c, raw.get_vocab_size()))
    pairs = wm.ClipPairs(c, raw, c.clip_batch * steps, wm.WorldPixels(c.world))
    batches = [pairs.collate([pairs[j] for j in range(i * c.clip_batch, (i + 1) * c.clip_batch)])
               for i in range(steps)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    short = lvlm.clip.SHORT_SEQUENCE
    seconds = {name: 0.0 for name in CLIP_VARIANTS}
    try:
        for round_ in range(3):  # round 0 warms up; each later round runs every variant once
            for name, (written_out, groups) in CLIP_VARIANTS.items():
                lvlm.clip.SHORT_SEQUENCE = short if written_out else 0
                started = time.perf_counter()
                for batch in batches:
                    loss, _ = wm.clip_loss(model, batch, text_length_groups=groups)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if round_:
                    seconds[name] += time.perf_counter() - started
    finally:
        lvlm.clip.SHORT_SEQUENCE = short
    return {name: 1000 * s / (2 * steps) for name, s in seconds.items()}


# ``--data``: each LVLM stage's conversations, made and encoded as the build does before its first step
DATA_STAGES = {"grounding": wm.world_grounding_records, "stage 1": wm.world_caption_records,
               "sft": wm.world_sft_records, "labeler": wm.world_labeler_records}


def data_seconds(c, clip_steps: int) -> dict:
    """The build's data work, the way before and the build's way, side by side: per LVLM stage of ``c``, seconds
    to make its conversations, to encode them one ``encode_conversation`` call each, and to build its
    ``ConversationDataset(keep_encoded=True)`` (``encode_conversations``: one batch call per 4,096); then ms per
    CLIP step to tokenize its ~900 texts, ``encode_clip_texts`` against ``ClipPairs.encode`` (each text once)."""
    from tokenizers import Tokenizer as RawTokenizer

    model, tokenizer = world_model_and_tokenizer(c)
    per_image, results = model.config.image_tokens_per_image, {}
    for stage, records_fn in DATA_STAGES.items():
        started = time.perf_counter()
        records = records_fn(c)
        made = time.perf_counter() - started
        started = time.perf_counter()
        kept = [encode_conversation(tokenizer, record["turns"], num_images=1, image_tokens_per_image=per_image)
                for record in records]  # kept, as the data set keeps them
        one_by_one = time.perf_counter() - started
        del kept
        started = time.perf_counter()
        ConversationDataset(records, tokenizer, image_size=c.world.canvas_size, image_tokens_per_image=per_image,
                            max_length=c.lvlm_max_positions, keep_encoded=True)
        batched = time.perf_counter() - started
        results[stage] = {"conversations": len(records), "make_s": round(made, 1),
                          "encode_one_by_one_s": round(one_by_one, 1), "dataset_s": round(batched, 1)}
    raw = RawTokenizer.from_str(wm.clip_tokenizer_json(c))
    pairs = wm.ClipPairs(c, raw, c.clip_batch * clip_steps, wm.WorldPixels(c.world))
    texts = [pairs.texts_of([pairs[j] for j in range(i * c.clip_batch, (i + 1) * c.clip_batch)])
             for i in range(clip_steps)]  # each step's texts, as ClipPairs.collate lists them
    ms = {}
    for name, encode in (("encode_clip_texts", lambda x: wm.encode_clip_texts(raw, x)), ("ClipPairs.encode", pairs.encode)):
        started = time.perf_counter()
        for batch in texts:
            encode(batch)
        ms[name] = round(1000 * (time.perf_counter() - started) / clip_steps, 2)
    results["clip_text_ms"] = ms
    return results


def world_model_and_tokenizer(c) -> tuple:
    """The world's LVLM at ``c``'s size with random weights, set to train like the build's stages, and its tokenizer."""
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "tokenizer.json").write_text(wm.world_tokenizer_json(c))
        tokenizer = Tokenizer.from_file(Path(directory) / "tokenizer.json")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(wm.lvlm_config(c, tokenizer.vocab_size))
    wm.init_llava_weights(model)
    set_trainable(model, vision=False, projector=True, language_model=True)
    model.train()
    return model, tokenizer


def stage_dataset(c, stage: str, model, tokenizer, steps: int) -> ConversationDataset:
    """``steps`` batches of 32 of the stage's own conversations, encoded as the build encodes them."""
    records_fn, loss_on = STAGES[stage]
    return ConversationDataset(records_fn(dataclasses.replace(c, ground_steps=steps, sft_steps=steps)), tokenizer,
                               image_size=c.world.canvas_size, image_tokens_per_image=model.config.image_tokens_per_image,
                               load_pixels=wm.WorldPixels(c.world), max_length=c.lvlm_max_positions, loss_on=loss_on,
                               keep_encoded=True)


# ``--processes``: the step through ``optim.train`` (``train_sft``, as the build runs it) in one process of two
# threads against two ranks of one thread each (DDP over Gloo, what ``torchrun --nproc_per_node 2`` gives):
# (ranks, threads per rank, micro-batch)
PROCESS_VARIANTS = ((1, 2, 16), (2, 1, 16), (2, 1, 8))


def _train_rank(rank: int, world: int, init_method: str, stage: str, micro: int, steps: int, threads: int,
                out: str) -> None:
    """One rank of ``train_step_ms``: ``steps`` steps of ``stage`` through ``train_sft``; rank 0 writes ms/step."""
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(threads)
    c = wm.WorldModelsConfig()
    model, tokenizer = world_model_and_tokenizer(c)
    dataset = stage_dataset(c, stage, model, tokenizer, steps)
    with tempfile.TemporaryDirectory() as directory:
        config = wm._train_config(c, Path(directory), steps=steps, batch=32, lr=1e-3, verbose=False,
                                  micro_batch=micro, group_by_length=True)
        config = dataclasses.replace(config, save_every=0)
        started = time.perf_counter()
        train_sft(model, dataset, config, share_prefix=True)
        if rank == 0:
            Path(out).write_text(str(1000 * (time.perf_counter() - started) / steps))
    if world > 1:
        dist.destroy_process_group()


def train_step_ms(stage: str, steps: int) -> dict:
    """Mean ms of one optimizer step through ``train_sft`` per ``PROCESS_VARIANTS`` entry (DDP set-up and the
    first steps included), each in its own new processes."""
    import torch.multiprocessing as mp

    ms = {}
    for ranks, threads, micro in PROCESS_VARIANTS:
        with tempfile.TemporaryDirectory() as directory:
            out = str(Path(directory) / "ms")
            mp.spawn(_train_rank, nprocs=ranks, join=True,
                     args=(ranks, f"file://{directory}/rendezvous", stage, micro, steps, threads, out))
            ms[f"{ranks} x {threads} thread(s), micro {micro}"] = float(Path(out).read_text())
    return ms


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--clip", action="store_true", help="also time the CLIP step's variants (CLIP_VARIANTS)")
    parser.add_argument("--processes", action="store_true",
                        help="also time the step through optim.train in 1 process x 2 threads against 2 ranks x 1 "
                             "thread (PROCESS_VARIANTS)")
    parser.add_argument("--data", action="store_true",
                        help="only time the build's data work (DATA_STAGES, CLIP's texts) at the float32 preset's sizes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.data:
        results = data_seconds(wm.world_preset("float32"), clip_steps=200)
        print("conversations made and encoded before a stage's first step, seconds: make / encode one by one / "
              "ConversationDataset (batched)")
        for stage in DATA_STAGES:
            r = results[stage]
            print(f"  {stage:<10} {r['conversations']:>6,}: {r['make_s']:.1f} / {r['encode_one_by_one_s']:.1f} / "
                  f"{r['dataset_s']:.1f} ({r['dataset_s'] / r['encode_one_by_one_s']:.2f}x)")
        ms = results["clip_text_ms"]
        print(f"CLIP's texts per step (200 steps): encode_clip_texts {ms['encode_clip_texts']:.1f} ms, "
              f"ClipPairs.encode {ms['ClipPairs.encode']:.1f} ms")
        print(json.dumps(results))
        return results

    c = wm.WorldModelsConfig()
    model, tokenizer = world_model_and_tokenizer(c)
    collate = sft_collate_for(model, tokenizer)

    n = args.steps + 2
    variants = {name: VARIANTS[name] for name in args.variants}
    results = {"threads": args.threads, "steps": args.steps}
    print(f"one optimizer step, batch 32, {args.threads} thread(s), {args.steps} timed steps each")
    print(f"{'stage':<11}{'tokens/row':>11}  " + "".join(f"{name:>22}" for name in variants) + "   each / the first")
    for stage in args.stages:
        dataset = stage_dataset(c, stage, model, tokenizer, n)
        mean_tokens = sum(dataset.length(j) for j in range(32 * n)) / (32 * n)
        ms = {}
        for name, (bf16, fp32, parts, share) in variants.items():
            steps = [micro_batches(dataset, collate, range(i * 32, (i + 1) * 32), parts) for i in range(n)]
            ms[name] = 1000 * step_seconds(model, steps, bf16=bf16, fp32_attention=fp32, share_prefix=share)
        first = next(iter(ms.values()))
        print(f"{stage:<11}{mean_tokens:>11.0f}  " + "".join(f"{v:>19.1f} ms" for v in ms.values())
              + "   " + " / ".join(f"{v / first:.2f}x" for v in ms.values()))
        results[stage] = {"tokens_per_row": round(mean_tokens, 1), **{k: round(v, 1) for k, v in ms.items()}}
    if args.clip:
        ms = clip_step_ms(c, args.steps)
        first = next(iter(ms.values()))
        print(f"CLIP step, batch {c.clip_batch} + hard negatives: " + ", ".join(
            f"{name} {v:.1f} ms ({v / first:.2f}x)" for name, v in ms.items()))
        results["clip"] = {k: round(v, 1) for k, v in ms.items()}
    if args.processes:
        for stage in args.stages:
            ms = train_step_ms(stage, args.steps + 2)
            first = next(iter(ms.values()))
            print(f"{stage} through optim.train: " + ", ".join(
                f"{name} {v:.1f} ms ({v / first:.2f}x)" for name, v in ms.items()))
            results[f"{stage}_processes"] = {k: round(v, 1) for k, v in ms.items()}
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
