"""How much host memory does ``lvlm.load_lvlm`` need? Target: at most 1.2x the checkpoint's size.

    python recipes/measure_load_memory.py [--gb 2.0] [--shard-mb 512]

1. Builds a random LLaVA-shaped model of about ``--gb`` GB in float32 (CLIP ViT-L/14-336-like tower with
   fewer layers, a 2048-wide Llama with enough layers to reach the size), straight on the meta device
   and then filled in place, so the generator holds one copy of the weights; saves it with ``save_lvlm``
   (sharded) into a temporary directory, deleted at the end.
2. For each load dtype (float32: bytes read straight into the parameters; bfloat16: read, then cast),
   starts a fresh Python process (this script with ``--child``) that imports torch and lvlm, records its
   resident memory (the baseline), calls ``load_lvlm``, and records the peak resident memory (``VmHWM``
   in /proc/self/status).

What is measured: ``VmHWM`` counts anonymous memory *and* file pages mapped into the process. The loader
reads files with ``read()`` into the parameters' own memory (no ``mmap``), so the page cache used by those
reads is the kernel's, not the process's, and is not counted; the peak is the parameters themselves plus,
when casting, one staging tensor in its stored dtype. ``RssAnon`` after loading is printed as a cross-check.
``ru_maxrss`` is reported but not used: on Linux a child started by fork + exec inherits the parent's peak
in it (here the generator's), while ``VmHWM`` belongs to the new process image alone.
Prints one human line per load and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from lvlm.checkpoint import load_lvlm, save_lvlm  # noqa: E402
from lvlm.config import CLIPVisionConfig, LlamaConfig, LlavaConfig  # noqa: E402
from lvlm.llava import LlavaForConditionalGeneration  # noqa: E402


def status() -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def llava_config_of_size(target_bytes: int) -> LlavaConfig:
    """A LLaVA-shaped config whose float32 weights take about ``target_bytes`` (text layers added until then)."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    layers = 1
    while True:
        text = LlamaConfig(vocab_size=32064, hidden_size=2048, intermediate_size=5504, num_hidden_layers=layers,
                           num_attention_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, pad_token_id=32001)
        if n_params(config) * 4 >= target_bytes:
            return config
        layers += 1


def n_params(config: LlavaConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LlavaForConditionalGeneration(config).parameters())


def make_checkpoint(config: LlavaConfig, directory: Path, shard_bytes: int) -> int:
    """Random float32 weights saved with save_lvlm; returns the bytes on disk."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.to_empty(device="cpu")  # allocate once, uninitialised, then fill in place
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    save_lvlm(model, directory, max_shard_bytes=shard_bytes)
    del model
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def child(directory: str, dtype: str) -> None:
    """Runs in the fresh process: baseline, load, peak; one JSON line on stdout."""
    before = status()
    t0 = time.perf_counter()
    model = load_lvlm(directory, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - t0
    after = status()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"before": before, "after": after, "weights_bytes": weights, "seconds": seconds,
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure(directory: Path, dtype: str) -> dict:
    """Load ``directory`` in a fresh interpreter (this script with ``--child``) and return its numbers."""
    done = subprocess.run([sys.executable, __file__, "--child", str(directory), dtype], capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"the loading subprocess failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB (float32)")
    parser.add_argument("--shard-mb", type=int, default=512, help="max shard size for save_lvlm")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="load dtypes to measure, comma-separated")
    parser.add_argument("--tmp-dir", default=None, help="where the temporary checkpoint goes")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    print(f"resolved config: {vars(args)}", flush=True)

    config = llava_config_of_size(int(args.gb * 1e9))
    generator_baseline = status()["VmRSS"]
    work = Path(tempfile.mkdtemp(prefix="lvlm-load-memory-", dir=args.tmp_dir))
    results = {}
    try:
        t0 = time.perf_counter()
        file_bytes = make_checkpoint(config, work / "ckpt", args.shard_mb * 2**20)
        n_files = len(list((work / "ckpt").glob("*.safetensors")))
        generator_peak = status()["VmHWM"] - generator_baseline
        print(f"checkpoint: {file_bytes / 1e9:.2f} GB in {n_files} shards ({config.text_config.num_hidden_layers} "
              f"text layers), written in {time.perf_counter() - t0:.1f} s; the generator's peak RSS over its "
              f"baseline {generator_peak / 1e9:.2f} GB", flush=True)
        for dtype in args.dtypes.split(","):
            r = measure(work / "ckpt", dtype)
            peak = r["after"]["VmHWM"] - r["before"]["VmRSS"]
            anon = r["after"]["RssAnon"] - r["before"]["RssAnon"]
            results[dtype] = {
                "baseline_rss_bytes": r["before"]["VmRSS"],
                "peak_minus_baseline_bytes": peak,
                "rss_anon_growth_bytes": anon,
                "ru_maxrss_bytes": r["ru_maxrss"],
                "loaded_weights_bytes": r["weights_bytes"],
                "peak_over_file_size": round(peak / file_bytes, 3),
                "peak_over_loaded_weights": round(peak / r["weights_bytes"], 3),
                "load_seconds": round(r["seconds"], 2),
            }
            print(f"load_lvlm(dtype={dtype}): peak RSS over baseline {peak / 1e9:.2f} GB = "
                  f"{peak / file_bytes:.2f}x the file size ({peak / r['weights_bytes']:.2f}x the loaded weights; "
                  f"anonymous memory grew {anon / 1e9:.2f} GB; baseline {r['before']['VmRSS'] / 1e9:.2f} GB) "
                  f"in {r['seconds']:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(r["peak_over_file_size"] <= 1.2 for r in results.values())
    print(json.dumps({"file_bytes": file_bytes, "n_params": n_params(config), "generator_peak_bytes": generator_peak,
                      "target_ratio": 1.2,
                      "within_target": ok, "loads": results}))


if __name__ == "__main__":
    main()
