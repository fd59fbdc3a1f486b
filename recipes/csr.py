"""CSR: Calibrated Self-Rewarding vision-language models (Zhou et al. 2024, arXiv 2405.14622), end to end.

    python recipes/csr.py                                  # the built-in world (its models are built if absent)
    python recipes/csr.py --lam 0 --out runs/csr-lam0      # the self-rewarding-only ablation
    python recipes/csr.py --model llava-1.5-7b-hf --clip clip-vit-large-patch14-336 \\
        --data prompts.jsonl --images coco/train2014 --out runs/csr-7b
    torchrun --nproc_per_node 8 recipes/csr.py --model ... --clip ... --data ... --images ...

The algorithm (paper Sec. 3; ANCHORS §1), per iteration t = 1..T, starting from the SFT model:

1. prompts: (image, request for a detailed description) pairs;
2. sentence-level beam search with the current model (``search.sentence_beam``): every live beam
   proposes C candidate sentences, each scored with the calibrated reward
   ``R(s) = lam * R_I(s) + (1 - lam) * R_T(s)`` (``rewards.csr_scorer.CalibratedScorer``; R_I the
   clipped CLIP score of the sentence alone against the image, R_T the sentence's mean token
   log-prob under the model); of all new nodes of a prompt the k best and k worst by cumulative
   reward survive; a path ends at "</s>" or at a length cap;
3. of the finished responses of a prompt, the highest cumulative reward is *chosen* and the lowest
   *rejected* (``search.chosen_and_rejected``; with the released code's rank mix, ``--normalize rank``,
   the path's average rank instead, as released); a prompt with fewer than two distinct responses
   gives no pair (a ``"skip"`` record);
4. the pairs are collected rank by rank, record by record (``recipes._run.collect``: resumable, no
   duplicates, no gaps), each with the reference model's log-probs of both responses -- the
   reference is the current model, before this iteration's update (``recipes._dpo.add_reference_logps``);
5. DPO (sigmoid, beta 0.1, summed log-probs) with LoRA (r 128, alpha 256, dropout 0.05) on the
   language model, adapters merged back afterwards (``recipes._dpo.train_dpo``);
6. the model is saved in the Hugging Face layout, evaluated (CHAIR, POPE, multiple choice) and
   becomes the next iteration's model and reference.

Outputs (``--out DIR``, see ``recipes/_run.py``): ``baseline/metrics.json`` (the SFT model),
``iter{t}/pairs.jsonl`` (one record per prompt: question, image, chosen, rejected, their cumulative
rewards and per-sentence R_I / R_T / R, the reference log-probs; or ``"skip"``),
``iter{t}/model/`` (+ ``complete``), ``iter{t}/metrics.json``, ``iter{t}/timings.json``,
``summary.json``. A rerun with the same command skips finished iterations and resumes collection.

Settings: ``CSRConfig()`` holds the paper's values (the preset ``paper``, used with ``--model``);
``WORLD_CSR`` is tuned for the built-in world (the preset ``world``, used without ``--model``) and
``MICRO_CSR`` is the seconds-long run of the tests (``--preset micro``). What the world changes, and
why: the paper's lr 1e-7 moves a 7B model (4096-wide layers, summed log-probs over ~100-token
responses) but leaves a 128-wide model with a few hundred pairs where it was, so the world trains its
adapters at a higher lr for a few epochs; a few hundred fresh training-split scenes per iteration
replace 13k COCO images; short caps fit its 1-5 sentence descriptions; and the DPO loss adds the
chosen response's mean token NLL (``--w_sft 1``, not in the paper), without which the model also
learns from the pairs to stop early, and InstructGPT's ptx term on replayed SFT conversations
(``--ptx_coef 1``, ``recipes/_ptx.py``; not in the paper either), without which the description pairs
also lower POPE F1. Each value is listed in ``WORLD_CSR``'s comment. On the float32 world preset's models
``WORLD_CSR_ON`` also gives a sentence that repeats an earlier one of its path no CLIP score
(``--redundant_cos``, not in the paper either), weighs the SFT term 2 and sets DPO's beta to 0.25.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm.checkpoint import copy_tokenizer, load_clip, load_lvlm, save_lvlm  # noqa: E402
from lvlm.image import load_image as load_image_file  # noqa: E402
from lvlm.image import preprocess_image  # noqa: E402
from lvlm.records import read_located_records, write_json_atomic  # noqa: E402
from lvlm.tokenizer import IMAGE_MARKER, Tokenizer, encode_prompt  # noqa: E402
from optim.distributed import barrier, get_world_size, is_main_process, setup_distributed  # noqa: E402
from optim.train import TrainConfig  # noqa: E402
from recipes._common import (Progress, add_config_arguments, config_from_args, config_to_dict,  # noqa: E402
                             given_flags, print_config, set_cpu_threads, threads_per_process)
from recipes._dpo import (LoraSettings, PreferencePairs, add_reference_logps, check_batch_splits,  # noqa: E402
                          check_dpo_settings, train_dpo)
from recipes._ptx import replay_dataset, replay_source  # noqa: E402
from recipes._run import collect, mark_done, model_done, open_run, print_summary, write_summary  # noqa: E402
from rewards.calibrated import rank_path_score  # noqa: E402
from rewards.csr_scorer import CalibratedScorer  # noqa: E402
from search.sampling_ops import mix_seeds  # noqa: E402
from search.sentence_beam import chosen_and_rejected, sentence_beam_search  # noqa: E402

RECIPE = "csr"

# ---------------------------------------------------------------------------------------------
# the config and its presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CSRConfig:
    """CSR's settings; the defaults are the paper's / the released code's (ANCHORS §1).

    Inputs: ``model`` (LLaVA directory, Hugging Face layout, tokenizer.json beside it), ``clip`` (CLIP
    directory), ``data`` (JSONL / JSON of ``{"image", "question"}`` records or LLaVA conversations:
    the first question is the prompt), ``images`` (folder the records' image names are relative to).
    All None: the built-in world (``world_preset`` names its models).
    Evaluation on real data: ``eval_annotations`` (a COCO instances file), ``eval_image_dir``,
    ``eval_synonyms`` (CHAIR's synonym file); without them the iterations are not evaluated.
    """

    model: str | None = None
    clip: str | None = None
    data: str | None = None
    images: str | None = None
    eval_annotations: str | None = None
    eval_image_dir: str | None = None
    eval_synonyms: str | None = None
    out: str = "runs/csr"
    world_preset: str = "auto"  # the world's models: "auto" (float32 on a CPU, default with a GPU), or a WORLD_PRESETS name
    seed: int = 0
    iterations: int = 3  # the paper's main table
    n_prompts: int | None = None  # prompts per iteration (None: every record of --data)
    prompts_per_call: int = 8  # prompts searched together in one batched beam search
    # the calibrated reward (paper Eq. 3)
    lam: float = 0.9  # weight of the CLIP score R_I; 0 = self-rewarding only (no CLIP needed)
    normalize: str = "none"  # "none" (paper) | "rank" (the released code's rank mix)
    self_reduce: str = "mean"  # R_T: "mean" (released code) or "sum" of the sentence's token log-probs
    # not in the paper: R_I = 0 for a sentence whose CLIP text features have cosine >= this with an earlier
    # sentence of its path (it repeats it; rewards/csr_scorer.py); None: off, as in the paper
    redundant_cos: float | None = None
    # the sentence-level beam search (released code: 5 candidates per beam, 70 tokens per sentence)
    n_candidates: int = 5
    k: int = 2  # nodes kept per depth: the k best ...
    k_bottom: int | None = None  # ... and the k_bottom worst (None: k, the paper)
    proposal: str = "sample"  # "sample" | "diverse" (the released code's diverse beam groups)
    temperature: float = 1.0
    top_p: float = 1.0
    diversity_penalty: float = 3.0
    max_sentence_tokens: int = 70
    max_sentences: int | None = None
    max_total_tokens: int = 512
    min_chars: int = 4  # shorter candidate sentences are dropped (released code)
    delimiters: tuple = (".",)  # sentence ends
    # DPO with LoRA (paper: sigmoid, beta 0.1, summed log-probs, r 128 / alpha 256 / dropout 0.05,
    # lr 1e-7 cosine, 3% warm-up, 1 epoch, bf16); the batch size is not in ANCHORS: 8 = one pair per GPU
    beta: float = 0.1
    loss_type: str = "sigmoid"
    w_sft: float = 0.0  # > 0: add w_sft x the chosen response's mean token NLL (not in the paper)
    lr: float = 1e-7
    warmup_ratio: float = 0.03
    epochs: int = 1
    global_batch_size: int = 8
    micro_batch_size: int = 1
    weight_decay: float = 0.0
    lora_r: int = 128
    lora_alpha: float = 256.0
    lora_dropout: float = 0.05
    bf16: bool = True
    ref_batch_size: int = 8  # pairs per reference forward during collection
    # InstructGPT's ptx term (not in the paper; recipes/_ptx.py): + ptx_coef x the answer NLL of an SFT
    # conversation replayed beside each pair; the conversations: --ptx_data (LLaVA's conversation JSON,
    # images under --images), on the world its SFT data's short-answer turns; ptx_examples per iteration
    ptx_coef: float = 0.0
    ptx_data: str | None = None
    ptx_examples: int = 384
    # evaluation
    eval_images: int = 500
    eval_batch_size: int = 64
    eval_max_new_tokens: int = 128  # the description budget (recipes/evaluate.py's default)


PAPER_CSR = CSRConfig()

# The built-in world (see the module docstring). Differences from the paper and why:
#   n_prompts 384 fresh training-split scenes per iteration (paper: the same ~13k COCO images);
#   prompts_per_call 32: more rows per batched decode step, which is what is fast on a CPU;
#   max_sentence_tokens 24, max_total_tokens 96, max_sentences 8: world sentences are ~10 tokens and
#     descriptions at most 5 sentences;
#   temperature 0.7 for the sampled candidates (the paper gives none; the released code proposes by
#     diverse beam search): at 1.0 many candidates are broken sentences, and the rejected response is
#     then a broken one rather than a hallucinating one;
#   lr, epochs, global_batch_size, lora_r / lora_alpha: a 128-wide, 3-layer decoder and a few hundred
#     pairs need a larger step than a 7B model and 13k pairs to move at all (lr 1e-7 changes nothing).
#     Measured on the current world models (CHAIR_s / recall after 3 iterations, SFT 25.5 / 79.8):
#     256 prompts at temperature 1.0, lr 1e-4: 10.5 / 71.1; at 0.7: 11.5 / 73.9; 384 prompts at 0.7,
#     lr 1e-4: 9.5 / 72.7, lr 5e-5: 12.5 / 74.3 (and 12.5 / 75.0, 12.0 / 75.2 in two runs before the
#     adapters' initialisation was seeded; docs/CSR.md). On the per-description world build (SFT 31.5 /
#     85.6, POPE F1 78.09), lr 5e-5: 20.5 / 85.0 (F1 77.73) after 3 iterations; lr 1e-4: 14.5 / 83.4
#     (F1 77.61), the preset now;
#     micro batch 8: the global batch of 16 splits over 1 or 2 processes (torchrun --nproc_per_node 2);
#   w_sft 1.0 (the paper's DPO has none): the chosen responses are shorter than the rejected ones (2.7
#     against 3.1 sentences at iteration 1, the rejected one's extra sentence is mostly the made-up one),
#     and plain DPO also learns to stop early, which costs recall; the chosen response's own likelihood
#     in the loss keeps it covering the objects (iteration 3 on the current world models: 11.0 / 75.2,
#     against 12.5 / 74.3 with w_sft 0 and the previous reward CLIP; docs/CSR.md);
#   ptx_coef 1.0 (InstructGPT's ptx term, not in the paper; recipes/_ptx.py): the SFT data's yes/no,
#     multiple-choice and short-answer turns replayed beside each pair. Without it the description pairs
#     pulled POPE F1 below the SFT model's at every iteration (78.09 -> 77.68 / 77.83 / 77.56, CHAIR_s
#     21.5 / 14.5 / 14.5); with it 77.98 / 78.10 / 77.86 at CHAIR_s 22.0 / 14.0 / 14.5, recall
#     84.6 / 84.2 / 83.0; at 3.0, 78.38 / 76.76 / 77.87 (docs/RESULTS.md);
#   eval_images 1000: the world's whole test split. On 200 images CHAIR_s moves by about 2 points (one
#     standard error) from one image set to another, as much as the margins the targets are judged by:
#     on the Intel models (SFT CHAIR_s 22.5% on the first 200, 20.5% on all 1,000) CSR's last iteration
#     cut it by 49% on the first 200 and by 42% on all 1,000 (docs/WORLD_BUILDS.md).
WORLD_CSR = dataclasses.replace(
    PAPER_CSR, out="runs/csr-world", n_prompts=384, prompts_per_call=32,
    max_sentence_tokens=24, max_total_tokens=96, max_sentences=8, temperature=0.7,
    lr=1e-4, epochs=2, global_batch_size=16, micro_batch_size=8, lora_r=16, lora_alpha=32.0, bf16=False,
    ref_batch_size=32, eval_images=1000, w_sft=1.0, ptx_coef=1.0,
)

# The tests' run: the micro world models (not meant to work), one iteration, a few prompts.
MICRO_CSR = dataclasses.replace(
    WORLD_CSR, out="runs/csr-micro", world_preset="micro", iterations=1, n_prompts=4, prompts_per_call=2,
    n_candidates=2, k=1, max_sentence_tokens=8, max_total_tokens=16, max_sentences=2,
    global_batch_size=2, micro_batch_size=1, lora_r=4, lora_alpha=8.0, ref_batch_size=4, eval_images=4,
    eval_batch_size=16, eval_max_new_tokens=24,
)

PRESETS = {"paper": PAPER_CSR, "world": WORLD_CSR, "micro": MICRO_CSR}

# What ``world`` changes on a world preset's models. The float32 preset's (what ``auto`` picks on a CPU) SFT
# model of the AMD Zen 3 build, the one these settings were tuned on, names an object twice, at two places,
# in 28% of its descriptions, and its reward CLIP barely tells places apart, so the summed R_I paid for
# repeats: the chosen response repeated in 64% of the pairs, the rejected one in 32%, and recall fell 7.9 /
# 19.3 / 23.9 points over the iterations (the Intel CPUs build other models: docs/RESULTS.md).
# redundant_cos 0.8 zeroes R_I for a sentence that close to an earlier one of its path (rewards/csr_scorer.py;
# not in the paper): in that CLIP's text features 89% of the pairs of sentences about the same object are
# that close and 0.9% of those about different objects. On those models (CHAIR_s / recall / F1, iterations
# 1 / 2 / 3; SFT 32.0 / 81.2 / 73.92): without it 19.0 / 15.5 / 13.5, 73.3 / 61.9 / 57.3; with it (w_sft 1)
# 13.5 / 12.0 / 10.5, 76.0 / 76.0 / 73.1, F1 74.16 / 73.99 / 74.33; with w_sft 2, 14.0 / 12.5 / 10.5,
# 76.4 / 74.9 / 72.1, F1 74.07 / 73.99 / 74.27, all three targets at iteration 1 (w_sft 3: the same CHAIR_s
# at iteration 1, recall 76.6 / 74.9 / 69.9). The descriptions still shortened over the iterations: that
# reward CLIP zeroed 21% of the true sentences about one object of several, so the search ended responses
# before those objects. With the preset's reward CLIP now trained on fewer one-object scenes
# (``reward_clip_single_object_share``) and DPO's beta 0.25, keeping each iteration nearer the last:
# 13.5 / 15.0 / 14.0, 77.3 / 77.1 / 81.6, F1 74.08 / 73.88 / 74.14 (seed 1: 14.5 / 12.5 / 14.5,
# 77.5 / 74.5 / 78.4, 74.03 / 74.24 / 73.96), all three targets at the first and last iterations
# (seed 2: at the second only, F1 0.06 short at the last; docs/CSR.md). The default build was measured
# without these.
WORLD_CSR_ON = {"float32": {"redundant_cos": 0.8, "w_sft": 2.0, "beta": 0.25}}


def is_world(config: CSRConfig) -> bool:
    """No real checkpoint given: CSR runs on the built-in world."""
    return config.model is None


# ---------------------------------------------------------------------------------------------
# inputs: models, prompts, images, the evaluation set
# ---------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What a run reads. ``prompts(t)`` -> the items of iteration t: ``{"image": reference, "question"}``;
    ``load_image(reference)`` -> a PIL image; ``eval_set`` an ``EvalSet`` or None (with ``eval_note``)."""

    model: Path
    clip: Path | None
    prompts: Callable[[int], list[dict]]
    load_image: Callable
    eval_set: object | None
    eval_note: str = ""
    replay: Callable[[int], list[dict]] | None = None  # iteration t -> its ptx replay conversations


def world_prompts(world, n: int, iteration: int) -> list[dict]:
    """Iteration t's prompts on the world: n fresh training-split scenes (scenes [(t-1) n, t n), wrapping
    around the split) with one of the world's description instructions each. The test split is never used."""
    from lvlm.world import description_instruction, sample_scene, split_seeds

    seeds = split_seeds("train", world)
    items = []
    for i in range(n):
        seed = seeds[((iteration - 1) * n + i) % len(seeds)]
        items.append({"image": seed, "question": description_instruction(sample_scene(seed, world), iteration)})
    return items


def strip_image_marker(question: str) -> str:
    """A question without LLaVA's "<image>" marker (the chat template puts the image in front itself)."""
    return question.replace(IMAGE_MARKER + "\n", "").replace("\n" + IMAGE_MARKER, "").replace(IMAGE_MARKER, "").strip()


def load_prompt_records(path: str | Path, images: str | Path | None) -> list[dict]:
    """Prompts from ``path``: JSONL (or a JSON list) of ``{"image": file, "question": text}`` records, or of
    LLaVA conversations (``{"image", "conversations": [{"from": "human", "value": ...}, ...]}``: the first
    question). Every record needs an image, which must exist under ``images``.

    All problems are collected and reported at once (the first 10), each naming ``file:line`` (JSONL) or
    ``file record N`` (JSON), before any model is loaded. Returns ``[{"image": path, "question"}]``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data: no such file: {path}")
    images_dir = Path(images) if images is not None else None
    problems, missing, prompts = [], [], []
    for where, record in read_located_records(path):
        question = record.get("question")
        if question is None and isinstance(record.get("conversations"), list) and record["conversations"]:
            first = record["conversations"][0]
            question = first.get("value") if isinstance(first, dict) and first.get("from") in ("human", "user") else None
        if not isinstance(question, str) or not strip_image_marker(question):
            problems.append(f"{where}: needs a non-empty 'question' (or 'conversations' starting with a human turn)")
            continue
        image = record.get("image")
        if not isinstance(image, str) or not image:
            problems.append(f"{where}: needs an 'image' file name (CSR scores every sentence against its image)")
            continue
        if images_dir is None:
            problems.append(f"{where}: has an image ({image!r}) but no image folder was given (--images)")
            continue
        if not (images_dir / image).is_file():
            missing.append(f"{where}: {images_dir / image}")
            continue
        prompts.append({"image": str(images_dir / image), "question": strip_image_marker(question)})
    if problems:
        raise ValueError(f"{len(problems)} malformed record(s) in {path}:\n  " + "\n  ".join(problems[:10]))
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) of {path} not found:\n  " + "\n  ".join(missing[:10]))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def resolve_inputs(config: CSRConfig) -> Inputs:
    """Check every input before any work (a missing file or a malformed record fails here) and return them."""
    from recipes.evaluate import coco_eval_set, world_eval_set

    if is_world(config):
        from recipes.world_models import ensure_world_models, render_world_image, world_preset

        preset = world_preset(config.world_preset)
        if config.n_prompts is None or config.n_prompts < 1:
            raise ValueError("--n_prompts must be a positive number on the built-in world")
        models = ensure_world_models(preset)  # trained now if not cached
        world = preset.world
        replay = replay_source(config.ptx_examples, world=preset) if config.ptx_coef > 0 else None
        return Inputs(model=models.sft, clip=models.reward_clip,
                      prompts=functools.partial(world_prompts, world, config.n_prompts),
                      load_image=functools.partial(render_world_image, world),
                      eval_set=world_eval_set(world, n_images=config.eval_images, split="test"), replay=replay)

    missing = [name for name in ("model", "data", "images") if getattr(config, name) is None]
    if config.lam > 0 and config.clip is None:
        missing.append("clip (or --lam 0)")
    if missing:
        raise ValueError(f"a run on real checkpoints needs --{', --'.join(missing)}")
    for name in ("model",) + (("clip",) if config.lam > 0 else ()):
        directory = Path(getattr(config, name))
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"--{name} {directory}: no config.json there (a Hugging Face model directory)")
    if not (Path(config.model) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--model {config.model}: no tokenizer.json beside the weights")
    if config.lam > 0 and not (Path(config.clip) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--clip {config.clip}: no tokenizer.json (CLIP's text tokenizer)")
    records = load_prompt_records(config.data, config.images)
    n = len(records) if config.n_prompts is None else min(config.n_prompts, len(records))
    replay = None
    if config.ptx_coef > 0:
        if config.ptx_data is None:
            raise ValueError("--ptx_coef > 0 on real checkpoints needs --ptx_data (SFT conversations, LLaVA's JSON)")
        replay = replay_source(config.ptx_examples, ptx_data=config.ptx_data, images=config.images)
    eval_set, note = None, "no --eval_annotations/--eval_image_dir given: iterations are not evaluated"
    if config.eval_annotations is not None:
        if config.eval_image_dir is None:
            raise ValueError("--eval_annotations needs --eval_image_dir (the folder of its images)")
        eval_set, note = coco_eval_set(config.eval_annotations, config.eval_image_dir, config.eval_synonyms,
                                       n_images=config.eval_images, seed=config.seed), ""
    return Inputs(model=Path(config.model), clip=Path(config.clip) if config.clip else None,
                  prompts=lambda t: records[:n], load_image=load_image_file, eval_set=eval_set, eval_note=note,
                  replay=replay)


def check_model_matches_tokenizer(model, tokenizer: Tokenizer, where: Path) -> None:
    """The checkpoint and its tokenizer.json must agree on the image token and fit the vocabulary."""
    image_id = tokenizer.image_token_id
    if image_id != model.config.image_token_index:
        raise ValueError(f"{where}: tokenizer.json's <image> is id {image_id} but config.json says "
                         f"image_token_index={model.config.image_token_index}")
    if tokenizer.vocab_size > model.config.text_config.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"only {model.config.text_config.vocab_size}")


def clip_text_tokenizer(clip_dir: Path, clip) -> Callable[[list[str]], torch.Tensor]:
    """Texts -> CLIP text ids ``[N, T]`` with the CLIP directory's own tokenizer.json (``"<s> words <pad>"`` for
    the world's CLIP, ``<|startoftext|> ... <|endoftext|>`` for OpenAI's), cut to CLIP's context."""
    from tokenizers import Tokenizer as RawTokenizer

    from recipes.world_models import encode_clip_texts

    raw = RawTokenizer.from_file(str(clip_dir / "tokenizer.json"))
    if raw.truncation is None:
        raw.enable_truncation(max_length=clip.config.text_config.max_position_embeddings)
    return functools.partial(encode_clip_texts, raw)


def delimiter_token_ids(tokenizer: Tokenizer, delimiters: Sequence[str]) -> list[int]:
    """Ids of the vocabulary's tokens that are a sentence delimiter, alone or with a word-start marker
    ("." and "▁." in a Llama vocabulary; "." in the world's)."""
    wanted = set(delimiters)
    ids = [i for token, i in tokenizer.raw.get_vocab(with_added_tokens=True).items()
           if token.replace("\u2581", "").replace("\u0120", "").strip() in wanted]
    if not ids:
        raise ValueError(f"the tokenizer at {tokenizer.path} has no token for the delimiters {list(delimiters)}")
    return sorted(ids)


# ---------------------------------------------------------------------------------------------
# steps 2-4: beam search with the calibrated reward -> preference pairs (with reference log-probs)
# ---------------------------------------------------------------------------------------------


def describe_sentences(response, parts) -> list[dict]:
    """Per sentence of a response: its text, R_I, R_T and the reward R the search added (for inspection)."""
    return [{"text": s.text.strip(), "R_I": round(r_i, 4), "R_T": round(r_t, 4), "R": round(s.score, 4)}
            for s, (r_i, r_t) in zip(response.sentences, parts)]


def pair_collector(model, tokenizer: Tokenizer, clip, clip_tokenize, load_image: Callable, config: CSRConfig,
                   iteration: int) -> Callable[[list[dict]], list[dict]]:
    """The ``work`` function of ``recipes._run.collect`` for one iteration: a batch of prompt items
    (``{"index", "image", "question"}``) -> one record per item.

    CSR steps 2-3 (paper Sec. 3.2): one batched ``sentence_beam_search`` over the batch, every candidate
    sentence scored by ``CalibratedScorer`` (each prompt's image encoded by CLIP once), then the
    highest- and lowest-scoring distinct responses of each prompt as (chosen, rejected). Then the
    reference log-probs of both (summed over the response tokens and "</s>") under ``model`` -- the
    current model, i.e. the reference of this iteration's DPO -- with ``add_reference_logps``.
    A prompt's search depends only on its seed ``mix_seeds(seed, iteration, index)``, so a rerun or
    another number of ranks gives the same pairs.
    """
    lvlm_size = model.config.vision_config.image_size
    per_image = model.config.image_tokens_per_image
    clip_size = clip.config.vision_config.image_size if clip is not None else None
    delimiters = delimiter_token_ids(tokenizer, config.delimiters)
    stop = list(tokenizer.stop_ids)

    def decode(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def rescored(response):
        """The response's score for choosing the pair: the summed reward (paper); with the rank mix, the
        released code's path average instead (its sentences' ranks over the path's nodes, the prompt's
        root node counted), negated so that higher is better. The search sums the negated ranks, which
        makes a path worse with every sentence it adds; compared across lengths, that sum would choose the
        shortest response, not the best-ranked one."""
        if config.normalize != "rank" or not response.sentences:
            return response
        ranks = [-s.score for s in response.sentences]
        return dataclasses.replace(response, score=-float(rank_path_score(ranks, count_root=True)))

    def work(items: list[dict]) -> list[dict]:
        images = [load_image(item["image"]) for item in items]
        prompts = [(encode_prompt(tokenizer, item["question"], image_tokens_per_image=per_image)["input_ids"],
                    preprocess_image(image, size=lvlm_size)[None]) for item, image in zip(items, images)]
        clip_pixels = None
        if config.lam > 0:  # CLIP's own preprocessing (resize + centre-crop, no padding), as CLIPImageProcessor
            clip_pixels = torch.stack([preprocess_image(image, size=clip_size, pad_to_square=False) for image in images])
        scorer = CalibratedScorer(clip, clip_tokenize, clip_pixels, lam=config.lam, self_reduce=config.self_reduce,
                                  normalize=None if config.normalize == "none" else config.normalize,
                                  redundant_cos=config.redundant_cos)
        was_training = model.training
        model.eval()
        results = sentence_beam_search(
            model, prompts, delimiter_ids=delimiters, n_candidates=config.n_candidates, k=config.k,
            k_bottom=config.k_bottom, max_sentence_tokens=config.max_sentence_tokens,
            max_sentences=config.max_sentences, max_total_tokens=config.max_total_tokens, proposal=config.proposal,
            temperature=config.temperature, top_p=config.top_p, diversity_penalty=config.diversity_penalty,
            score_fn=scorer, decode_fn=decode, min_chars=config.min_chars, stop_ids=stop,
            seed=[mix_seeds(config.seed, iteration, item["index"]) for item in items])
        records = []
        for item, responses in zip(items, results):
            base = {"question": item["question"], "image": item["image"]}
            by_text: dict = {}
            for response in responses:  # the first response of each text
                by_text.setdefault(response.text.strip(), response)
            distinct = [rescored(r) for r in by_text.values()]
            pair = chosen_and_rejected(distinct)
            if pair is None or pair[0].score == pair[1].score:
                records.append({**base, "skip": f"{len(distinct)} distinct response(s) with distinct rewards; "
                                                 "a pair needs 2", "n_responses": len(responses)})
                continue
            chosen, rejected = pair
            records.append({
                **base, "chosen": chosen.text.strip(), "rejected": rejected.text.strip(),
                "chosen_reward": round(chosen.score, 4), "rejected_reward": round(rejected.score, 4),
                "chosen_sentences": describe_sentences(chosen, scorer.sentence_parts(chosen)),
                "rejected_sentences": describe_sentences(rejected, scorer.sentence_parts(rejected)),
                "n_responses": len(responses), "n_distinct": len(distinct),
            })
        pairs = [r for r in records if "skip" not in r]
        if pairs:  # step 4's reference: the current model, once, stored with the data (as RLAIF-V caches it)
            add_reference_logps(model, PreferencePairs(pairs, tokenizer, load_image=load_image, image_size=lvlm_size,
                                                       image_tokens_per_image=per_image),
                                batch_size=config.ref_batch_size)
            for r in pairs:
                r["ref_chosen_logp"], r["ref_rejected_logp"] = round(r["ref_chosen_logp"], 5), round(
                    r["ref_rejected_logp"], 5)
        model.train(was_training)
        return records

    return work


# ---------------------------------------------------------------------------------------------
# step 5: DPO with LoRA against the previous model
# ---------------------------------------------------------------------------------------------


def dpo_batch_size(config: CSRConfig, n_pairs: int, world_size: int) -> int:
    """The global batch: ``config.global_batch_size``, lowered (to a multiple of micro x ranks) when there
    are fewer pairs than that, so a small run still makes one step."""
    check_batch_splits(config.global_batch_size, config.micro_batch_size, world_size)
    unit = config.micro_batch_size * world_size
    if n_pairs < unit:
        raise ValueError(f"only {n_pairs} preference pair(s), fewer than one micro-batch per rank ({unit}); "
                         "use more prompts (--n_prompts)")
    return min(config.global_batch_size, n_pairs // unit * unit)


def dpo_update(model, pairs: list[dict], tokenizer: Tokenizer, load_image: Callable, config: CSRConfig,
               out_dir: Path, replay: list[dict] | None = None) -> dict:
    """CSR step 5: sigmoid DPO (Rafailov et al. 2023, Eq. 7) of ``model`` on ``pairs`` (reference log-probs
    already stored), LoRA on the language model, merged back; with ``replay`` (conversation records) the
    ptx term on them (``recipes._ptx``). Returns the last step's metrics."""
    replay_set = replay_dataset(replay, tokenizer, model, load_image) if replay else None
    dataset = PreferencePairs(pairs, tokenizer, load_image=load_image, image_size=model.config.vision_config.image_size,
                              image_tokens_per_image=model.config.image_tokens_per_image, replay=replay_set)
    batch = dpo_batch_size(config, len(pairs), get_world_size())
    train_config = TrainConfig(out_dir=str(out_dir), lr=config.lr, warmup_ratio=config.warmup_ratio,
                               epochs=config.epochs, global_batch_size=batch,
                               micro_batch_size=config.micro_batch_size, weight_decay=config.weight_decay,
                               bf16=config.bf16, seed=config.seed, log_every=10.0)
    lora = LoraSettings(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
    result = train_dpo(model, dataset, train_config, beta=config.beta, loss_type=config.loss_type,
                       w_sft=config.w_sft, ptx_coef=config.ptx_coef, lora=lora)
    model.requires_grad_(False)
    model.eval()
    return {k: float(v) for k, v in result.metrics.items()}


# ---------------------------------------------------------------------------------------------
# step 6: save and evaluate
# ---------------------------------------------------------------------------------------------


def save_iteration_model(model, source: Path, directory: Path) -> None:
    """Hugging Face layout + the tokenizer files of ``source`` + the ``complete`` marker (rank 0 writes)."""
    if is_main_process():
        save_lvlm(model, directory)
        copy_tokenizer(source, directory)
        mark_done(directory)
    barrier()


def evaluate_model(model, tokenizer: Tokenizer, inputs: Inputs, directory: Path, config: CSRConfig) -> dict:
    """Metrics of ``model`` on the evaluation set, read from ``directory/metrics.json`` when already there.
    Rank 0 evaluates, the other ranks wait; every rank returns the metrics ({} without an evaluation set)."""
    from recipes.evaluate import evaluate

    path = directory / "metrics.json"
    if inputs.eval_set is None:
        return {}
    if is_main_process() and not path.is_file():
        evaluate(model, tokenizer, inputs.eval_set, batch_size=config.eval_batch_size,
                 max_new_tokens=config.eval_max_new_tokens, out=path, details=directory / "eval_details.json")
    barrier()
    return json.loads(path.read_text())


def compute_device() -> torch.device:
    return setup_distributed()[2]


def load_model(path: Path, config: CSRConfig, device: torch.device):
    """The LLaVA model in float32 on CPU; on GPU in bf16 when ``config.bf16`` (LoRA adapters stay float32)."""
    dtype = torch.bfloat16 if device.type == "cuda" and config.bf16 else torch.float32
    model = load_lvlm(path, dtype=dtype, device=device)
    model.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------


def parse_config(argv=None) -> tuple[CSRConfig, argparse.Namespace]:
    """``--preset`` (default: ``world`` without ``--model``, ``paper`` with it), then any ``--field value``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="world (default without --model), paper (default with --model), micro (tests)")
    parser.add_argument("--stop_after", choices=("collect",), default=None,
                        help="collect: stop after iteration 1's data collection (to test that stage alone)")
    add_config_arguments(parser, PAPER_CSR)
    args = parser.parse_args(argv)
    given = config_from_args(args, PAPER_CSR)  # what the flags say, over the paper's defaults
    preset = args.preset or ("paper" if given.model is not None else "world")
    defaults = PRESETS[preset]
    if preset == "world":
        from recipes.world_models import resolve_world_preset

        world = resolve_world_preset(given.world_preset)
        defaults = dataclasses.replace(defaults, **WORLD_CSR_ON.get(world, {}))
    config = config_from_args(args, defaults)
    given_real = given_flags(config, ("clip", "data", "images", "ptx_data", "eval_annotations", "eval_image_dir",
                                      "eval_synonyms"))
    if config.model is None and given_real:
        parser.error(f"{' / '.join(given_real)} need --model (without it, the built-in world runs)")
    if config.n_candidates < 1 or config.k < 1 or (config.k_bottom is not None and config.k_bottom < 0):
        parser.error(f"--n_candidates and --k must be >= 1 and --k_bottom >= 0, got {config.n_candidates}, "
                     f"{config.k}, {config.k_bottom}")
    if config.temperature <= 0:
        parser.error(f"--temperature must be > 0 (the candidate sentences are sampled), got {config.temperature}")
    if config.normalize not in ("none", "rank"):
        parser.error(f"--normalize must be none or rank, got {config.normalize!r}")
    if not 0.0 <= config.lam <= 1.0:
        parser.error(f"--lam must lie in [0, 1], got {config.lam}")
    if config.ptx_coef < 0 or config.ptx_examples < 1:
        parser.error(f"--ptx_coef must be >= 0 and --ptx_examples >= 1, got {config.ptx_coef}, {config.ptx_examples}")
    return config, args


def main(argv=None) -> dict:
    started = time.time()
    config, args = parse_config(argv)
    set_cpu_threads(threads_per_process())
    device = compute_device()
    if is_main_process():
        print_config(config, "csr")

    # inputs, checked before anything is computed; the run directory (a different config is refused)
    check_batch_splits(config.global_batch_size, config.micro_batch_size, get_world_size())
    check_dpo_settings(beta=config.beta, lr=config.lr, lora_r=config.lora_r)
    inputs = resolve_inputs(config)
    out = open_run(config.out, RECIPE, config_to_dict(config), models={"policy": inputs.model, "clip": inputs.clip})
    tokenizer = Tokenizer.from_file(inputs.model)
    clip = load_clip(inputs.clip, dtype=torch.float32, device=device).eval() if config.lam > 0 else None
    clip_tokenize = clip_text_tokenizer(inputs.clip, clip) if clip is not None else None
    timings: dict = {}

    # baseline: the SFT model before iteration 1
    model_dir = inputs.model
    model = load_model(model_dir, config, device)
    check_model_matches_tokenizer(model, tokenizer, model_dir)
    t = time.time()
    baseline = {} if args.stop_after else evaluate_model(model, tokenizer, inputs, out / "baseline", config)
    timings["baseline_eval"] = round(time.time() - t, 1)
    if inputs.eval_note and is_main_process():
        print(f"note: {inputs.eval_note}", flush=True)

    history = []
    for iteration in range(1, config.iterations + 1):
        it_dir = out / f"iter{iteration}"
        if model_done(it_dir / "model"):  # finished by an earlier run: its model is the next reference
            model_dir, model = it_dir / "model", None
            if is_main_process():
                print(f"[iter {iteration}] done earlier: {model_dir}", flush=True)
            if inputs.eval_set is not None and not (it_dir / "metrics.json").is_file():  # killed before its eval
                model = load_model(model_dir, config, device)
            history.append(evaluate_model(model, tokenizer, inputs, it_dir, config))
            continue
        if model is None:
            model = load_model(model_dir, config, device)
        stage = {}

        # 1-4. prompts -> sentence-level beam search with the calibrated reward -> (chosen, rejected) pairs
        t = time.time()
        items = [{"index": i, **item} for i, item in enumerate(inputs.prompts(iteration))]
        work = pair_collector(model, tokenizer, clip, clip_tokenize, inputs.load_image, config, iteration)
        records = collect(items, work, it_dir, "pairs", batch_size=config.prompts_per_call,
                          what=f"[iter {iteration}] beam search")
        pairs = [r for r in records if "skip" not in r]
        stage["collect"] = round(time.time() - t, 1)
        if is_main_process():
            print(f"[iter {iteration}] {len(pairs)} pairs from {len(records)} prompts "
                  f"({len(records) - len(pairs)} skipped) in {stage['collect']:.0f} s", flush=True)
        if args.stop_after == "collect":
            return {"records": records}
        if not pairs:
            raise ValueError(f"iteration {iteration}: no preference pairs ({len(records)} prompts, none with two "
                             "distinct responses); raise --n_candidates or --temperature")

        # 5. DPO with LoRA against the current model (its log-probs are in the pairs), merged back
        t = time.time()
        replay = inputs.replay(iteration) if inputs.replay is not None else None
        dpo_metrics = dpo_update(model, pairs, tokenizer, inputs.load_image, config, it_dir / "train", replay)
        stage["dpo"] = round(time.time() - t, 1)

        # 6. save, evaluate
        t = time.time()
        save_iteration_model(model, inputs.model, it_dir / "model")
        model_dir = it_dir / "model"
        stage["save"] = round(time.time() - t, 1)
        t = time.time()
        metrics = evaluate_model(model, tokenizer, inputs, it_dir, config)
        stage["eval"] = round(time.time() - t, 1)
        history.append(metrics)
        timings[f"iter{iteration}"] = stage
        if is_main_process():
            write_json_atomic(it_dir / "timings.json", {"seconds": stage, "dpo": dpo_metrics,
                                                        "pairs": len(pairs), "prompts": len(records)})
            print(f"[iter {iteration}] seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stage.items()), flush=True)

    summary = write_summary(out, RECIPE, baseline, history, time.time() - started)
    if is_main_process():
        write_json_atomic(out / "timings.json", {**timings, "total": round(time.time() - started, 1)})
        print_summary(summary)
        if inputs.eval_note:
            print(f"note: {inputs.eval_note}", flush=True)
    return summary


if __name__ == "__main__":
    main()
