"""RLAIF-V (Yu et al., arXiv 2405.17220): align a LLaVA model with feedback from an open-source labeler.

    python recipes/rlaif_v.py                                   # the built-in world (models built if not cached)
    python recipes/rlaif_v.py --preset micro --out runs/x       # seconds: the CI run
    python recipes/rlaif_v.py --best_of_n 8                     # + best-of-8 with the self-feedback reward
    python recipes/rlaif_v.py --model DIR --labeler DIR --data prompts.jsonl --images DIR \\
        --eval_annotations instances_val2014.json --eval_image_dir val2014/ --eval_synonyms synonyms.txt
    torchrun --nproc_per_node 8 recipes/rlaif_v.py --model DIR --labeler DIR --data FILE --images DIR

The algorithm (paper Sec. 3, ANCHORS §2). Per iteration t = 1 .. T (4 in the paper):

1. instructions: about 4k (image, instruction) pairs, a fresh slice each iteration: detailed-description
   requests and short-answer questions (the paper draws them from COCO, ShareGPT-4V, VQA v2, OKVQA, ...;
   on the world, ``--yes_no_share`` of them are yes/no questions);
2. sample n = 10 responses per instruction from the current policy (temperature 0.7, up to 512 new
   tokens), differing only in the random seed (``search.engine.generate``: one prefill per prompt,
   forked to n rows);
3. divide: split every response into atomic claims (``rewards.claims.split_claims``; the released
   code rewrites them with an 8B language model: ``--splitter DIR`` runs that model-based version); a
   "yes" or "no" answer to a yes/no question is one claim, which holds when the labeler answers the
   question the same way (``rewards.claims.yes_no_answer``);
4. conquer: turn every claim into a yes/no question + " Please answer yes or no." and ask the
   labeler model, reading P(yes) + P(Yes) against P(no) + P(No) of the first answer token
   (``rewards.labeler.label_questions``: one batched forward per image over all questions of all n
   responses, the shared prompt head encoded once);
5. combine: score S = -(number of rejected claims) per response (on the world, ``--reject_repeats``, not
   in the paper, also counts as rejected a claim that only names objects an earlier claim named);
   preference pairs with |dS| >= 1, pairs with unjudged claims dropped, at most 2 pairs per
   instruction, then length balancing over the whole dataset (``rewards.pairs.build_preference_pairs``).
   Records carry the RLAIF-V-Dataset field names (ds_name, image, image_path, question, chosen,
   rejected, origin_dataset, origin_split, idx) plus the two scores;
6. reference log-probs of every chosen and rejected response, computed once and stored with the
   pairs (``recipes._dpo.add_reference_logps``). The reference of iteration t is the model that
   starts it (the SFT model for t = 1, iteration t-1's result afterwards), frozen: the model that
   sampled the data, as the released pipeline computes the log-probs with its instruct model before
   training (ANCHORS: "the frozen initial model"). ``--reference sft`` keeps the SFT model as the
   reference in every iteration instead;
7. DPO: sigmoid loss, beta 0.1, summed log-probs, optional SFT term w_sft; full fine-tune at lr 5e-7
   (cosine, 5% warm-up), weight decay 0.01, global batch 8, 4 epochs; ``--lora true`` trains LoRA
   adapters (r 64, alpha 16, lr 1e-5) and merges them (``recipes._dpo.train_dpo``); ``--ptx_coef``
   adds InstructGPT's ptx term, SFT conversations replayed beside the pairs (``recipes._ptx``; not in
   the paper, on in the world preset, where DPO on descriptions alone costs POPE F1);
8. save the model (Hugging Face layout + tokenizer.json), evaluate it (``recipes/evaluate.py``).

At evaluation time, ``--best_of_n N`` (also ``--best-of-n``) adds the paper's inference-time scaling:
N sampled descriptions per image, the one with the highest self-feedback reward
``(beta / T) * (log pi(y|x) - log pi_ref(y|x))`` kept (``search.sampling.best_of_n`` with
``implicit_reward_scorer``); its metrics are an extra row of the table and ``"best_of_n"`` in
summary.json.

Data collection (steps 2-5) runs through ``recipes._run.collect``: under torchrun each rank samples
and labels its share of the instructions, appending one JSON line per instruction to its shard; a
killed run, rerun with the same command, continues where it stopped; the shards are merged. Pair
construction happens after the merge (its length balancing is dataset-wide); the reference
log-probs are collected the same way. Layout of ``--out DIR``::

    config.json  baseline/metrics.json
    iter1/samples.jsonl   n responses per instruction: texts, claims, verdicts, scores
    iter1/pairs.jsonl     the iteration's RLAIF-V dataset with ref_chosen_logp / ref_rejected_logp
    iter1/model/          the aligned model (+ ``complete``)    iter1/metrics.json
    best_of_n/metrics.json (with --best_of_n)                  summary.json

Presets: ``paper`` (the dataclass defaults, ANCHORS §2) is used with ``--model``; ``world`` (tuned for the
built-in world, see ``WORLD_RLAIF_V``) without it; ``micro`` for tests. Flags override any field.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm.checkpoint import copy_tokenizer, load_lvlm, save_lvlm  # noqa: E402
from lvlm.image import load_image as load_image_file  # noqa: E402
from lvlm.image import preprocess_image  # noqa: E402
from lvlm.records import read_located_records, write_json_atomic  # noqa: E402
from lvlm.tokenizer import IMAGE_MARKER, Tokenizer, encode_prompt  # noqa: E402
from optim.distributed import barrier, get_world_size, is_main_process, setup_distributed  # noqa: E402
from optim.train import TrainConfig  # noqa: E402
from recipes._dpo import (LoraSettings, PreferencePairs, add_reference_logps, check_batch_splits,  # noqa: E402
                          check_dpo_settings, train_dpo)
from recipes._ptx import replay_dataset, replay_source  # noqa: E402
from recipes._run import (collect, format_changes, format_table, mark_done, model_done, open_run,  # noqa: E402
                          write_summary)
from rewards.claims import (claim_to_question, claims_to_questions_with_model_batch, labeler_prompt,  # noqa: E402
                            repeated_claims, split_claims, split_claims_with_model_batch, without_labeler_suffix,
                            yes_no_answer)
from rewards.labeler import (answer_token_id, claim_accepted, label_questions, rejected_per_response,  # noqa: E402
                             response_score)
from rewards.pairs import build_preference_pairs  # noqa: E402
from search.engine import generate  # noqa: E402
from search.sampling import best_of_n, implicit_reward_scorer  # noqa: E402
from search.sampling_ops import mix_seeds  # noqa: E402

RECIPE = "rlaif_v"

# ---------------------------------------------------------------------------------------------
# the config and its presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLAIFVConfig:
    """RLAIF-V's settings; the defaults are the paper's (ANCHORS §2). ``--name value`` overrides any field.

    model / labeler / data / images: a real run (Hugging Face LLaVA directories, a JSONL or JSON file of
    {image, question, ...} records or LLaVA conversations, the image folder). None: the built-in world.
    The labeler defaults to the policy itself on a real run (RLAIF-V 12B labels its own responses).
    """

    # inputs
    model: str | None = None  # the SFT policy to align (LLaVA, Hugging Face layout, tokenizer.json beside it)
    labeler: str | None = None  # the labeler LVLM; None: the world's labeler, or on a real run the policy itself
    clip: str | None = None  # accepted so the three recipes share a command line; RLAIF-V uses no CLIP model
    data: str | None = None  # instructions: JSONL / JSON of {image, question, ...}, or LLaVA conversations
    images: str | None = None  # folder the records' image names are relative to
    splitter: str | None = None  # model-based divide and conquer with this LVLM (text only); None: the rules
    eval_annotations: str | None = None  # real runs: a COCO-style instances file to evaluate on (else no eval)
    eval_image_dir: str | None = None  # the folder of its images
    eval_synonyms: str | None = None  # a CHAIR synonym file
    out: str | None = None  # default runs/rlaif_v-<preset>
    world_preset: str = "auto"  # the world's models: "auto" (float32 on a CPU, default with a GPU), or a WORLD_PRESETS name
    # the loop
    iterations: int = 4
    instructions_per_iteration: int = 4000
    instruction_offset: int = 0  # world: the first training scene used
    yes_no_share: float = 0.0  # world: share of yes/no questions among the instructions (``world_instructions``)
    # 2. sampling
    n_samples: int = 10
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    collect_batch: int = 8  # instructions per generate call (x n_samples rows)
    # 3-5. claims, labeler, pairs
    splitter_max_new_tokens: int = 256
    labeler_rows: int = 64  # questions per labeler forward
    max_pairs_per_instruction: int = 2
    min_score_gap: float = 1.0
    balance_lengths: bool = True
    # not in the paper (the world only): a claim that names only objects an earlier claim of its response
    # named counts as rejected (``rewards.claims.repeated_claims``; in the world every shape is in an
    # image at most once, so naming one again restates it or makes up a second one)
    reject_repeats: bool = False
    # 6. reference
    reference: str = "iteration"  # "iteration": the model that starts the iteration; "sft": the SFT model
    reference_batch: int = 8
    # 7. DPO
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    w_sft: float = 0.0
    # InstructGPT's ptx term (not in the paper; recipes/_ptx.py): + ptx_coef x the answer NLL of an SFT
    # conversation replayed beside each pair; the conversations: --ptx_data (LLaVA's conversation JSON,
    # images under --images), on the world its SFT data's short-answer turns; ptx_examples per iteration
    ptx_coef: float = 0.0
    ptx_data: str | None = None
    ptx_examples: int = 512
    lr: float = 5e-7
    epochs: int = 4
    global_batch_size: int = 8
    micro_batch_size: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    lora: bool = False
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_lr: float = 1e-5
    bf16: bool = True
    fsdp: bool = False
    activation_checkpointing: bool = False
    # 8. evaluation
    eval_images: int = 200  # images of the held-out set
    eval_batch: int = 64
    eval_max_new_tokens: int = 128
    best_of_n: int = 0  # > 0: also evaluate best-of-N descriptions with the self-feedback reward
    seed: int = 0


PAPER_RLAIF_V = RLAIFVConfig()

# The built-in world's preset. What differs from the paper, and why:
# - 2 iterations of 512 instructions (not 4 x 4k; 3 on the float32 models, ``WORLD_RLAIF_V_ON``): the world's
#   hallucination (one made-up sentence about an absent prior partner, lvlm/world) is simple, and the whole
#   run must fit in ~10 CPU minutes;
# - max_new_tokens 96: the world's descriptions are at most 5 sentences (~60 tokens);
# - lr 1e-4 (not 5e-7) with global batch 16, 2 epochs: a 1M-parameter model from scratch, not a 7B one
#   (7B DPO learning rates do not move it at all);
# - eval on the whole test split (1,000 images; CSR's preset says why) with the 128-token budget of
#   recipes/evaluate.py;
# - w_sft 1 (the SFT term on the chosen response, the paper's option, off in its preset): on the grounded
#   world models, iteration 2 without it reached CHAIR_s 7.5% at recall 73.7% (SFT 19.0% / 93.4%), with
#   it 9.0% at 89.6%; POPE F1 80.0% and 80.8% (SFT 81.4%).
# - ptx_coef 3 (InstructGPT's ptx term, not in the paper; recipes/_ptx.py): the SFT data's yes/no,
#   multiple-choice and short-answer turns replayed beside each pair. Without it, DPO on descriptions
#   pulled the yes/no answers towards "no" (w_sft 1): POPE F1 78.09 -> 70.82 / 72.72 (yes-ratio 44.0%)
#   at CHAIR_s 12.5 / 6.5; with ptx_coef 1, 77.73 / 76.51 at 11.0 / 8.0; with 3, 79.07 / 77.75 at
#   11.0 / 6.0, but recall 83.8 / 78.2 (SFT 85.6);
# - w_sft 3: with ptx_coef 3, w_sft 1 / 2 / 3 kept recall 78.2 / 80.2 / 83.8 at iteration 2 (CHAIR_s
#   6.0 / 8.0 / 10.0, F1 77.75 / 78.43 / 78.39); w_sft 3 without the ptx term: F1 73.87 / 74.89 (docs/RESULTS.md).
WORLD_RLAIF_V = dataclasses.replace(
    PAPER_RLAIF_V, iterations=2, instructions_per_iteration=512, max_new_tokens=96, collect_batch=32,
    lr=1e-4, epochs=2, global_batch_size=16, micro_batch_size=16, reference_batch=32, eval_images=1000,
    w_sft=3.0, ptx_coef=3.0,
)

# Seconds on a CPU (CI): the "micro" world models, one iteration over a few instructions.
MICRO_RLAIF_V = dataclasses.replace(
    WORLD_RLAIF_V, world_preset="micro", iterations=1, instructions_per_iteration=6, n_samples=4,
    max_new_tokens=24, collect_batch=3, epochs=1, global_batch_size=2, micro_batch_size=1, lr=1e-3,
    eval_images=3, eval_max_new_tokens=24, labeler_rows=16,
)

PRESETS = {"paper": PAPER_RLAIF_V, "world": WORLD_RLAIF_V, "micro": MICRO_RLAIF_V}

# What ``world`` changes on a world preset's models. The float32 preset's SFT models (what ``auto`` picks on a
# CPU) name an object twice in many descriptions (the Intel build's in 49% of them on the 1,000 test images,
# the Zen 3 build's in 28%), and a restated claim is judged true again: the chosen responses repeated more
# often than the rejected ones (iteration 2 on the Intel models: 50% against 42%), DPO learnt to restate
# instead of naming more objects (distinct objects per description 2.03 -> 1.72), and recall fell 7.65
# points at iteration 2 (CHAIR_s 20.5 -> 9.0). With repeats counted as rejected (``reject_repeats``, not in
# the paper) the chosen responses repeated less than the rejected ones (iteration 2: 20% against 56%), and
# a third iteration (the paper has four) makes up the slower fall of CHAIR_s. On the Intel models (CHAIR_s /
# recall / POPE F1 against 20.5 / 73.98 / 92.87, iterations 1 / 2 / 3): 11.7 / 11.2 / 10.0, 72.19 / 71.46 /
# 73.49, 93.11 / 93.15 / 93.11 (seed 1: 16.4 / 10.8 / 10.2, 71.91 / 70.28 / 70.72, 92.94 / 93.15 / 93.05;
# seed 2: 14.5 / 11.3 / 10.7, 72.52 / 72.07 / 72.15, 92.69 / 92.92 / 93.12): the three targets met at
# iteration 3 with seeds 0 and 1 (CHAIR_s by 0.25 and 0.05 points), CHAIR_s missed by 0.45 with seed 2
# (docs/WORLD_BUILDS.md).
# Not measured on the Zen 3 models, where the preset without it cut CHAIR_s by 73% and recall by 5.8 points.
WORLD_RLAIF_V_ON = {"float32": {"reject_repeats": True, "iterations": 3}}


# ---------------------------------------------------------------------------------------------
# 1. instructions
# ---------------------------------------------------------------------------------------------


def world_instructions(world, count: int, *, offset: int = 0, variant: int = 0,
                       yes_no_share: float = 0.0) -> list[dict]:
    """``count`` (image, instruction) pairs on the world's training split, from scene ``offset``.

    Each is a dict with the RLAIF-V instruction fields: ``idx`` (the scene seed), ``image`` (the seed:
    images are rendered on demand), ``image_path`` (a readable name), ``question``, ``ds_name``,
    ``origin_dataset``, ``origin_split``. The question is one of the world's description requests (chosen
    by seed and ``variant``), or, for a share ``yes_no_share`` of the scenes (drawn by seed), a yes/no
    question about an object's existence or colour, true half of the time (``lvlm.world.yes_no_question``),
    standing in for the short-answer VQA part of RLAIF-V's instructions. The test split is never touched
    (it is the evaluation set).
    """
    from lvlm.world import description_instruction, sample_scene, split_seeds, world_rng, yes_no_question

    seeds = split_seeds("train", world)
    if offset < 0 or offset + count > len(seeds):
        raise ValueError(f"world_instructions: scenes {offset}..{offset + count} are outside the training split "
                         f"({len(seeds)} scenes); lower instructions_per_iteration x iterations or instruction_offset")
    if not 0.0 <= yes_no_share <= 1.0:
        raise ValueError(f"world_instructions: yes_no_share must be in [0, 1], got {yes_no_share}")
    out = []
    for seed in seeds[offset:offset + count]:
        scene = sample_scene(seed, world)
        rng = world_rng(seed, "rlaif-v-instruction", variant)
        if rng.random() < yes_no_share:
            question = yes_no_question(scene, rng, kind=rng.choice(("existence", "attribute"))).question
        else:
            question = description_instruction(scene, variant)
        out.append({"idx": seed, "image": seed, "image_path": f"world-train/{seed}.png",
                    "question": question, "ds_name": "RLAIF-V-world",
                    "origin_dataset": "world", "origin_split": "train"})
    return out


def _question_of(record: dict) -> str | None:
    """The instruction of a record: its "question", or the first human turn of a LLaVA conversation."""
    if "question" in record:
        return record["question"]
    conversation = record.get("conversations")
    if isinstance(conversation, list) and conversation and isinstance(conversation[0], dict):
        return conversation[0].get("value")
    return None


def load_instructions(path: str | Path, images: str | Path | None) -> list[dict]:
    """Instructions from a JSONL / JSON file: ``{"image": "x.jpg", "question": "..."}`` records (other fields
    such as ``idx``, ``ds_name``, ``origin_dataset`` are kept), or LLaVA conversation records (the first
    human turn is the question; its "<image>" marker is removed).

    Every record and every image is checked before anything runs: a record without a string ``image`` or
    question is reported as ``file:line`` (JSONL) or ``file record k`` (JSON); images that do not exist
    under ``images`` are listed (the first 10 of each kind).
    """
    path = Path(path)
    folder = Path(images) if images is not None else None
    problems, missing, out = [], [], []
    for k, (where, record) in enumerate(read_located_records(path)):
        image, question = record.get("image", record.get("image_path")), _question_of(record)
        if not isinstance(image, str) or not image:
            problems.append(f"{where}: needs an 'image' file name (a string), got {image!r}")
            continue
        if not isinstance(question, str) or not question.replace(IMAGE_MARKER, "").strip():
            problems.append(f"{where}: needs a non-empty 'question' (or LLaVA 'conversations')")
            continue
        file = Path(image) if folder is None or Path(image).is_absolute() else folder / image
        if not file.is_file():
            missing.append(f"{where}: {file}")
            continue
        out.append({"idx": record.get("idx", record.get("id", k)), "image": str(file), "image_path": image,
                    "question": question.replace(IMAGE_MARKER, "").strip(),
                    "ds_name": record.get("ds_name", "RLAIF-V"),
                    "origin_dataset": record.get("origin_dataset", path.name),
                    "origin_split": record.get("origin_split", "")})
    if problems:
        raise ValueError(f"{len(problems)} malformed record(s) in {path}:\n  " + "\n  ".join(problems[:10]))
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) of {path} not found:\n  " + "\n  ".join(missing[:10]))
    if not out:
        raise ValueError(f"{path}: no instructions")
    return out


def iteration_slice(instructions: list[dict], iteration: int, count: int) -> list[dict]:
    """Iteration t's instructions: the t-th block of ``count`` (wrapping around a file that is too short;
    ``count`` <= 0 takes the whole file every iteration). The paper draws a fresh ~4k each iteration."""
    if count <= 0 or count >= len(instructions):
        return list(instructions)
    start = (iteration - 1) * count
    return [instructions[(start + k) % len(instructions)] for k in range(count)]


# ---------------------------------------------------------------------------------------------
# 2-5. sample, divide, conquer, combine (one batch of instructions)
# ---------------------------------------------------------------------------------------------


def text_generate_fn(model, tokenizer: Tokenizer, *, max_new_tokens: int):
    """``prompts -> completions`` with a language model run text-only and greedily (the model-based
    splitter / question converter of ``rewards.claims``)."""
    per_image = model.config.image_tokens_per_image

    def generate_texts(prompts: list[str]) -> list[str]:
        rows = [encode_prompt(tokenizer, p, num_images=0, image_tokens_per_image=per_image)["input_ids"]
                for p in prompts]
        outputs = generate(model, rows, max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids)
        return [tokenizer.decode([t for t in g.tokens if t not in tokenizer.stop_ids], skip_special_tokens=True)
                for g in outputs]

    return generate_texts


def divide_and_conquer(question: str, texts: list[str], splitter=None
                       ) -> tuple[list[list[str]], list[list[str]], list[list[bool]]]:
    """RLAIF-V steps "divide" and the first half of "conquer": per response, its claims, their yes/no
    questions (without the labeler suffix) and the labeler answer each claim needs (True: "yes").

    A yes/no instruction answered with "yes" or "no" (``rewards.claims.yes_no_answer``) is one claim: the
    response itself, asked as the instruction, holding when the labeler gives the same answer. Every other
    response is divided by the rules (``split_claims``, ``claim_to_question``: one question per claim, each
    holding on "yes") or, with ``splitter`` (a ``prompts -> completions`` function), by the model-based
    versions (the released pipeline's form; the converter may return another number of questions than
    claims, and such responses are later left out of the pairs).
    """
    answers = [yes_no_answer(question, t) for t in texts]  # None: not a short answer
    long_texts = [t for t, answer in zip(texts, answers) if answer is None]
    if splitter is None:
        split = [split_claims(t) for t in long_texts]
        asked = [[claim_to_question(c) for c in cl] for cl in split]
    else:
        split = split_claims_with_model_batch(splitter, [question] * len(long_texts), long_texts)
        asked = claims_to_questions_with_model_batch(splitter, split)
    divided = iter(zip(split, asked))
    instruction = without_labeler_suffix(question)
    claims, questions, expected = [], [], []
    for text, answer in zip(texts, answers):
        cl, qs = next(divided) if answer is None else ([text], [instruction])
        claims.append(cl)
        questions.append(qs)
        expected.append([True] * len(qs) if answer is None else [answer])
    return claims, questions, expected


@torch.no_grad()
def label_responses(labeler, labeler_tokenizer: Tokenizer, image, question_lists: list[list[str]], *,
                    max_rows: int = 64, expected: list[list[bool]] | None = None) -> tuple[list[list[bool]], list[int]]:
    """RLAIF-V "conquer" + "combine" for the n responses of one image.

    All questions of all responses go through the labeler in one batched forward over the shared prompt
    head (``label_questions``), each with " Please answer yes or no." appended. expected: per question, the
    answer its claim needs (``divide_and_conquer``; None: "yes" for all). Returns, per response, the
    labeler's verdicts (accepted: P(yes-ish) > P(no-ish) for a claim that needs "yes", P(no-ish) >
    P(yes-ish) for one that needs "no") and its score S = -(rejected claims).
    """
    flat = [labeler_prompt(q) for questions in question_lists for q in questions]
    owner = torch.tensor([r for r, questions in enumerate(question_lists) for _ in questions], dtype=torch.long)
    if not flat:
        return [[] for _ in question_lists], [0] * len(question_lists)
    device = next(labeler.parameters()).device
    pixels = preprocess_image(image, size=labeler.config.vision_config.image_size)[None].to(device)
    p_yes, p_no, _ = label_questions(labeler, labeler_tokenizer, pixels, flat, max_rows=max_rows,
                                     image_tokens_per_image=labeler.config.image_tokens_per_image)
    needs_yes = [e for es in expected for e in es] if expected is not None else [True] * len(flat)
    needs_yes = torch.tensor(needs_yes, dtype=torch.bool, device=p_yes.device)
    accepted = torch.where(needs_yes, claim_accepted(p_yes, p_no), claim_accepted(p_no, p_yes)).cpu()  # one copy
    scores = response_score(rejected_per_response(accepted, owner, len(question_lists)))  # [n]
    verdicts, start = [], 0
    for questions in question_lists:
        verdicts.append(accepted[start:start + len(questions)].tolist())
        start += len(questions)
    return verdicts, scores.tolist()


def collect_responses(policy, tokenizer: Tokenizer, labeler, labeler_tokenizer: Tokenizer, items: list[dict], *,
                      load_image, config: RLAIFVConfig, iteration: int, splitter=None,
                      objects_of=None) -> list[dict]:
    """Steps 2-5 for a batch of instructions: n samples each, claims, labeler verdicts, scores.

    items: instruction dicts (``world_instructions`` / ``load_instructions``) plus ``number`` (the position
    in the run's instruction list; sample j of it uses seed ``mix_seeds(seed, iteration, number, j)``, so a
    response does not depend on the batch or rank it was drawn in). One ``generate`` call: every prompt
    prefilled once and forked to n rows. Returns one record per item: its fields plus ``responses``, each
    {text, score, n_claims, n_judged, claims, questions, needs_yes, accepted, n_tokens, finish_reason}.
    objects_of (``--reject_repeats``; claim -> the objects it names): a claim that only repeats objects of
    earlier claims (``rewards.claims.repeated_claims``) is counted as rejected whatever the labeler said;
    each response then also lists ``repeated``.
    """
    per_image = policy.config.image_tokens_per_image
    size = policy.config.vision_config.image_size
    images = [load_image(item["image"]) for item in items]
    prompts = [(encode_prompt(tokenizer, item["question"], image_tokens_per_image=per_image)["input_ids"],
                preprocess_image(image, size=size)[None]) for item, image in zip(items, images)]
    n = config.n_samples
    seeds = [mix_seeds(config.seed, iteration, item["number"], j) for item in items for j in range(n)]
    was_training = policy.training
    policy.eval()
    generations = generate(policy, prompts, n=n, max_new_tokens=config.max_new_tokens,
                           temperature=config.temperature, top_p=config.top_p, seeds=seeds,
                           stop_ids=tokenizer.stop_ids)
    policy.train(was_training)
    stop = set(tokenizer.stop_ids)
    records = []
    for p, (item, image) in enumerate(zip(items, images)):
        samples = generations[p * n:(p + 1) * n]
        texts = [tokenizer.decode([t for t in g.tokens if t not in stop], skip_special_tokens=True).strip()
                 for g in samples]
        claims, questions, expected = divide_and_conquer(item["question"], texts, splitter)
        verdicts, scores = label_responses(labeler, labeler_tokenizer, image, questions, max_rows=config.labeler_rows,
                                           expected=expected)
        if objects_of is not None:
            repeated = [repeated_claims(cl, objects_of) for cl in claims]  # rule-split: one question per claim
            verdicts = [[a and not r for a, r in zip(v, rep)] for v, rep in zip(verdicts, repeated)]
            scores = [response_score(sum(not a for a in v)) for v in verdicts]
        responses = [{"text": text, "score": score, "n_claims": len(cl), "n_judged": len(v), "claims": cl,
                      "questions": qs, "needs_yes": e, "accepted": v, "n_tokens": len(g.tokens),
                      "finish_reason": g.finish_reason}
                     for text, score, cl, qs, e, v, g in zip(texts, scores, claims, questions, expected, verdicts,
                                                             samples)]
        if objects_of is not None:
            for response, rep in zip(responses, repeated):
                response["repeated"] = rep
        record = {k: v for k, v in item.items() if k != "number"}
        records.append(dict(record, responses=responses))
    return records


def sample_statistics(samples: list[dict]) -> dict:
    """Mean score, share of responses with a rejected claim, mean claims per response (for the log)."""
    responses = [r for s in samples for r in s.get("responses", [])]
    if not responses:
        return {"responses": 0}
    return {"responses": len(responses),
            "mean_score": sum(r["score"] for r in responses) / len(responses),
            "with_rejected_claim": sum(r["score"] < 0 for r in responses) / len(responses),
            "claims_per_response": sum(r["n_claims"] for r in responses) / len(responses)}


# ---------------------------------------------------------------------------------------------
# best-of-N with the self-feedback reward (evaluation time)
# ---------------------------------------------------------------------------------------------


def best_of_n_generate_fn(policy, reference, tokenizer: Tokenizer, dataset, *, n: int, beta: float,
                          temperature: float, seed: int, batch_size: int = 64):
    """A ``generate_fn`` for ``recipes.evaluate.evaluate``: descriptions by best-of-N under RLAIF-V's
    length-normalised implicit reward ``(beta / T) (log pi - log pi_ref)`` (the paper's later version),
    every other question (POPE, multiple choice) greedily as usual.

    policy: the aligned model; reference: its DPO reference. n: samples per description request.
    """
    from recipes.evaluate import greedy_generate_fn

    greedy = greedy_generate_fn(policy, tokenizer, dataset, batch_size=batch_size, progress=False)
    descriptions = set(dataset.description_prompts)
    size = policy.config.vision_config.image_size
    per_image = policy.config.image_tokens_per_image
    scorer = implicit_reward_scorer(reference, beta=beta, batch_size=max(n, 8))
    stop = set(tokenizer.stop_ids)

    def generate_fn(requests) -> list[str]:
        texts = [None] * len(requests)
        sampled = [i for i, r in enumerate(requests) if r.question in descriptions]
        rest = [i for i, r in enumerate(requests) if r.question not in descriptions]
        for i, text in zip(rest, greedy([requests[i] for i in rest]) if rest else []):
            texts[i] = text
        chunk = max(1, batch_size // n)
        policy.eval()
        for start in range(0, len(sampled), chunk):
            part = sampled[start:start + chunk]
            prompts = []
            for i in part:
                source = dataset.images[requests[i].image]
                image = source if not isinstance(source, (str, Path)) else load_image_file(source)
                prompts.append((encode_prompt(tokenizer, requests[i].question, image_tokens_per_image=per_image)
                                ["input_ids"], preprocess_image(image, size=size)[None]))
            longest = max(requests[i].max_new_tokens for i in part)
            results = best_of_n(policy, prompts, n=n, score_fn=scorer, temperature=temperature,
                                max_new_tokens=longest, seed=mix_seeds(seed, start), stop_ids=tokenizer.stop_ids)
            for i, result in zip(part, results):
                texts[i] = tokenizer.decode([t for t in result.best.tokens if t not in stop],
                                            skip_special_tokens=True).strip()
        return texts

    return generate_fn


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def dpo_batch_size(config: RLAIFVConfig, n_pairs: int, world_size: int) -> int:
    """The global batch: ``config.global_batch_size``, lowered to a multiple of micro-batch x ranks when
    there are fewer pairs than that (so a small run still steps); 0 when not even one micro-batch per rank."""
    check_batch_splits(config.global_batch_size, config.micro_batch_size, world_size)
    unit = config.micro_batch_size * world_size
    return min(config.global_batch_size, n_pairs // unit * unit)


def _device() -> torch.device:
    return setup_distributed()[2]


def _frozen_dtype(device: torch.device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _print(*parts) -> None:
    if is_main_process():
        print(*parts, flush=True)


def resolve_config(argv=None) -> tuple[RLAIFVConfig, str]:
    """Parse the command line: the preset (``paper`` with --model, else ``world``), then the flags on top."""
    from recipes._common import add_config_arguments, config_from_args, given_flags

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="paper (default with --model), world (default without), micro (tests)")
    add_config_arguments(parser, PAPER_RLAIF_V)
    parser.add_argument("--best-of-n", dest="cfg:best_of_n", type=int, default=None, help="same as --best_of_n")
    args = parser.parse_args(argv)
    given = config_from_args(args, PAPER_RLAIF_V)
    name = args.preset or ("paper" if given.model else "world")
    defaults = PRESETS[name]
    if name == "world":
        from recipes.world_models import resolve_world_preset

        defaults = dataclasses.replace(defaults, **WORLD_RLAIF_V_ON.get(resolve_world_preset(given.world_preset), {}))
    config = config_from_args(args, defaults)
    real = config.model is not None
    if real and config.data is None:
        parser.error("a real run needs --data (and --images) beside --model")
    given_real = given_flags(config, ("data", "images", "labeler", "splitter", "ptx_data", "eval_annotations",
                                      "eval_image_dir", "eval_synonyms"))
    if not real and given_real:
        parser.error(f"{' / '.join(given_real)} need --model (without it, the built-in world runs)")
    if real and config.yes_no_share > 0:
        parser.error("--yes_no_share makes world instructions; on a real run put the questions in --data")
    if real and config.reject_repeats:
        parser.error("--reject_repeats reads the world's object vocabulary; it is for the built-in world only")
    if real and config.ptx_coef > 0 and config.ptx_data is None:
        parser.error("--ptx_coef > 0 on a real run needs --ptx_data (SFT conversations, LLaVA's JSON)")
    if config.ptx_coef < 0 or config.ptx_examples < 1:
        parser.error(f"--ptx_coef must be >= 0 and --ptx_examples >= 1, got {config.ptx_coef}, {config.ptx_examples}")
    if config.n_samples < 2:
        parser.error(f"--n_samples must be >= 2 (pairs are formed among an instruction's samples), got "
                     f"{config.n_samples}")
    if config.temperature <= 0 or not 0 < config.top_p <= 1:
        parser.error(f"--temperature must be > 0 and --top_p in (0, 1] (the n responses are sampled), got "
                     f"{config.temperature}, {config.top_p}")
    if config.reference not in ("iteration", "sft"):
        parser.error(f"--reference must be 'iteration' or 'sft', got {config.reference!r}")
    if config.out is None:
        config = dataclasses.replace(config, out=f"runs/{RECIPE}-{name}")
    return config, name


@dataclass
class Inputs:
    """What a run reads: the SFT policy and labeler directories, the instructions (all checked), how to
    load an image reference, and the held-out set (None on a real run without --eval_annotations)."""

    sft: Path
    labeler: Path
    instructions: list
    load_image: object
    eval_set: object
    world: object = None
    replay: object = None  # iteration t -> its ptx replay conversations (None: no ptx term)


def resolve_inputs(config: RLAIFVConfig) -> Inputs:
    """The world's models (built now if not cached) and training scenes, or the user's checkpoints and data
    file with every record and image checked; the evaluation set. Raises before any output is written."""
    if config.model is None:
        from recipes.world_models import ensure_world_models, render_world_image, world_preset

        preset = world_preset(config.world_preset)
        instructions = world_instructions(preset.world, config.iterations * config.instructions_per_iteration,
                                          offset=config.instruction_offset, yes_no_share=config.yes_no_share)
        models = ensure_world_models(preset)
        replay = replay_source(config.ptx_examples, world=preset) if config.ptx_coef > 0 else None
        return Inputs(sft=Path(models.sft), labeler=Path(models.labeler), instructions=instructions,
                      load_image=functools.partial(render_world_image, preset.world),
                      eval_set=evaluation_set(config, preset.world), world=preset.world, replay=replay)
    if config.clip is not None:
        _print("note: --clip is not used by RLAIF-V (its feedback comes from the labeler)")
    for name in ("model", "labeler", "splitter"):
        directory = getattr(config, name)
        if directory is not None and not (Path(directory) / "config.json").is_file():
            raise FileNotFoundError(f"--{name} {directory}: no config.json there (a Hugging Face LLaVA directory)")
    instructions = load_instructions(config.data, config.images)  # every record and image checked now
    replay = (replay_source(config.ptx_examples, ptx_data=config.ptx_data, images=config.images)
              if config.ptx_coef > 0 else None)
    return Inputs(sft=Path(config.model), labeler=Path(config.labeler or config.model), instructions=instructions,
                  load_image=load_image_file, eval_set=evaluation_set(config, None), replay=replay)


def check_model_matches_tokenizer(model, tokenizer: Tokenizer, where: Path) -> None:
    """A checkpoint and its tokenizer.json must agree on the image token and fit one vocabulary."""
    if tokenizer.image_token_id != model.config.image_token_index:
        raise ValueError(f"{where}: tokenizer.json's {IMAGE_MARKER} is id {tokenizer.image_token_id} but config.json "
                         f"says image_token_index={model.config.image_token_index}")
    if tokenizer.vocab_size > model.config.text_config.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary only "
                         f"{model.config.text_config.vocab_size}")


def evaluation_set(config: RLAIFVConfig, world):
    """The held-out set: the world's test split, or a COCO-style set on a real run (None when not given)."""
    from recipes.evaluate import coco_eval_set, world_eval_set

    if config.model is None:
        return world_eval_set(world, n_images=config.eval_images, split="test")
    if config.eval_annotations is None:
        return None
    if config.eval_image_dir is None:
        raise ValueError("--eval_annotations needs --eval_image_dir (the folder of the evaluation images)")
    return coco_eval_set(config.eval_annotations, config.eval_image_dir, config.eval_synonyms,
                         n_images=config.eval_images, seed=config.seed)


def evaluate_into(model, tokenizer, dataset, path: Path, config: RLAIFVConfig, *, generate_fn=None) -> dict:
    """Evaluate on rank 0 (written to ``path``), or read the metrics already there; every rank returns them."""
    from recipes.evaluate import evaluate

    if dataset is None:
        return {}
    if not path.is_file() and is_main_process():
        evaluate(model, tokenizer, dataset, generate_fn=generate_fn, batch_size=config.eval_batch,
                 max_new_tokens=config.eval_max_new_tokens, out=path, details=path.with_name("eval_details.json"),
                 verbose=False)
    barrier()
    return json.loads(path.read_text())


def _table_row(metrics: dict) -> str:
    keys = ("chair_s", "chair_i", "recall", "pope_f1")
    return "  ".join(f"{k} {100 * metrics[k]:.1f}" for k in keys if k in metrics)


def main(argv=None) -> dict:
    from recipes._common import config_to_dict, print_config, set_cpu_threads, threads_per_process

    started = time.time()
    config, preset_name = resolve_config(argv)
    set_cpu_threads(threads_per_process())
    device = _device()
    if is_main_process():
        print_config(config, f"rlaif_v ({preset_name} preset)")

    # -- inputs, models: every check before the run directory is touched ------------------------------
    check_batch_splits(config.global_batch_size, config.micro_batch_size, get_world_size())
    check_dpo_settings(beta=config.beta, lr=config.lr, lora_r=config.lora_r if config.lora else None)
    inputs = resolve_inputs(config)
    tokenizer = Tokenizer.from_file(inputs.sft)
    labeler_tokenizer = Tokenizer.from_file(inputs.labeler)
    policy = load_lvlm(inputs.sft, dtype=torch.float32, device=device)
    check_model_matches_tokenizer(policy, tokenizer, inputs.sft)
    labeler = load_lvlm(inputs.labeler, dtype=_frozen_dtype(device), device=device).requires_grad_(False)
    check_model_matches_tokenizer(labeler, labeler_tokenizer, inputs.labeler)
    for word in ("yes", "Yes", "no", "No"):
        answer_token_id(labeler_tokenizer, word)  # the labeler's answer words must be single tokens
    splitter = None
    if config.splitter is not None:
        splitter_model = load_lvlm(config.splitter, dtype=_frozen_dtype(device), device=device).requires_grad_(False)
        splitter = text_generate_fn(splitter_model, Tokenizer.from_file(config.splitter),
                                    max_new_tokens=config.splitter_max_new_tokens)
    objects_of = None
    if config.reject_repeats:  # the world only (resolve_config): the shapes a claim names, synonyms included
        from lvlm.world import find_mentions

        objects_of = functools.partial(find_mentions, config=inputs.world)
    out = open_run(config.out, RECIPE, config_to_dict(config),
                   models={"policy": inputs.sft, "labeler": inputs.labeler, "splitter": config.splitter})
    sft_dir, load_image, eval_set = inputs.sft, inputs.load_image, inputs.eval_set
    instructions, count = inputs.instructions, config.instructions_per_iteration
    _print(f"rlaif_v: {len(instructions)} instructions, {config.iterations} iteration(s) of "
           f"{len(iteration_slice(instructions, 1, count))}, n = {config.n_samples}; policy {inputs.sft}, "
           f"labeler {inputs.labeler}" + ("" if eval_set is not None else "; no evaluation set: nothing is evaluated"))

    # -- the starting point --------------------------------------------------------------------------
    baseline = evaluate_into(policy, tokenizer, eval_set, out / "baseline" / "metrics.json", config)
    if baseline:
        _print(f"baseline: {_table_row(baseline)}")

    iterations, reference_dir = [], sft_dir
    for t in range(1, config.iterations + 1):
        it_dir = out / f"iter{t}"
        model_dir = it_dir / "model"
        start_dir = sft_dir if t == 1 else out / f"iter{t - 1}" / "model"  # the policy this iteration starts from
        reference_dir = sft_dir if config.reference == "sft" else start_dir
        if model_done(model_dir):
            _print(f"[iter {t}] found {model_dir}")
            policy = load_lvlm(model_dir, dtype=torch.float32, device=device)
            iterations.append(evaluate_into(policy, tokenizer, eval_set, it_dir / "metrics.json", config))
            continue
        t_started = time.time()

        # 1. this iteration's instructions
        items = [dict(item, number=(t - 1) * max(count, 0) + k)
                 for k, item in enumerate(iteration_slice(instructions, t, count))]

        # 2-5. n samples, claims, labeler verdicts, scores -- split across ranks, resumable
        work = functools.partial(collect_responses, policy, tokenizer, labeler, labeler_tokenizer,
                                 load_image=load_image, config=config, iteration=t, splitter=splitter,
                                 objects_of=objects_of)
        samples = collect(items, work, it_dir, "samples", batch_size=config.collect_batch,
                          what=f"[iter {t}] sample + label")
        seconds = {"collect": time.time() - t_started}
        stats = sample_statistics(samples)
        _print(f"[iter {t}] {stats['responses']} responses: mean score {stats.get('mean_score', 0):.3f}, "
               f"{100 * stats.get('with_rejected_claim', 0):.1f}% with a rejected claim, "
               f"{stats.get('claims_per_response', 0):.2f} claims each")

        # 5. pairs, after the merge (length balancing is dataset-wide)
        pairs = build_preference_pairs(samples, seed=mix_seeds(config.seed, t),
                                       max_pairs_per_instruction=config.max_pairs_per_instruction,
                                       min_score_gap=config.min_score_gap, balance_lengths=config.balance_lengths)
        _print(f"[iter {t}] {len(pairs)} preference pairs from {len(samples)} instructions")

        # 6. reference log-probs, once, stored with the pairs
        clock = time.time()
        reference = policy if reference_dir == start_dir else load_lvlm(
            reference_dir, dtype=torch.float32, device=device).requires_grad_(False)
        size, per_image = policy.config.vision_config.image_size, policy.config.image_tokens_per_image

        def reference_logps(batch: list[dict]) -> list[dict]:
            batch_pairs = PreferencePairs([dict(p) for p in batch], tokenizer, load_image=load_image, image_size=size,
                                          image_tokens_per_image=per_image)
            add_reference_logps(reference, batch_pairs, batch_size=config.reference_batch)
            return batch_pairs.records

        if pairs:
            pairs = collect(pairs, reference_logps, it_dir, "pairs", batch_size=config.reference_batch * 4,
                            what=f"[iter {t}] reference log-probs")
        del reference
        seconds["reference"] = time.time() - clock

        # 7. DPO
        clock = time.time()
        lr = config.lora_lr if config.lora else config.lr
        batch = dpo_batch_size(config, len(pairs), get_world_size())
        if batch == 0:
            _print(f"[iter {t}] warning: {len(pairs)} pair(s), fewer than one micro-batch per rank; "
                   "the model is kept as it is this iteration")
        else:
            replay = None
            if inputs.replay is not None:
                replay = replay_dataset(inputs.replay(t), tokenizer, policy, load_image)
            dataset = PreferencePairs(pairs, tokenizer, load_image=load_image, image_size=size,
                                      image_tokens_per_image=per_image, replay=replay)
            train_config = TrainConfig(
                out_dir=str(it_dir / "train"), lr=lr, epochs=config.epochs, global_batch_size=batch,
                micro_batch_size=config.micro_batch_size, warmup_ratio=config.warmup_ratio,
                weight_decay=config.weight_decay, bf16=config.bf16, fsdp=config.fsdp,
                activation_checkpointing=config.activation_checkpointing, seed=config.seed + t, log_every=30.0)
            lora = LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout) if config.lora else None
            result = train_dpo(policy, dataset, train_config, beta=config.beta, loss_type=config.loss_type,
                               label_smoothing=config.label_smoothing, w_sft=config.w_sft,
                               ptx_coef=config.ptx_coef, lora=lora)
            _print(f"[iter {t}] DPO: {result.step} steps on {len(dataset)} pairs, last loss "
                   f"{result.metrics.get('loss', float('nan')):.4f}")
        policy.eval()
        policy.requires_grad_(False)
        seconds["dpo"] = time.time() - clock

        # 8. save, evaluate
        clock = time.time()
        if is_main_process():
            save_lvlm(policy, model_dir)
            copy_tokenizer(sft_dir, model_dir)
            mark_done(model_dir)
            shutil.rmtree(it_dir / "train", ignore_errors=True)  # the optimizer state is not needed any more
        barrier()
        metrics = evaluate_into(policy, tokenizer, eval_set, it_dir / "metrics.json", config)
        iterations.append(metrics)
        seconds["save + evaluate"] = time.time() - clock
        _print(f"[iter {t}] done in {time.time() - t_started:.0f} s ("
               + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f"): {_table_row(metrics)}")

    # -- best-of-N with the self-feedback reward ----------------------------------------------------
    best = None
    if config.best_of_n > 0 and eval_set is not None and config.iterations > 0:
        reference = load_lvlm(reference_dir, dtype=torch.float32, device=device).requires_grad_(False)
        generate_fn = None
        if is_main_process():
            generate_fn = best_of_n_generate_fn(policy, reference, tokenizer, eval_set, n=config.best_of_n,
                                                beta=config.beta, temperature=config.temperature, seed=config.seed,
                                                batch_size=config.eval_batch)
        best = evaluate_into(policy, tokenizer, eval_set, out / "best_of_n" / "metrics.json", config,
                             generate_fn=generate_fn)

    # -- the summary ---------------------------------------------------------------------------------
    summary = write_summary(out, RECIPE, baseline, iterations, time.time() - started)
    if best is not None:
        summary["best_of_n"] = {"n": config.best_of_n, "metrics": best}
        if is_main_process():
            write_json_atomic(out / "summary.json", summary)
    if is_main_process():
        print_report(summary)
    return summary


