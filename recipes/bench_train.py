"""Benchmark one DPO training step: tokens/s and model FLOPs utilisation (MFU).

    python recipes/bench_train.py                          # CPU: tiny random model, float32
    python recipes/bench_train.py --preset llava-1.5-7b --lora-r 128 --seq 1024 --dtype bfloat16   # GPU

The step is what CSR / RLAIF-V training does per batch: the policy runs forward and backward on the
chosen and the rejected sequences of each pair (concatenated into one batch of 2 x pairs rows, each
with its image), sequence log-probs of the response tokens feed the sigmoid DPO loss against cached
reference log-probs (not recomputed: random constants here), then AdamW updates the LoRA adapters.
The model is built with random weights directly on the target device, in the target dtype.

Model FLOPs per step (the "model FLOPs" of MFU: only the work the method needs, no recomputation
from activation checkpointing; Chowdhery et al. 2022, PaLM, appendix B), per language-model token:

      2 * N_mm                 forward through every frozen LM matrix (lm_head included, the
                               embedding lookup excluded: it is a gather, not a matmul)
    + 2 * N_mm                 backward, activation gradients only: frozen weights get no gradient
    + 6 * N_lora               the adapters: forward, activation gradients and weight gradients
    + 12 * L * d_attn * T      attention scores and weighted values: forward 4 L d T, backward
                               8 L d T (T = sequence length; the causal mask is not halved)

plus, per image, the frozen vision path, forward only: 2 * N_vision * (patches + 1) + ViT attention
+ 2 * N_projector * patches. So about 4 N per token with LoRA; full fine-tuning (``--lora-r 0``) adds
the weight gradients, 2 * N_mm, giving the familiar 6 N. MFU = model FLOPs per second / peak FLOP/s.
Peak: ``--peak-tflops``, else for a GPU in bf16/fp16 the dense tensor-core figure of its data sheet
(H100 SXM and H200: 989 TFLOP/s), else measured here with a large matmul in the step's dtype (the
usual choice on a CPU, where no data-sheet figure fits).

Every figure is printed; the last line is one JSON object with all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm.config import preset  # noqa: E402
from lvlm.llava import LlavaForConditionalGeneration  # noqa: E402
from optim.dpo import dpo_loss  # noqa: E402
from optim.logprobs import sequence_logprobs  # noqa: E402
from optim.lora import LoRALinear, apply_lora  # noqa: E402
from recipes._common import built_on  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEAK_TFLOPS = {  # dense bf16/fp16 tensor-core peak, data sheets; the first matching name wins
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-llava")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--lora-r", type=int, default=None,
                    help="LoRA rank (default 128 as in CSR, 8 on a tiny preset); 0 = full fine-tuning of the LM")
    ap.add_argument("--lora-alpha", type=float, default=None, help="default 2 * r (CSR: 256 for r = 128)")
    ap.add_argument("--pairs", type=int, default=1, help="preference pairs per step (2 x pairs sequences)")
    ap.add_argument("--seq", type=int, default=None,
                    help="tokens per sequence, image included (default 128 on a tiny preset, else 1024)")
    ap.add_argument("--no-image", action="store_true", help="text-only sequences")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup untimed ones)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.seq = args.seq or (128 if args.preset.startswith("tiny") else 1024)
    if args.lora_r is None:
        args.lora_r = 8 if args.preset.startswith("tiny") else 128
    args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_r
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random weights, allocated on ``device`` in ``dtype`` from the start (a 7B model never sits on the CPU)."""
    torch.manual_seed(args.seed)
    with built_on(device, dtype):
        model = LlavaForConditionalGeneration(preset(args.preset))
    if args.lora_r > 0:
        apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=0.05)
    else:  # full fine-tuning of the language model; the vision tower and projector stay frozen (LLaVA-1.5)
        model.vision_tower.requires_grad_(False)
        model.multi_modal_projector.requires_grad_(False)
    model.language_model.gradient_checkpointing = args.activation_checkpointing
    return model.train()


