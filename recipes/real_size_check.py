"""One CSR iteration on real-size models with random weights: the path a LLaVA-1.5 run takes, end to end.

    python recipes/real_size_check.py                 # GPU: llava-1.5-7b and CLIP ViT-L/14-336 shapes, bfloat16
    python recipes/real_size_check.py --size tiny     # CPU: the same path with tiny models (the tests run it)

No weights can be downloaded, so this writes stand-ins with the real shapes into ``--work`` (default
``runs/real-size-check``) and hands them to ``recipes/csr.py`` exactly as a user's files would be:

- ``model/``: a ``LlavaForConditionalGeneration`` of the ``lvlm.config`` preset, random weights, saved by
  ``save_lvlm`` (sharded safetensors, Hugging Face layout) with a word-level ``tokenizer.json`` covering
  every id of its vocabulary (the world's words, then fillers; ``<image>`` and ``<pad>`` at the
  preset's ids, 32000 and 32001 for LLaVA-1.5);
- ``clip/``: a random ``CLIPModel`` of the CLIP preset, saved by ``save_clip``, with its own tokenizer;
- ``images/`` and ``prompts.jsonl``: ``--prompts`` world images as PNG files, each with a description
  instruction.

Then one CSR iteration runs on them (``csr.main``: the paper's preset, with a short length budget
because random weights rarely end a sentence): batched sentence-level beam search with the calibrated
reward (CUDA-graph decoding on a GPU), DPO with LoRA against the loaded model, the merge, the save.
It prints seconds per prompt of each stage from the run's ``timings.json`` and returns them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm.checkpoint import save_clip, save_lvlm  # noqa: E402
from lvlm.clip import CLIPModel  # noqa: E402
from lvlm.config import preset  # noqa: E402
from lvlm.llava import LlavaForConditionalGeneration  # noqa: E402
from lvlm.tokenizer import ASSISTANT_ROLE, SYSTEM, USER_ROLE  # noqa: E402
from lvlm.world import WorldConfig  # noqa: E402
from lvlm.world.text import DESCRIPTION_INSTRUCTIONS  # noqa: E402
from lvlm.world.tokenizer import world_decoder, world_pre_tokenizer, world_words  # noqa: E402
from recipes._common import built_on  # noqa: E402

# name -> (LLaVA preset, CLIP preset)
SIZES = {"7b": ("llava-1.5-7b", "clip-vit-large-patch14-336"), "tiny": ("tiny-llava", "tiny-clip")}


def word_level_tokenizer_json(vocab_size: int, special: dict[int, str]) -> str:
    """A word-level tokenizer.json with exactly ``vocab_size`` ids: ``special`` tokens at their ids (added
    tokens), then in the free ids from the lowest the words of LLaVA's template and the description
    instructions, the world's other words while ids last, and "w<id>" fillers in the rest, so that every id
    a random model samples decodes to a word."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models

    pre_tokenizer = world_pre_tokenizer()
    first = [w for text in (SYSTEM, f"{USER_ROLE}: {ASSISTANT_ROLE}:", *DESCRIPTION_INSTRUCTIONS)
             for w, _ in pre_tokenizer.pre_tokenize_str(text.replace("<image>", " "))]
    words = [w for w in dict.fromkeys([*first, *world_words()]) if w not in special.values()]
    free = [i for i in range(vocab_size) if i not in special]
    words = words[:len(free)]
    vocab = {token: i for i, token in special.items()}
    vocab.update({word: i for word, i in zip(words, free)})
    vocab.update({f"w{i}": i for i in free[len(words):]})
    tokenizer = RawTokenizer(models.WordLevel(vocab, unk_token=special.get(0, "<unk>")))
    tokenizer.add_special_tokens([special[i] for i in sorted(special)])
    tokenizer.pre_tokenizer = world_pre_tokenizer()
    tokenizer.decoder = world_decoder()
    return tokenizer.to_str()