def print_report(summary: dict) -> None:
    """The table (baseline, each iteration, best-of-N) and the targets of the built-in world."""
    rows = [("baseline", summary["baseline"])] + [(f"iter {t}", m) for t, m in enumerate(summary["iterations"], 1)]
    if "best_of_n" in summary:
        rows.append((f"best-of-{summary['best_of_n']['n']}", summary["best_of_n"]["metrics"]))
    print(f"\n{summary['recipe']}: metrics in % on the held-out set ({summary['seconds']:.0f} s)")
    print(format_table([(name, m) for name, m in rows if m]))
    if summary.get("changes"):
        print(format_changes(summary["changes"]))
    base, final = summary["baseline"], summary["final"]
    if base and final and "chair_s" in base:
        drop = 1 - final["chair_s"] / base["chair_s"] if base["chair_s"] > 0 else 0.0
        print(f"CHAIR_s {100 * base['chair_s']:.1f} -> {100 * final['chair_s']:.1f} ({100 * drop:.0f}% lower; "
              f"target >= 50%), recall {100 * (final['recall'] - base['recall']):+.1f} points (target >= -5), "
              f"POPE F1 {100 * (final['pope_f1'] - base['pope_f1']):+.1f} points (target >= 0)", flush=True)


if __name__ == "__main__":
    main()