def count_params(model: nn.Module) -> dict:
    """Parameter counts the FLOP formula needs (see the module docstring)."""
    lm_matmul = lora = 0
    for name, m in model.language_model.named_modules():
        if isinstance(m, LoRALinear):
            lora += m.lora_A.weight.numel() + m.lora_B.weight.numel()
        elif isinstance(m, nn.Linear) and not name.endswith(("lora_A", "lora_B")):
            lm_matmul += m.weight.numel()
    vision = sum(m.weight.numel() for m in model.vision_tower.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    projector = sum(p.numel() for n, p in model.multi_modal_projector.named_parameters() if n.endswith("weight"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"lm_matmul": lm_matmul, "lora": lora, "vision": vision, "projector": projector, "trainable": trainable,
            "total": sum(p.numel() for p in model.parameters())}


def step_flops(model: nn.Module, n: dict, *, sequences: int, seq: int, images: int, full_finetune: bool) -> float:
    """Model FLOPs of one DPO step (module docstring): LM matmuls, attention, and the frozen image path."""
    t = model.config.text_config
    per_token = 4 * n["lm_matmul"] + 6 * n["lora"] + 12 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * seq
    if full_finetune:
        per_token += 2 * n["lm_matmul"]  # weight gradients of every LM matrix
    v = model.config.vision_config
    per_image = 2 * n["vision"] * (v.num_patches + 1) + 2 * n["projector"] * v.num_patches
    per_image += 4 * v.num_hidden_layers * v.hidden_size * (v.num_patches + 1) ** 2  # ViT attention, forward
    return per_token * sequences * seq + per_image * images


def measured_peak_flops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of a large square matmul in ``dtype`` on ``device`` (2 size^3 FLOPs each), best of 5."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def make_batch(model: nn.Module, args, device: torch.device, dtype: torch.dtype):
    """2 x pairs rows (chosen rows first, then rejected), each [image tokens | text]; the last half of each
    row is the response. Returns input_ids [2P, T], pixel_values [2P or 0, 3, H, W], response mask [2P, T]."""
    c = model.config
    rows = 2 * args.pairs
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(4, c.text_config.vocab_size - 64, (rows, args.seq), generator=g)  # avoid special ids
    pixels = None
    if not args.no_image:
        n_img = c.image_tokens_per_image
        if n_img >= args.seq:
            raise ValueError(f"--seq {args.seq} leaves no room for text after {n_img} image tokens")
        ids[:, 1:1 + n_img] = c.image_token_index
        size = c.vision_config.image_size
        pixels = torch.randn(rows, 3, size, size, generator=g).to(device, dtype)
    mask = torch.zeros(rows, args.seq, dtype=torch.bool)
    mask[:, args.seq // 2:] = True
    return ids.to(device), pixels, mask.to(device)


def main():
    args = parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"config: {vars(args)}")
    model = build_model(args, device, dtype)
    n = count_params(model)
    input_ids, pixel_values, response = make_batch(model, args, device, dtype)
    P = args.pairs
    reference_logps = -torch.rand(2 * P, device=device) * 10 - 50  # cached reference log-probs, [2P]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and dtype == torch.bfloat16)

    def dpo_step() -> float:
        with autocast:
            logits = model(input_ids, pixel_values)  # [2P, T, V]
        logps = sequence_logprobs(logits[:, :-1], input_ids[:, 1:], response[:, 1:])  # [2P], float32
        losses, _, _ = dpo_loss(logps[:P], logps[P:], reference_logps[:P], reference_logps[P:], beta=0.1)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(losses.detach().mean())

    for _ in range(args.warmup):
        dpo_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = dpo_step()  # float(): one host sync per step, as the training loop does
    sync(device)
    seconds_per_step = (time.perf_counter() - start) / args.steps

    tokens = 2 * P * args.seq
    images = 0 if args.no_image else 2 * P
    flops = step_flops(model, n, sequences=2 * P, seq=args.seq, images=images, full_finetune=args.lora_r == 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    elif device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and \
            any(k in name for k in PEAK_TFLOPS):
        key = next(k for k in PEAK_TFLOPS if k in name)
        peak, peak_source = PEAK_TFLOPS[key] * 1e12, f"data sheet ({key}, dense {args.dtype})"
    else:
        size = 8192 if device.type == "cuda" else 1024
        peak, peak_source = measured_peak_flops(device, dtype, size), f"measured {size}x{size} {args.dtype} matmul"
    achieved = flops / seconds_per_step
    result = {
        "device": name, "preset": args.preset, "dtype": args.dtype, "lora_r": args.lora_r, "pairs": P,
        "seq": args.seq, "images_per_step": images, "activation_checkpointing": args.activation_checkpointing,
        "params_total": n["total"], "params_trainable": n["trainable"], "params_lm_matmul": n["lm_matmul"],
        "seconds_per_step": round(seconds_per_step, 6), "tokens_per_step": tokens,
        "tokens_per_s": round(tokens / seconds_per_step, 2),
        "model_flops_per_step": flops, "model_tflops_per_s": round(achieved / 1e12, 6),
        "peak_tflops": round(peak / 1e12, 4), "peak_source": peak_source, "mfu": round(achieved / peak, 4),
        "loss": round(loss, 6),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    for key, value in result.items():
        print(f"{key}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
