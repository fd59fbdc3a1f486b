"""Benchmark one training step of the world's LVLM stages in the build's precisions, side by side.

    python recipes/bench_world_step.py                 # stage 0 (grounding) and SFT, 2 threads
    python recipes/bench_world_step.py --threads 1 --steps 10

``recipes/world_models.py`` trains its LVLMs on the CPU; this times what one of its optimizer steps
costs (batch 32, the stage's own conversations, forward + backward + AdamW, data included), three ways
in one run:

- ``float32``: no autocast;
- ``bf16, bf16 attention``: bfloat16 autocast everywhere, attention included -- the build's setting
  (``WorldModelsConfig.lvlm_bf16``);
- ``bf16, fp32 attention``: bfloat16 autocast with the attention computed in float32
  (``lvlm.llama.causal_attention``, ``Attention.float32_attention``).

On CPUs without bfloat16 instructions (AVX512-BF16 or AMX) the bfloat16 rows are slower, not faster.
The model has random weights of the world's default size; the step's cost does not depend on them.
The last line is one JSON object with every figure.
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
from lvlm.tokenizer import Tokenizer  # noqa: E402
from recipes import world_models as wm  # noqa: E402
from recipes.sft import ConversationDataset, set_trainable, sft_collate_for, sft_loss  # noqa: E402

STAGES = {"grounding": (wm.world_grounding_records, "text"), "sft": (wm.world_sft_records, "assistant")}


def step_seconds(model, batches, *, bf16: bool, fp32_attention: bool) -> float:
    """Mean seconds of one optimizer step over ``batches`` (after two warm-up steps)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    with attention_in_float32(model, fp32_attention):
        for i, batch in enumerate(batches):
            if i == 2:
                started = time.perf_counter()
            with autocast():
                loss, _ = sft_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / (len(batches) - 2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    c = wm.WorldModelsConfig()
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "tokenizer.json").write_text(wm.world_tokenizer_json(c))
        tokenizer = Tokenizer.from_file(Path(directory) / "tokenizer.json")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(wm.lvlm_config(c, tokenizer.vocab_size))
    wm.init_llava_weights(model)
    set_trainable(model, vision=False, projector=True, language_model=True)
    model.train()
    collate = sft_collate_for(model, tokenizer)

    n = args.steps + 2
    variants = {"float32": (False, True), "bf16, bf16 attention": (True, False), "bf16, fp32 attention": (True, True)}
    results = {"threads": args.threads, "steps": args.steps}
    print(f"one optimizer step, batch 32, {args.threads} thread(s), {args.steps} timed steps each")
    print(f"{'stage':<11}{'tokens/row':>11}  " + "".join(f"{name:>22}" for name in variants) + "   bf16 rows / float32")
    for stage in args.stages:
        records_fn, loss_on = STAGES[stage]
        small = dataclasses.replace(c, ground_steps=n, sft_steps=n)
        dataset = ConversationDataset(records_fn(small), tokenizer, image_size=c.world.canvas_size,
                                      image_tokens_per_image=model.config.image_tokens_per_image,
                                      load_pixels=wm.WorldPixels(c.world), max_length=c.lvlm_max_positions,
                                      loss_on=loss_on, keep_encoded=True)
        batches = [collate([dataset[j] for j in range(i * 32, (i + 1) * 32)]) for i in range(n)]
        mean_tokens = sum(b["input_ids"].shape[1] for b in batches) / n
        ms = {name: 1000 * step_seconds(model, batches, bf16=bf16, fp32_attention=fp32)
              for name, (bf16, fp32) in variants.items()}
        ratios = [ms[name] / ms["float32"] for name in list(variants)[1:]]
        print(f"{stage:<11}{mean_tokens:>11.0f}  " + "".join(f"{v:>19.1f} ms" for v in ms.values())
              + "   " + " / ".join(f"{r:.2f}x" for r in ratios))
        results[stage] = {"padded_tokens_per_row": round(mean_tokens, 1), **{k: round(v, 1) for k, v in ms.items()}}
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