def write_inputs(work: Path, size: str, n_prompts: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The stand-in checkpoints, images and prompts of the module docstring; returns their paths."""
    from recipes.world_models import render_world_image

    llava_name, clip_name = SIZES[size]
    llava_config, clip_config = preset(llava_name), preset(clip_name)
    text = llava_config.text_config
    special = {0: "<unk>", 1: "<s>", 2: "</s>", llava_config.image_token_index: "<image>", llava_config.pad_token_id: "<pad>"}
    clip_text = clip_config.text_config
    clip_special = {0: "<unk>", clip_text.bos_token_id: "<|startoftext|>", clip_text.eos_token_id: "<|endoftext|>"}
    paths = {"model": work / "model", "clip": work / "clip", "images": work / "images", "data": work / "prompts.jsonl"}
    if not (paths["model"] / "tokenizer.json").is_file():  # written last
        started = time.time()
        torch.manual_seed(0)
        with built_on(device, dtype):  # PyTorch's default random initialisation
            model = LlavaForConditionalGeneration(llava_config)
        save_lvlm(model, paths["model"])
        del model
        (paths["model"] / "tokenizer.json").write_text(word_level_tokenizer_json(text.vocab_size, special))
        print(f"wrote {paths['model']} ({llava_name}, random, {time.time() - started:.0f} s)", flush=True)
    if not (paths["clip"] / "tokenizer.json").is_file():
        with built_on(device, dtype):
            clip = CLIPModel(clip_config)
        save_clip(clip, paths["clip"])
        del clip
        (paths["clip"] / "tokenizer.json").write_text(word_level_tokenizer_json(clip_text.vocab_size, clip_special))
    paths["images"].mkdir(parents=True, exist_ok=True)
    world = WorldConfig()
    lines = []
    for seed in range(n_prompts):
        render_world_image(world, seed).save(paths["images"] / f"{seed}.png")
        lines.append(json.dumps({"image": f"{seed}.png", "question": DESCRIPTION_INSTRUCTIONS[seed % len(DESCRIPTION_INSTRUCTIONS)]}) + "\n")
    paths["data"].write_text("".join(lines))
    return paths


def main(argv=None) -> dict:
    from recipes import csr

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 7b on a GPU, tiny on a CPU")
    parser.add_argument("--prompts", type=int, default=8)
    # At 7B shapes a prompt's beams (k=2 kept, 5 candidates each: 20 rows) hold ~730 positions of KV cache
    # each, 0.5 MB per position: 2 prompts per call is ~15 GB beside the 13.5 GB of weights.
    parser.add_argument("--prompts_per_call", type=int, default=2)
    parser.add_argument("--work", default="runs/real-size-check")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    size = args.size or ("7b" if gpu else "tiny")
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    work = Path(args.work)
    paths = write_inputs(work, size, args.prompts, dtype, device)
    if gpu:
        torch.cuda.empty_cache()

    started = time.time()
    summary = csr.main([
        "--preset", "paper", "--model", str(paths["model"]), "--clip", str(paths["clip"]),
        "--data", str(paths["data"]), "--images", str(paths["images"]), "--out", str(work / "csr"),
        "--iterations", "1", "--n_prompts", str(args.prompts), "--prompts_per_call", str(args.prompts_per_call),
        "--max_sentence_tokens", "24", "--max_total_tokens", "96", "--max_sentences", "4",
        "--global_batch_size", str(min(8, args.prompts)), "--micro_batch_size", "1",
        *([] if gpu else ["--bf16", "false"]),
    ])
    seconds = json.loads((work / "csr" / "iter1" / "timings.json").read_text())["seconds"]
    result = {"size": size, "device": torch.cuda.get_device_name() if gpu else "cpu", "prompts": args.prompts,
              "seconds": seconds, "seconds_per_prompt": {k: round(v / args.prompts, 2) for k, v in seconds.items()},
              "wall": round(time.time() - started, 1), "summary": summary}
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}))
    return result


if __name__ == "__main__":
    main()
