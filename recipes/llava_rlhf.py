"""LLaVA-RLHF / Fact-RLHF (Sun et al., arXiv 2309.14525): reward model with facts, then PPO.

    python recipes/llava_rlhf.py                         # the built-in world (models built if not cached)
    python recipes/llava_rlhf.py --no-facts              # standard RLHF: the ablation
    python recipes/llava_rlhf.py --preset micro          # seconds; what the CI test runs
    torchrun --nproc_per_node 8 recipes/llava_rlhf.py --model SFT_DIR --data ppo_prompts.jsonl \\
        --images coco/train2017 --preferences llava_7b_v1_preference.json --captions image_to_caption.json \\
        --eval_annotations instances_val2014.json --eval_image_dir coco/val2014

The algorithm (``main``), as the paper and its released code do it (ANCHORS §3):

1. SFT model: the world's (``recipes.world_models``, made by ``recipes/sft.py``'s code) or ``--model``.
2. Preference pairs. World: per training image, sample ``samples_per_prompt`` descriptions from the
   SFT model at temperature 1 and let the oracle annotator choose (``lvlm.world.oracle_prefers``: fewer
   hallucinated objects, then -- the paper's "more helpful" tie-break -- more covered objects; ties are
   dropped). Real data: the user's human-preference file in LLaVA-RLHF's format (``load_human_preferences``).
3. Reward model: ``rewards.RewardModel`` from the SFT model, its input the conversation plus the
   evaluation turn WITH the image's ground-truth captions ("Factually Augmented RLHF":
   ``rewards.reward_inputs``; ``--no-facts`` leaves them out), Bradley-Terry loss with the 1e-3 centering
   term (``optim.reward_model_loss``); its accuracy on held-out pairs is reported. On the world,
   ``--rm_reading_steps N`` first trains the SFT model on text-only conversations about captions
   (``reading_model``; not in the paper) and starts the reward model from that.
4. PPO (``recipes._ppo``): rollouts sampled at temperature 1; score = reward model (with facts) + length
   penalty -10 T / T_max + symbolic reward on yes/no and multiple-choice prompts + -8 without an end
   token (``rewards.shaped_score``); per-token KL penalty 0.1 * max(logp - logp_ref, 0) against the frozen
   SFT model; everything x10; GAE with gamma = lambda = 1; whitened advantages; clips 0.2 / 0.2; value-loss
   coefficient 0.1; 2 epochs per rollout batch; grad-norm clip 1.0. The value model is the reward model
   with a new zeroed head (``rewards.value_model_from``) and reads the plain conversation, no facts.
   ``--ptx_coef`` adds InstructGPT's PPO-ptx term, replayed SFT conversations (``recipes._ptx``; not in
   LLaVA-RLHF, on in the world preset, where PPO on descriptions alone costs POPE F1).
5. Evaluate (``recipes.evaluate``) the SFT model and the policy after each PPO iteration (a block of
   ``rollouts_per_iteration`` rollout batches) on the held-out set.

Output (``--out``, ``recipes._run`` layout)::

    config.json  baseline/metrics.json
    pairs/pairs.jsonl                      world: sampled responses and oracle pairs, per prompt
    reward_model/                          the reward model (HF LLaVA layout + score head) and accuracy.json
    iter{k}/model/  iter{k}/value_model/   the policy and the value model after iteration k
    iter{k}/rollouts.rank{r}.jsonl         every rollout: question, response, scores, KL
    iter{k}/metrics.json  summary.json

A rerun with the same command skips what is finished: collection resumes record by record, a saved
reward model is loaded, and PPO restarts at the first unfinished iteration from the last saved policy
and value model (with fresh AdamW moments; the learning-rate schedule continues where it was).

Configs: ``RLHFConfig()`` holds the paper's / release's values; ``WORLD_RLHF`` the built-in world's
(chosen when no ``--data`` is given; every difference is listed beside it); ``--flag value`` overrides.

Processes: under torchrun the pair collection is split across ranks (``recipes._run.collect``), the
reward model trains with DDP (``optim.train``), PPO runs on every rank with each rank rolling out its
share of every rollout batch and gradients averaged over ranks (``recipes._ppo``); evaluation runs on
rank 0. ``--clip`` is accepted for a uniform command line with the other recipes and not used:
LLaVA-RLHF needs no CLIP model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm.checkpoint import copy_tokenizer, load_lvlm, save_lvlm  # noqa: E402
from lvlm.image import load_image, preprocess_image  # noqa: E402
from lvlm.records import read_json, read_located_records, write_json_atomic  # noqa: E402
from lvlm.tokenizer import IMAGE_MARKER, Tokenizer, encode_prompt, pad_batch  # noqa: E402
from optim import apply_lora, merge_lora, reward_accuracy, reward_model_loss  # noqa: E402
from optim.lora import lora_modules  # noqa: E402
from optim.distributed import barrier, get_rank, get_world_size, is_main_process, setup_distributed  # noqa: E402
from optim.train import TrainConfig, batch_for_ranks, lr_at, train  # noqa: E402
from recipes._common import (add_config_arguments, config_from_args, config_to_dict, format_seconds,  # noqa: E402
                             given_flags, print_config, set_cpu_threads)
from recipes._ppo import make_rollout, ppo_update, rewards_and_advantages, rollout_stats  # noqa: E402
from recipes._ptx import replay_batch, replay_dataset, replay_indices  # noqa: E402
from recipes._run import collect, mark_done, model_done, open_run, print_summary, write_summary  # noqa: E402
from recipes.sft import ConversationDataset, load_llava_conversations, set_trainable, train_sft  # noqa: E402
from rewards.reward_model import (RewardModel, load_reward_model, reward_inputs, save_reward_model,  # noqa: E402
                                  score_batch, value_model_from)
from rewards.shaping import shaped_score, symbolic_reward  # noqa: E402
from search.engine import generate  # noqa: E402
from search.sampling_ops import mix_seeds  # noqa: E402

RECIPE = "llava_rlhf"

# ---------------------------------------------------------------------------------------------
# the config and its presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLHFConfig:
    """Every setting; the defaults are the paper's and its released scripts' (ANCHORS §3)."""

    # inputs (all None: the built-in world)
    model: str | None = None  # the SFT model, a Hugging Face LLaVA directory with tokenizer.json
    clip: str | None = None  # accepted for a uniform command line; LLaVA-RLHF uses no CLIP model
    data: str | None = None  # PPO prompts: JSONL of {image, question[, kind, answer, length_bonus]} or LLaVA JSON
    images: str | None = None  # folder the records' image names are relative to
    preferences: str | None = None  # human preferences, LLaVA-RLHF's format (see load_human_preferences)
    captions: str | None = None  # facts: {image: [captions]} (the release's image_to_caption.json) or COCO captions
    out: str | None = None  # default: runs/llava_rlhf[-no-facts][-<preset>]
    world_preset: str = "auto"  # the world's models: "auto" (float32 on a CPU, default with a GPU), or a WORLD_PRESETS name
    seed: int = 0
    threads: int = 0  # CPU only: intra-op threads (0 = one per core this process may use)
    # 2. preference pairs (world): responses sampled from the SFT model, labelled by the oracle
    pair_prompts: int = 10000  # the paper collects ~10k human preference pairs
    samples_per_prompt: int = 2  # the annotators compare two responses
    pairs_per_prompt: int = 1
    pair_temperature: float = 1.0
    # world: what the oracle annotator makes of a repeated mention of an object (``lvlm.world.oracle_prefers``;
    # not in the paper, whose annotators judge hallucination, then helpfulness): "ignore", "tie_break" (fewer
    # wins a tie) or "count" (a hallucinated object). On the Intel float32 models (pairs from 1,000 images,
    # seed 0, iteration 3; "ignore": CHAIR_s 13.6, recall -3.0 points) "count" gave 9.8, -9.7 (seed 1: 7.7,
    # -17.3) and "tie_break" 13.3, -6.5 (docs/WORLD_BUILDS.md)
    oracle_repeats: str = "ignore"
    # 3. reward model
    use_facts: bool = True  # Fact-RLHF; --no-facts sets False (standard RLHF)
    n_captions: int = 5  # COCO has 5 captions per image
    rm_lora_r: int = 64  # LoRA on q/k/v/o/gate/up/down + a trainable head; 0 = full fine-tune
    rm_lora_alpha: float = 16.0
    rm_lr: float = 2e-5  # (the release keeps it constant after warm-up; optim.train decays it by a cosine)
    rm_epochs: int = 1
    rm_batch: int = 32  # 8 GPUs x 4
    rm_micro_batch: int = 4
    center_coef: float = 1e-3
    rm_eval_share: float = 0.05  # held-out pairs for the accuracy (the release keeps 500 of 10k)
    # world: the reward model starts from the SFT model trained this many more steps (batch 32, at
    # rm_reading_lr) on text-only conversations that ask about a caption (``reading_model``; not in the
    # paper, whose SFT model is built on Vicuna and reads text already); 0 = from the SFT model itself.
    # On the Intel float32 models, with pairs from 1,000 images, 300 steps made the reward models more
    # accurate (seed 0's held-out pairs: 82.1% with facts, 77.5% without, against 71.9% and 70.2%) but did
    # not lower CHAIR_s after PPO (14.2 and 13.2 in seeds 0 and 1, against 13.6 and 13.4; recall -1.1 and
    # -1.9 points, against -3.0 and -4.7), and RLHF without facts ended lower still (12.0 and 13.0). With
    # pairs from 3,000 images: 90.1% against 71.8%, and CHAIR_s 14.6 against 10.7 (seed 0); docs/WORLD_BUILDS.md
    rm_reading_steps: int = 0
    rm_reading_lr: float = 5e-4
    # 4. PPO
    ppo_iterations: int = 5  # evaluated blocks of rollout batches (the release saves every 10 steps and
    rollouts_per_iteration: int = 20  # picks a checkpoint; 100 x 512 prompts ~ 0.7 of its 72k-prompt epoch)
    rollout_batch: int = 512
    step_batch: int = 256
    ppo_epochs: int = 2
    ppo_lr: float = 3e-5  # cosine after warmup_steps of linear warm-up
    warmup_steps: int = 5
    weight_decay: float = 0.0
    policy_lora_r: int = 64  # LoRA on the policy's and the value model's language model; 0 = full
    policy_lora_alpha: float = 16.0
    kl_coef: float = 0.1
    kl_kind: str = "k1_clamped"
    reward_scale: float = 10.0
    gamma: float = 1.0
    lam: float = 1.0
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    grad_clip: float = 1.0
    joint_grad_clip: bool = True  # as released: one clip over policy and value gradients together
    temperature: float = 1.0
    max_new_tokens: int = 896  # the release's response_len (also the pairs' sampling budget)
    length_coef: float = 10.0  # LENGTH_BONUS = -10: score -= length_coef * tokens / length_tokens
    length_tokens: int = 896  # T_max of the length penalty (the release divides by response_len)
    correct_bonus: float = 2.0  # CORRECT_BONUS
    end_penalty: float = -8.0  # INCOMPLETE_RESPONSE
    symbolic_share: float = 0.3  # world: share of yes/no and multiple-choice PPO prompts (release ~22k of 72k)
    symbolic_reward_yes: bool = False  # also score "Yes" on a present object (the release scores only "No")
    ppo_prompts: int = 72000  # world: size of the PPO prompt pool (training images after the pairs')
    micro_batch: int = 16  # rows per forward/backward (STEP_PER_DEVICE_BATCH_SIZE)
    # InstructGPT's PPO-ptx term (not in LLaVA-RLHF; recipes/_ptx.py): + ptx_coef x the answer NLL of
    # ptx_batch replayed SFT conversations per optimizer step and rank; the conversations: --ptx_data
    # (LLaVA's conversation JSON, images under --images), on the world its SFT data's short-answer turns
    ptx_coef: float = 0.0
    ptx_data: str | None = None
    ptx_examples: int = 4096  # world: replayed SFT conversations (the optimizer steps cycle through them)
    ptx_batch: int = 16
    generate_batch: int = 64  # rows per generate call (ROLLOUT_PER_DEVICE_BATCH_SIZE)
    # 5. evaluation
    eval_images: int = 200
    eval_batch: int = 64
    eval_annotations: str | None = None  # real data: a COCO instances file for CHAIR / POPE
    eval_image_dir: str | None = None
    eval_synonyms: str | None = None


# The built-in world's preset. What differs from the paper, and why:
# - pairs: 4 samples per image, up to 3 oracle pairs from each, on 3,000 training images (about 8,500
#   pairs; the paper has 10k human pairs of 2 samples). One pair per image (about 900) gave reward models
#   of 65.9% (facts) and 57.1% (none) on held-out pairs, three 70.7% and 71.1%. On the Intel float32
#   models 1,000 images (~2,850 pairs, the preset until 2026-12-08; ~240 s a run against 500-590 s) left
#   Fact-RLHF no better than RLHF without facts (CHAIR_s 13.6 against 13.4 after 3 iterations, seed 0);
#   with 3,000 it ends lower in two seeds of three (10.7 against 12.5, 11.8 against 12.3; seed 2: 11.1
#   against 10.8), and nearer the CHAIR_s target in all three (docs/WORLD_BUILDS.md);
# - reward model: full fine-tune of the tiny language model (LoRA r 64 would be as wide as its layers),
#   lr 5e-4, batch 16, 2 epochs: the paper's 2e-5 barely moves a 1M-parameter model trained from
#   scratch; 1 caption as the facts (a world caption names every object of the image, where a COCO
#   caption names a few, so one is the whole truth; 5 would not fit the world model's 512 positions);
# - PPO: full fine-tune at lr 5e-5 (at 2e-5, CHAIR_s after 3 iterations was 15.5 with facts and 15.5
#   without, recall 76.2 and 78.6; at 5e-5, 12.5 and 20.0, recall 65.5 and 72.7; docs/RESULTS.md), rollout
#   batches of 64 (2 minibatches of 32), 3 iterations x 6 batches; responses of at most 64 tokens
#   (descriptions take < 50) -- the length penalty keeps the release's T_max of 896, so a token costs
#   what it costs there; rollouts on description prompts only
#   (symbolic_share 0): the release's yes/no rule rewards "No" on absent objects and says nothing on
#   present ones, and on the world it drives the yes-ratio (and POPE F1) to 0 within 24 steps;
#   --symbolic_share 0.25 puts yes/no and multiple-choice prompts back; with --symbolic_reward_yes true
#   (a correct "Yes" scored as a correct "No") POPE F1 still fell, 78.09 -> 76.5 after 3 iterations (docs/RESULTS.md);
# - KL coefficient 0.2 (the paper's 0.1): on the world models of FORMAT_VERSION 4, 0.1 lost 6.2 points
#   of recall in 3 iterations (CHAIR_s 26.5 -> 9.5), 0.2 lost 4.8 (-> 8.5), POPE F1 -0.4 and -0.3.
# - ptx_coef 3 (InstructGPT's PPO-ptx, not in LLaVA-RLHF; recipes/_ptx.py): 16 of the SFT data's
#   short-answer conversations replayed per optimizer step. Without it POPE F1 went 78.09 -> 76.86 /
#   77.03 / 76.76 over the 3 iterations (CHAIR_s 7.5 / 7.5 / 7.5, recall 80.8 / 84.0 / 85.0); with
#   ptx_coef 1, 76.89 / 76.65 / 78.22 (CHAIR_s 7.5 / 7.5 / 7.0); with 3, 77.35 / 76.97 / 78.43 (CHAIR_s
#   7.5 / 7.0 / 8.0, recall 82.2 / 82.4 / 82.4). On the whole 1,000-image test split the last
#   iteration's F1 is 77.47 with 1 and 77.94 with 3 (SFT 77.77; seed 1: 77.09 and 77.61; docs/RESULTS.md).
# - eval on the whole test split (1,000 images; CSR's preset says why).
WORLD_RLHF = dataclasses.replace(
    RLHFConfig(),
    pair_prompts=3000, samples_per_prompt=4, pairs_per_prompt=3,
    n_captions=1, rm_lora_r=0, rm_lr=5e-4, rm_epochs=2, rm_batch=16, rm_micro_batch=16, rm_eval_share=0.1,
    ppo_iterations=3, rollouts_per_iteration=6, rollout_batch=64, step_batch=32, ppo_lr=5e-5, warmup_steps=2,
    policy_lora_r=0, max_new_tokens=64, symbolic_share=0.0, ppo_prompts=4000, micro_batch=16, kl_coef=0.2,
    ptx_coef=3.0, eval_images=1000,
)

# The whole chain in seconds on the micro world (CI): nothing here is meant to work, only to run.
MICRO_RLHF = dataclasses.replace(
    WORLD_RLHF, world_preset="micro",
    pair_prompts=12, samples_per_prompt=2, pairs_per_prompt=1, rm_epochs=1, rm_batch=4, rm_micro_batch=4,
    rm_eval_share=0.25, ppo_iterations=1, rollouts_per_iteration=1, rollout_batch=4, step_batch=2, warmup_steps=1,
    symbolic_share=0.5,
    max_new_tokens=12, ppo_prompts=16, micro_batch=4, generate_batch=8, eval_images=4, eval_batch=8,
    rm_reading_steps=2,  # off in the world preset; on here so that the tests run it
)

PRESETS = {"paper": RLHFConfig(), "world": WORLD_RLHF, "micro": MICRO_RLHF}


def default_out(config: RLHFConfig, preset: str) -> str:
    name = RECIPE + ("" if config.use_facts else "-no-facts")
    if preset not in ("paper", "world"):
        name += f"-{preset}"
    return str(Path("runs") / name)


def check_config(config: RLHFConfig) -> None:
    """Settings that cannot work, refused before anything runs."""
    from lvlm.world import ORACLE_REPEATS

    world = get_world_size()
    problems = []
    if config.rollout_batch % config.step_batch:
        problems.append(f"rollout_batch {config.rollout_batch} is not a multiple of step_batch {config.step_batch}")
    minibatches = config.rollout_batch // max(config.step_batch, 1)
    if config.rollout_batch % world or config.rollout_batch // world < minibatches:
        problems.append(f"rollout_batch {config.rollout_batch} must split evenly over {world} ranks with at least "
                        f"{minibatches} rollouts each")
    counts = {"pair_prompts": config.pair_prompts, "pairs_per_prompt": config.pairs_per_prompt,
              "rm_epochs": config.rm_epochs, "rollouts_per_iteration": config.rollouts_per_iteration,
              "ppo_epochs": config.ppo_epochs}
    small = [f"{name} {value}" for name, value in counts.items() if value < 1]
    if small:
        problems.append(f"{', '.join(small)}: each must be >= 1 (ppo_iterations 0 skips PPO)")
    rates = {"rm_lr": config.rm_lr, "ppo_lr": config.ppo_lr, "rm_reading_lr": config.rm_reading_lr}
    bad_rates = [f"{name} {value}" for name, value in rates.items() if value <= 0]
    if bad_rates:
        problems.append(f"{', '.join(bad_rates)}: learning rates must be > 0")
    if config.kl_coef < 0:
        problems.append(f"kl_coef must be >= 0 (a penalty on the policy's KL from the SFT model), got {config.kl_coef}")
    if config.samples_per_prompt < 2 and config.data is None:
        problems.append("samples_per_prompt must be >= 2 (pairs are formed among a prompt's samples)")
    if not 0.0 < config.rm_eval_share < 1.0:
        problems.append(f"rm_eval_share must lie in (0, 1), got {config.rm_eval_share}")
    if not 0.0 <= config.symbolic_share <= 1.0:
        problems.append(f"symbolic_share must lie in [0, 1], got {config.symbolic_share}")
    if config.max_new_tokens < 1 or config.length_tokens < 1:
        problems.append("max_new_tokens and length_tokens must be >= 1")
    if config.ptx_coef < 0 or config.ptx_batch < 1 or config.ptx_examples < 1:
        problems.append("ptx_coef must be >= 0, ptx_batch and ptx_examples >= 1")
    if config.ptx_coef > 0 and config.model is not None and config.ptx_data is None:
        problems.append("ptx_coef > 0 with --model needs --ptx_data (SFT conversations, LLaVA's JSON)")
    if config.oracle_repeats not in ORACLE_REPEATS:
        problems.append(f"oracle_repeats must be one of {ORACLE_REPEATS}, got {config.oracle_repeats!r}")
    elif config.oracle_repeats != "ignore" and config.model is not None:
        problems.append("oracle_repeats sets the built-in world's oracle; a real run's pairs come from --preferences")
    if config.rm_reading_steps < 0:
        problems.append(f"rm_reading_steps must be >= 0, got {config.rm_reading_steps}")
    elif config.rm_reading_steps > 0 and config.data is not None:
        problems.append("rm_reading_steps trains on the built-in world's captions; with --data it must be 0")
    if problems:
        raise ValueError("llava_rlhf config: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# data: prompts, preference pairs and captions
# ---------------------------------------------------------------------------------------------
#
# A prompt item is a dict {"question", "image" (world: scene seed; real: file path), "captions" (list),
# "kind" ("general" / "yes_no" / "multiple_choice"), "truth" (None / "yes" / "no" / option letter),
# "length_bonus" (the release's per-example multiplier of the length penalty, 1.0 by default)}.


@dataclass
class Sources:
    """Where everything comes from: the world, or the user's files."""

    sft_dir: Path
    load_image: Callable  # item["image"] -> PIL image
    pair_items: list | None  # world: the prompts the preference pairs are sampled on
    preference_records: list | None  # real data: pairs from the human-preference file
    ppo_items: list  # the PPO prompt pool
    eval_set: object | None  # recipes.evaluate.EvalSet, or None (no evaluation possible)
    world: object | None  # lvlm.world.WorldConfig on the world
    replay_records: list | None = None  # the PPO-ptx term's SFT conversations (None: no ptx term)
    reading_records: list | None = None  # world: text-only conversations for ``reading_model`` (None: none)


def world_sources(config: RLHFConfig) -> Sources:
    """The world: its SFT model, pair prompts and PPO prompts from the training split, the test split."""
    from lvlm.world import (captions, description_instruction, multiple_choice_question, sample_scene,
                            split_seeds, world_rng, yes_no_question)
    from recipes.evaluate import world_eval_set
    from recipes.world_models import ensure_world_models, render_world_image, world_preset

    preset = world_preset(config.world_preset)
    world = preset.world
    sft_dir = Path(config.model) if config.model else ensure_world_models(preset).sft
    seeds = split_seeds("train", world)
    if config.pair_prompts + config.ppo_prompts > len(seeds):
        raise ValueError(f"pair_prompts + ppo_prompts = {config.pair_prompts + config.ppo_prompts} exceeds the "
                         f"world's {len(seeds)} training images")

    def description_item(seed: int) -> dict:
        scene = sample_scene(seed, world)
        return {"question": description_instruction(scene, 0), "image": seed,
                "captions": captions(scene, config.n_captions), "kind": "general", "truth": None}

    pair_items = [description_item(s) for s in seeds[:config.pair_prompts]]
    ppo_items = []
    for seed in seeds[config.pair_prompts:config.pair_prompts + config.ppo_prompts]:
        rng = world_rng(seed, "llava-rlhf-ppo-prompt")
        draw = rng.random()
        if draw >= config.symbolic_share:
            ppo_items.append(description_item(seed))
            continue
        scene = sample_scene(seed, world)
        facts = captions(scene, config.n_captions)
        if draw < config.symbolic_share / 2 and len(scene.shapes) < len(world.shapes):
            q = yes_no_question(scene, rng, kind="existence", suffix_rate=0.0)  # POPE's question form
            ppo_items.append({"question": q.question, "image": seed, "captions": facts, "kind": "yes_no",
                              "truth": q.answer.lower()})
        else:
            q = multiple_choice_question(scene, rng)
            ppo_items.append({"question": q.question, "image": seed, "captions": facts,
                              "kind": "multiple_choice", "truth": q.answer})
    eval_set = world_eval_set(world, n_images=config.eval_images, split="test") if config.eval_images else None
    replay = None
    if config.ptx_coef > 0:
        from recipes.world_models import world_replay_records

        replay = world_replay_records(preset, config.ptx_examples)
    reading = None
    if config.rm_reading_steps > 0:
        from recipes.world_models import world_reading_records

        reading = world_reading_records(preset, config.rm_reading_steps * READING_BATCH)
    return Sources(sft_dir=sft_dir, load_image=functools.partial(render_world_image, world), pair_items=pair_items,
                   preference_records=None, ppo_items=ppo_items, eval_set=eval_set, world=world, replay_records=replay,
                   reading_records=reading)


def _raise_problems(path: Path, what: str, problems: list[str], missing: list[str]) -> None:
    if problems:
        raise ValueError(f"{len(problems)} malformed {what} record(s) in {path}:\n  " + "\n  ".join(problems[:10]))
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) named in {path} not found:\n  "
                                + "\n  ".join(missing[:10]))


def _image_path(where: str, record: dict, images: Path | None, problems: list, missing: list) -> str | None:
    image = record.get("image")
    if not isinstance(image, str) or not image:
        problems.append(f"{where}: needs 'image', one file name")
        return None
    if images is None:
        problems.append(f"{where}: has an image ({image!r}) but no image folder was given (--images)")
        return None
    path = images / image
    if not path.is_file():
        missing.append(f"{where}: {path}")
        return None
    return str(path)


def _first_question(where: str, conversation, problems: list) -> str | None:
    if not isinstance(conversation, list) or not conversation or not all(isinstance(m, dict) for m in conversation):
        problems.append(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} messages")
        return None
    humans = [m.get("value") for m in conversation if m.get("from") in ("human", "user")]
    if not humans or not isinstance(humans[-1], str):
        problems.append(f"{where}: 'conversations' holds no question from 'human'")
        return None
    return humans[-1].replace(IMAGE_MARKER, "").strip()


def load_human_preferences(path: str | Path, images: str | Path | None) -> list[dict]:
    """LLaVA-RLHF's human-preference file -> pair records {question, image, chosen, rejected, where}.

    The format of LLaVA-Human-Preference-10K (``llava_7b_v1_preference.json``, read by the released
    ``data_utils_rm.py``): a JSON list (or JSONL) of

        {"image": "COCO_train2014_000000xxxxxx.jpg",
         "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", "value": "..."}],
         "output_1": {"from": "llava", "value": "first response"},
         "output_2": {"from": "llava", "value": "second response"},
         "preference": 1 or 2}           # which output the annotator preferred

    The question is the conversation's last "human" turn (a multi-turn record keeps only that turn:
    the reward prompt, ``rewards.fact_prompt``, is single-turn). ``output_k`` may also be a plain
    string. Every record and image is checked up front; problems are reported with file and record.
    """
    path = Path(path)
    images = Path(images) if images is not None else None
    problems, missing, pairs = [], [], []
    for where, record in read_located_records(path):
        question = _first_question(where, record.get("conversations"), problems)
        outputs = []
        for key in ("output_1", "output_2"):
            value = record.get(key)
            value = value.get("value") if isinstance(value, dict) else value
            if not isinstance(value, str):
                problems.append(f"{where}: {key!r} must be a string or {{'value': string}}")
            outputs.append(value)
        preference = record.get("preference")
        if preference not in (1, 2):
            problems.append(f"{where}: 'preference' must be 1 or 2, got {preference!r}")
        image = _image_path(where, record, images, problems, missing)
        if question is None or image is None or preference not in (1, 2) or not all(isinstance(o, str) for o in outputs):
            continue
        chosen, rejected = (outputs[0], outputs[1]) if preference == 1 else (outputs[1], outputs[0])
        pairs.append({"question": question, "image": image, "image_name": record["image"], "chosen": chosen,
                      "rejected": rejected, "where": where})
    _raise_problems(path, "preference", problems, missing)
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs


KINDS = ("general", "yes_no", "multiple_choice")


def load_ppo_prompts(path: str | Path, images: str | Path | None) -> list[dict]:
    """PPO prompts -> prompt items. Accepted records (JSONL, or a JSON list):

    - ``{"image": "x.jpg", "question": "...", "kind": "general" | "yes_no" | "multiple_choice",
      "answer": "yes"/"no" or an option letter, "length_bonus": 1.0}`` -- kind, answer and length_bonus
      optional; a yes/no or multiple-choice prompt with its answer gets the symbolic reward;
    - LLaVA conversation records ``{"image", "conversations": [...]}``: the last human question (general).
    """
    path = Path(path)
    images = Path(images) if images is not None else None
    problems, missing, items = [], [], []
    for where, record in read_located_records(path):
        if "question" in record:
            question = record["question"].replace(IMAGE_MARKER, "").strip() if isinstance(record["question"], str) else None
            if not question:
                problems.append(f"{where}: 'question' must be a non-empty string")
        else:
            question = _first_question(where, record.get("conversations"), problems)
        kind = record.get("kind", "general")
        truth = record.get("answer")
        if kind not in KINDS:
            problems.append(f"{where}: 'kind' must be one of {KINDS}, got {kind!r}")
            continue
        if kind != "general":
            try:
                symbolic_reward("", kind=kind, truth=truth)
            except ValueError as error:
                problems.append(f"{where}: {error}")
                continue
        bonus = record.get("length_bonus", 1.0)
        if not isinstance(bonus, (int, float)):
            problems.append(f"{where}: 'length_bonus' must be a number, got {bonus!r}")
            continue
        image = _image_path(where, record, images, problems, missing)
        if question and image:
            items.append({"question": question, "image": image, "image_name": record["image"], "kind": kind,
                          "truth": truth if kind != "general" else None, "length_bonus": float(bonus),
                          "where": where})
    _raise_problems(path, "prompt", problems, missing)
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def load_captions(path: str | Path) -> dict[str, list[str]]:
    """Ground-truth captions per image file name: the release's ``image_to_caption.json``
    (``{"file.jpg": ["caption", ...]}``) or a COCO captions file (``images`` + ``annotations`` with
    ``image_id`` and ``caption``)."""
    path = Path(path)
    data = read_json(path, "captions file")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list) and isinstance(data.get("images"), list):
        try:
            names = {im["id"]: im["file_name"] for im in data["images"]}
            table: dict[str, list[str]] = {}
            for k, a in enumerate(data["annotations"]):
                if a["image_id"] not in names:
                    raise ValueError(f"{path}: annotation {k} names unknown image_id {a['image_id']}")
                table.setdefault(names[a["image_id"]], []).append(str(a["caption"]).strip())
        except KeyError as e:
            raise ValueError(f"{path}: an entry lacks the key {e} (a COCO captions file)") from None
        return table
    if isinstance(data, dict) and all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in data.values()):
        return data
    raise ValueError(f"{path}: expected {{image: [captions]}} or a COCO captions file (images + annotations)")


def attach_captions(records: list[dict], table: dict[str, list[str]], what: str, n_captions: int) -> None:
    """Give every record its image's captions (at most ``n_captions``); a missing image is an error."""
    missing = sorted({r["image_name"] for r in records if not table.get(r["image_name"])})
    if missing:
        raise ValueError(f"--captions has no captions for {len(missing)} image(s) of the {what}, e.g. "
                         f"{missing[:5]}; give captions for every image or pass --no-facts")
    for r in records:
        r["captions"] = list(table[r["image_name"]][:n_captions])


def real_sources(config: RLHFConfig) -> Sources:
    """The user's files: SFT model, human preferences, PPO prompts, captions, optional COCO evaluation."""
    if config.model is None or config.preferences is None:
        raise ValueError("real data (--data) needs --model (the SFT model) and --preferences (the human-preference "
                         "file): the oracle that labels pairs exists only on the built-in world")
    sft_dir = Path(config.model)
    if not (sft_dir / "config.json").is_file() or not (sft_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--model {sft_dir}: expected a Hugging Face LLaVA directory with config.json and "
                                "tokenizer.json")
    pairs = load_human_preferences(config.preferences, config.images)
    ppo_items = load_ppo_prompts(config.data, config.images)
    if config.use_facts:
        if config.captions is None:
            raise ValueError("Fact-RLHF needs the images' captions (--captions FILE), or pass --no-facts")
        table = load_captions(config.captions)
        attach_captions(pairs, table, "preference pairs", config.n_captions)
        attach_captions(ppo_items, table, "PPO prompts", config.n_captions)
    else:
        for r in pairs + ppo_items:
            r["captions"] = []
    eval_set = None
    if config.eval_annotations is not None:
        from recipes.evaluate import coco_eval_set

        if config.eval_image_dir is None:
            raise ValueError("--eval_annotations needs --eval_image_dir (the images it names)")
        eval_set = coco_eval_set(config.eval_annotations, config.eval_image_dir, config.eval_synonyms,
                                 n_images=config.eval_images, seed=config.seed)
    replay = load_llava_conversations(config.ptx_data, config.images) if config.ptx_coef > 0 else None
    return Sources(sft_dir=sft_dir, load_image=load_image, pair_items=None, preference_records=pairs,
                   ppo_items=ppo_items, eval_set=eval_set, world=None, replay_records=replay)


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


class Images:
    """Preprocessed images ``[1, 3, H, W]`` by reference, computed once each (a small LRU would do for COCO)."""

    def __init__(self, load: Callable, size: int, keep: int = 4096):
        self.load, self.size, self.keep = load, size, keep
        self.cache: dict = {}

    def __call__(self, ref) -> torch.Tensor:
        if ref not in self.cache:
            if len(self.cache) >= self.keep:
                self.cache.pop(next(iter(self.cache)))
            self.cache[ref] = preprocess_image(self.load(ref), size=self.size)[None]
        return self.cache[ref]


def generate_texts(model, tokenizer: Tokenizer, items: Sequence[dict], images: Images, *, n: int,
                   temperature: float, max_new_tokens: int, seeds: Sequence[int], batch: int):
    """Sample ``n`` responses per item: ``(generations [len(items) * n], prompt ids per item)``.

    Prompts are the vicuna_v1 template with the image; ``seeds`` gives one seed per row (item-major),
    so a row's sample depends on its own seed only, not on batching or ranks.
    """
    per_image = model.config.image_tokens_per_image
    prompts = [encode_prompt(tokenizer, item["question"], image_tokens_per_image=per_image)["input_ids"]
               for item in items]
    was_training = model.training
    model.eval()
    out = []
    per_call = max(1, batch // n)
    for start in range(0, len(items), per_call):
        chunk = range(start, min(start + per_call, len(items)))
        out += generate(model, [(prompts[i], images(items[i]["image"])) for i in chunk], n=n,
                        max_new_tokens=max_new_tokens, temperature=temperature,
                        seeds=list(seeds[start * n:(start + len(chunk)) * n]), stop_ids=tokenizer.stop_ids)
    model.train(was_training)
    return out, prompts


def response_text(tokenizer: Tokenizer, tokens: Sequence[int]) -> str:
    stops = set(tokenizer.stop_ids)
    return tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True).strip()


def log(*parts) -> None:
    if is_main_process():
        print(*parts, flush=True)


def evaluate_stage(model, tokenizer: Tokenizer, sources: Sources, directory: Path, config: RLHFConfig,
                   what: str) -> dict:
    """``recipes.evaluate`` on the held-out set (rank 0), cached in ``directory/metrics.json``."""
    path = directory / "metrics.json"
    if sources.eval_set is None:
        log(f"[{what}] no evaluation set (give --eval_annotations and --eval_image_dir): not evaluated")
        return {}
    if not path.is_file() and is_main_process():
        from recipes.evaluate import evaluate

        log(f"[{what}] evaluating on {sources.eval_set.name} ({len(sources.eval_set.images)} images)")
        evaluate(model, tokenizer, sources.eval_set, batch_size=config.eval_batch, out=path,
                 details=directory / "eval_details.json", verbose=False)
    barrier()
    metrics = json.loads(path.read_text())
    log(f"[{what}] " + "  ".join(f"{k} {100 * metrics[k]:.1f}" for k in
                                 ("chair_s", "chair_i", "recall", "pope_acc", "pope_f1", "yes_ratio", "mc_acc")))
    return metrics


def save_policy(model, directory: Path, tokenizer_dir: Path) -> None:
    """Save a LLaVA model (a merged copy when it carries LoRA adapters) with its tokenizer; rank 0."""
    if is_main_process():
        plain = model
        if lora_modules(model):
            plain = merge_lora(copy.deepcopy(model))
        save_lvlm(plain, directory)
        copy_tokenizer(tokenizer_dir, directory)
        mark_done(directory)
    barrier()


# ---------------------------------------------------------------------------------------------
# 2. preference pairs on the world: SFT samples labelled by the oracle
# ---------------------------------------------------------------------------------------------


def world_pair_records(model, tokenizer: Tokenizer, sources: Sources, out: Path, config: RLHFConfig) -> list[dict]:
    """Sample ``samples_per_prompt`` responses per pair prompt and let the oracle choose.

    One collected record per prompt (``recipes._run.collect``: split over ranks, resumable):
    {"responses", "hallucinated", "covered", "pairs": [[chosen index, rejected index], ...]}. Pairs are
    every two responses the oracle does not call a tie (fewer hallucinated objects; then more covered
    ones, the "more helpful" tie-break), at most ``pairs_per_prompt`` of them, drawn with a per-prompt RNG.
    Returns the flat pair records {question, image, captions, chosen, rejected, prompt}.
    """
    from lvlm.world import hallucination_counts, oracle_prefers, sample_scene

    images = Images(sources.load_image, model.config.vision_config.image_size)
    n = config.samples_per_prompt
    items = sources.pair_items

    def work(batch: list[tuple[int, dict]]) -> list[dict]:
        seeds = [mix_seeds(config.seed, 1, i, j) for i, _ in batch for j in range(n)]
        generations, _ = generate_texts(model, tokenizer, [item for _, item in batch], images, n=n,
                                        temperature=config.pair_temperature, max_new_tokens=config.max_new_tokens,
                                        seeds=seeds, batch=config.generate_batch)
        records = []
        for k, (i, item) in enumerate(batch):
            scene = sample_scene(item["image"], sources.world)
            texts = [response_text(tokenizer, g.tokens) for g in generations[k * n:(k + 1) * n]]
            counts = [hallucination_counts(t, scene, sources.world) for t in texts]
            pairs = []
            for a in range(n):
                for b in range(a + 1, n):
                    verdict = oracle_prefers(texts[a], texts[b], scene, sources.world,
                                             repeats=config.oracle_repeats)
                    if verdict:
                        pairs.append([a, b] if verdict > 0 else [b, a])
            rng = random.Random(mix_seeds(config.seed, 2, i))
            pairs = sorted(rng.sample(pairs, min(len(pairs), config.pairs_per_prompt)))
            records.append({"prompt": i, "responses": texts, "hallucinated": [c[0] for c in counts],
                            "covered": [c[1] for c in counts], "pairs": pairs})
        return records

    per_call = max(1, config.generate_batch // n)
    records = collect(list(enumerate(items)), work, out / "pairs", "pairs", batch_size=per_call,
                      what="preference pairs")
    pairs = []
    for record in records:
        item = items[record["prompt"]]
        for a, b in record["pairs"]:
            pairs.append({"question": item["question"], "image": item["image"], "captions": item["captions"],
                          "chosen": record["responses"][a], "rejected": record["responses"][b],
                          "prompt": record["prompt"]})
    noisy = sum(h > 0 for r in records for h in r["hallucinated"]) / max(1, sum(len(r["responses"]) for r in records))
    log(f"[pairs] {len(pairs)} oracle pairs from {len(records)} prompts x {n} samples "
        f"({100 * noisy:.1f}% of the samples hallucinate)")
    return pairs


def split_pairs(pairs: list[dict], config: RLHFConfig) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the pairs of a seeded random ``rm_eval_share`` of the prompts are held out
    (all pairs of a prompt stay on one side, so the accuracy is measured on unseen prompts)."""
    prompts = sorted({p.get("prompt", i) for i, p in enumerate(pairs)})
    random.Random(config.seed).shuffle(prompts)
    held = set(prompts[:max(1, round(config.rm_eval_share * len(prompts)))])
    train_pairs = [p for i, p in enumerate(pairs) if p.get("prompt", i) not in held]
    held_pairs = [p for i, p in enumerate(pairs) if p.get("prompt", i) in held]
    if not train_pairs or not held_pairs:
        raise ValueError(f"{len(pairs)} preference pairs cannot be split into training and held-out pairs; "
                         "collect more (pair_prompts) or change rm_eval_share")
    return train_pairs, held_pairs


# ---------------------------------------------------------------------------------------------
# 3. the reward model
# ---------------------------------------------------------------------------------------------


class RewardPairs:
    """Pair records -> reward-model examples: the chosen and the rejected reward input, and the image.

    Each side is ``rewards.reward_inputs``: the conversation, "</s>", the evaluation turn with the
    captions shuffled (a fixed seed per record and side; the release reshuffles on every read) or
    without them (``use_facts=False``). Every record is encoded when the dataset is built, so a bad one
    fails before training.
    """

    def __init__(self, records: Sequence[dict], tokenizer: Tokenizer, images: Images, *, image_tokens_per_image: int,
                 use_facts: bool, seed: int, max_length: int | None = None):
        self.records, self.images = list(records), images
        if not self.records:
            raise ValueError("RewardPairs: no pairs")
        self.encoded = []
        for i, r in enumerate(self.records):
            sides = []
            for side, name in enumerate(("chosen", "rejected")):
                try:
                    sides.append(reward_inputs(tokenizer, r["question"], r[name], r.get("captions", ()),
                                               image_tokens_per_image=image_tokens_per_image,
                                               seed=mix_seeds(seed, 3, i, side), use_facts=use_facts,
                                               max_length=max_length))
                except ValueError as error:
                    raise ValueError(f"pair {r.get('where', i)} ({name}): {error}") from None
            self.encoded.append(sides)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        chosen, rejected = self.encoded[i]
        return {"chosen": chosen, "rejected": rejected, "pixel_values": self.images(self.records[i]["image"])}


def collate_reward_pairs(examples: Sequence[dict], *, pad_id: int) -> dict:
    """B pairs -> 2B rows, chosen first: input_ids [2B, T] (right-padded), lengths [2B], pixel_values [2B, 3, H, W]."""
    ids, lengths = pad_batch([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)
    pixels = [e["pixel_values"] for e in examples]
    return {"input_ids": ids, "lengths": lengths, "pixel_values": torch.cat(pixels + pixels)}


def reward_loss_fn(center_coef: float):
    """``optim.train``'s loss: Bradley-Terry with LLaVA-RLHF's centering term, plus the pair accuracy."""

    def loss_fn(model, batch: dict):
        scores = model(batch["input_ids"], batch["pixel_values"], batch["lengths"])  # [2B]
        chosen, rejected = scores.chunk(2)
        loss = reward_model_loss(chosen, rejected, center_coef=center_coef)
        return loss, {"accuracy": reward_accuracy(chosen, rejected), "margin": (chosen - rejected).mean().detach()}

    return loss_fn


@torch.no_grad()
def reward_model_accuracy(reward_model: RewardModel, dataset: RewardPairs, *, pad_id: int, batch: int) -> dict:
    """Share of pairs scored chosen > rejected, mean margin, mean score, over a dataset (no grad)."""
    reward_model.eval()
    device = next(reward_model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch):
        b = collate_reward_pairs([dataset[i] for i in range(start, min(start + batch, len(dataset)))], pad_id=pad_id)
        scores = reward_model(b["input_ids"].to(device), b["pixel_values"].to(device), b["lengths"].to(device)).cpu()
        c, r = scores.chunk(2)
        chosen.append(c)
        rejected.append(r)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"accuracy": reward_accuracy(chosen, rejected).item(), "margin": (chosen - rejected).mean().item(),
            "mean_score": torch.cat([chosen, rejected]).mean().item(), "pairs": len(dataset)}


def set_reward_model_trainable(reward_model: RewardModel, lora_r: int, lora_alpha: float) -> int:
    """LLaVA-RLHF: LoRA on the language model's q/k/v/o/gate/up/down plus the new head (lora_r > 0), or
    the whole language model plus the head (lora_r = 0); the vision tower, the projector and the unused
    ``lm_head`` stay frozen. Returns the number of trainable parameters."""
    backbone = reward_model.backbone
    if lora_r > 0:
        apply_lora(backbone, r=lora_r, alpha=lora_alpha)
    else:
        backbone.requires_grad_(False)
        backbone.language_model.model.requires_grad_(True)
    backbone.language_model.lm_head.requires_grad_(False)
    reward_model.score_head.requires_grad_(True)
    return sum(p.numel() for p in reward_model.parameters() if p.requires_grad)


READING_BATCH = 32  # conversations per step of ``reading_model``


def reading_model(sources: Sources, tokenizer: Tokenizer, out: Path, config: RLHFConfig) -> Path:
    """Stage 3a (world only): the SFT model trained ``rm_reading_steps`` more steps on text-only
    conversations -- a caption of an image, no image, and yes/no questions answered from it -- and
    saved to ``out/reader``; the reward model starts from it. Returns its directory (a rerun reuses it).

    LLaVA-RLHF's reward model starts from its SFT model, whose decoder is Vicuna: a model that has read
    much text before it saw an image, so the captions in the evaluation turn (the facts) are something
    it can read. The world's decoder has read only what an image showed: on the Intel float32 models
    (pairs from 1,000 images) its reward model scored 71.9% of held-out pairs with the facts and 70.2%
    without; started from this model (300 steps), 82.1% and 77.5% (``rm_reading_steps`` gives what PPO
    made of them). Not in the paper; the world's stand-in for Vicuna's reading.
    """
    directory = out / "reader"
    if model_done(directory):
        log(f"[reader] found {directory}")
        return directory
    torch.manual_seed(config.seed)
    model = load_lvlm(sources.sft_dir, dtype=torch.float32)
    dataset = ConversationDataset(sources.reading_records, tokenizer, image_size=model.config.vision_config.image_size,
                                  image_tokens_per_image=model.config.image_tokens_per_image,
                                  max_length=model.config.text_config.max_position_embeddings, keep_encoded=True)
    set_trainable(model, vision=False, projector=False, language_model=True)
    batch, micro = batch_for_ranks(READING_BATCH, 16, get_world_size())  # (30, 10) on 3 ranks
    log(f"[reader] {len(dataset)} text-only conversations, {config.rm_reading_steps} steps x {batch}")
    train_sft(model, dataset, TrainConfig(out_dir=str(directory / "train"), lr=config.rm_reading_lr,
                                          max_steps=config.rm_reading_steps, global_batch_size=batch,
                                          micro_batch_size=micro, group_by_length=True, warmup_ratio=0.03,
                                          weight_decay=0.0, grad_clip=1.0, seed=config.seed, log_every=15.0),
              share_prefix=True)
    model.requires_grad_(False)
    save_policy(model, directory, sources.sft_dir)
    return directory


def train_reward_model(start_dir: Path, tokenizer: Tokenizer, pairs: list[dict], images: Images, out: Path,
                       config: RLHFConfig) -> tuple[RewardModel, dict]:
    """Stage 3: the reward model from ``start_dir`` (the SFT model, or ``reading_model``'s), trained on the
    pairs, with its held-out accuracy.

    Saved to ``out/reward_model`` (``rewards.save_reward_model``: HF LLaVA layout + score head) with
    ``accuracy.json``; a rerun loads it.
    """
    directory = out / "reward_model"
    if model_done(directory):
        log(f"[reward model] found {directory}")
        report = json.loads((directory / "accuracy.json").read_text())
        return load_reward_model(directory, dtype=torch.float32), report
    torch.manual_seed(config.seed)
    reward_model = RewardModel(load_lvlm(start_dir, dtype=torch.float32))
    per_image = reward_model.config.image_tokens_per_image
    train_pairs, held_pairs = split_pairs(pairs, config)
    make = functools.partial(RewardPairs, tokenizer=tokenizer, images=images, image_tokens_per_image=per_image,
                             use_facts=config.use_facts, seed=config.seed)
    train_set, held_set = make(train_pairs), make(held_pairs)
    n_trainable = set_reward_model_trainable(reward_model, config.rm_lora_r, config.rm_lora_alpha)
    log(f"[reward model] {len(train_set)} training and {len(held_set)} held-out pairs, "
        f"{'with' if config.use_facts else 'without'} facts, {n_trainable:,} trainable parameters "
        f"({'LoRA r ' + str(config.rm_lora_r) if config.rm_lora_r else 'full'})")
    batch, micro = batch_for_ranks(min(config.rm_batch, len(train_set)), config.rm_micro_batch, get_world_size())
    train_config = TrainConfig(out_dir=str(directory / "train"), lr=config.rm_lr, epochs=config.rm_epochs,
                               global_batch_size=batch, micro_batch_size=micro, warmup_ratio=0.03,
                               weight_decay=0.0, grad_clip=1.0, seed=config.seed, log_every=15.0)
    pad = tokenizer.eos_id  # the score is read at each row's last real token: padding is never seen
    result = train(reward_model, train_set, reward_loss_fn(config.center_coef), train_config,
                   collate_fn=functools.partial(collate_reward_pairs, pad_id=pad))
    if config.rm_lora_r > 0:
        merge_lora(reward_model.backbone)
    reward_model.requires_grad_(False)
    report = {"held_out": reward_model_accuracy(reward_model, held_set, pad_id=pad, batch=config.rm_micro_batch),
              "train_last_step": {k: result.metrics.get(k) for k in ("loss", "accuracy", "margin")},
              "use_facts": config.use_facts}
    log(f"[reward model] held-out accuracy {100 * report['held_out']['accuracy']:.1f}% on "
        f"{len(held_set)} pairs (margin {report['held_out']['margin']:.2f}); last training step: loss "
        f"{result.metrics.get('loss', float('nan')):.3f}, accuracy {100 * result.metrics.get('accuracy', 0):.1f}%")
    if is_main_process():
        save_reward_model(reward_model, directory)
        copy_tokenizer(start_dir, directory)
        write_json_atomic(directory / "accuracy.json", report)
        mark_done(directory)
    barrier()
    return reward_model, report


# ---------------------------------------------------------------------------------------------
# 4. PPO
# ---------------------------------------------------------------------------------------------


def rollout_items(pool: list[dict], rollout_index: int, batch: int, seed: int) -> list[tuple[int, dict]]:
    """The ``batch`` prompts of global rollout batch ``rollout_index``: consecutive slices of one seeded
    permutation of the pool (wrapping around), as (pool index, item)."""
    order = list(range(len(pool)))
    random.Random(mix_seeds(seed, 4)).shuffle(order)
    start = rollout_index * batch
    return [(order[(start + k) % len(order)], pool[order[(start + k) % len(order)]]) for k in range(batch)]


def score_rollouts(reward_model: RewardModel, tokenizer: Tokenizer, items: Sequence[dict], texts: Sequence[str],
                   pixel_values: torch.Tensor, lengths: torch.Tensor, has_end: torch.Tensor, *, config: RLHFConfig,
                   caption_seeds: Sequence[int]) -> dict:
    """The sequence scores of rollouts (LLaVA-RLHF's released shaping, ``rewards.shaped_score``):

        score = RM(question, response, facts) - length_coef * T / length_tokens * length_bonus
                + correct_bonus * correct (yes/no, multiple choice) + end_penalty * [no end token]

    Returns {"score", "rm", "length", "symbolic", "end"} float32 [B] tensors (the parts, for the logs).
    """
    rm = score_batch(reward_model, tokenizer,
                     [{"question": it["question"], "response": t, "captions": it.get("captions", ())}
                      for it, t in zip(items, texts)], pixel_values,
                     image_tokens_per_image=reward_model.config.image_tokens_per_image, use_facts=config.use_facts,
                     seed=list(caption_seeds), batch_size=config.micro_batch)
    symbolic = torch.tensor([symbolic_reward(t, kind=it.get("kind", "general"), truth=it.get("truth"),
                                             coef=config.correct_bonus, reward_yes=config.symbolic_reward_yes)
                             for it, t in zip(items, texts)])
    multiplier = torch.tensor([float(it.get("length_bonus", 1.0)) for it in items])
    score = shaped_score(rm, response_tokens=lengths, max_response_tokens=config.length_tokens, has_end=has_end,
                         symbolic=symbolic, length_coef=config.length_coef, length_multiplier=multiplier,
                         end_penalty=config.end_penalty)
    length = -config.length_coef * multiplier * lengths.float() / config.length_tokens
    end = torch.where(has_end, 0.0, config.end_penalty)
    return {"score": score, "rm": rm, "length": length, "symbolic": symbolic, "end": end}


def sample_rollout_batch(policy, reference, value_model, reward_model: RewardModel, tokenizer: Tokenizer,
                         images: Images, pool: list[dict], g: int, config: RLHFConfig):
    """This rank's share of global rollout batch ``g``, ready for the update.

    Sample one response per prompt at ``temperature`` (per-row seeds from the prompt's place in the
    global batch, so the rollouts do not depend on the number of ranks), score it (``score_rollouts``),
    run the three forwards (``make_rollout``) and compute rewards and advantages. Returns the rollout
    and one log record per row.
    """
    rank, world = get_rank(), get_world_size()
    chosen = rollout_items(pool, g, config.rollout_batch, config.seed)[rank::world]
    items = [item for _, item in chosen]
    seeds = [mix_seeds(config.seed, 5, g, k * world + rank) for k in range(len(items))]
    generations, prompts = generate_texts(policy, tokenizer, items, images, n=1, temperature=config.temperature,
                                          max_new_tokens=config.max_new_tokens, seeds=seeds,
                                          batch=config.generate_batch)
    texts = [response_text(tokenizer, gen.tokens) for gen in generations]
    lengths = torch.tensor([len(gen.tokens) for gen in generations])
    has_end = torch.tensor([gen.finish_reason == "eos" for gen in generations])
    pixels = torch.cat([images(item["image"]) for item in items])
    parts = score_rollouts(reward_model, tokenizer, items, texts, pixels, lengths, has_end, config=config,
                           caption_seeds=[mix_seeds(config.seed, 6, g, k * world + rank) for k in range(len(items))])
    rollout = make_rollout(policy, reference, value_model, prompts, pixels, [gen.tokens for gen in generations],
                           parts["score"], pad_id=tokenizer.pad_id, micro_batch=config.micro_batch)
    rewards_and_advantages(rollout, kl_coef=config.kl_coef, kl_kind=config.kl_kind, reward_scale=config.reward_scale,
                           gamma=config.gamma, lam=config.lam)
    records = [{"rollout": g, "prompt": index, "kind": item.get("kind", "general"), "question": item["question"],
                "response": texts[k], "tokens": int(lengths[k]),
                **{name: round(float(value[k]), 4) for name, value in parts.items()},
                "kl": round(float(rollout.kl[k].sum()), 4)} for k, (index, item) in enumerate(chosen)]
    return rollout, records


def progress_line(it: int, r: int, step: int, total_steps: int, rollout, records: list[dict], update: dict,
                  config: RLHFConfig, elapsed: float) -> str:
    """One PPO progress line: this rank's rollout statistics and the update's (averaged over ranks)."""
    stats = rollout_stats(rollout)
    mean = lambda key, rows=records: sum(x[key] for x in rows) / max(len(rows), 1)  # noqa: E731
    descriptions = [x for x in records if x["kind"] == "general"]
    eta = elapsed / (r + 1) * (config.rollouts_per_iteration - r - 1)
    return (f"[ppo] iter {it} rollout {r + 1}/{config.rollouts_per_iteration} (step {step}/{total_steps}): "
            f"score {stats['score']:.2f} (rm {mean('rm'):.2f}, length {mean('length'):.2f}, symbolic "
            f"{mean('symbolic'):.2f}, end {mean('end'):.2f})  kl/seq {stats['kl_seq']:.3f}  tokens "
            f"{stats['length']:.1f}" + (f" (descriptions {mean('tokens', descriptions):.1f})" if descriptions else "")
            + f"  value {stats['value']:.2f} (return {stats['return']:.2f})  policy loss {update['policy_loss']:.3f}  "
            f"value loss {update['value_loss']:.2f}  approx_kl "
            f"{update['approx_kl']:.4f}  clipped {update['clip_fraction']:.2f}  grad norms "
            f"{update['policy_grad_norm']:.2f} / {update['value_grad_norm']:.2f}  "
            + (f"ptx nll {update['ptx_nll']:.3f}  " if "ptx_nll" in update else "")
            + f"elapsed {format_seconds(elapsed)}  eta {format_seconds(eta)}")


def run_ppo(policy, reference, value_model, reward_model: RewardModel, tokenizer: Tokenizer, sources: Sources,
            out: Path, config: RLHFConfig) -> list[dict]:
    """Stage 4 and 5: ``ppo_iterations`` blocks of ``rollouts_per_iteration`` rollout batches, the policy
    and value model saved and the policy evaluated after each block. Returns the per-iteration metrics."""
    rank, world = get_rank(), get_world_size()
    images = Images(sources.load_image, policy.config.vision_config.image_size)
    minibatches = config.rollout_batch // config.step_batch
    steps_per_iteration = config.rollouts_per_iteration * config.ppo_epochs * minibatches
    total_steps = config.ppo_iterations * steps_per_iteration
    schedule = functools.partial(lr_at, total_steps=total_steps, warmup_steps=config.warmup_steps,
                                 peak_lr=config.ppo_lr)

    # Trainable parts: the language model of the policy (LoRA or full), the language model and head of the
    # value model; vision towers, projectors (frozen in the release) and the value model's lm_head stay put.
    def make_trainable() -> tuple[list, list]:
        if config.policy_lora_r > 0:
            apply_lora(policy, r=config.policy_lora_r, alpha=config.policy_lora_alpha)
            apply_lora(value_model.backbone, r=config.policy_lora_r, alpha=config.policy_lora_alpha)
        else:
            policy.requires_grad_(False)
            policy.language_model.requires_grad_(True)
            value_model.requires_grad_(False)
            value_model.backbone.language_model.model.requires_grad_(True)
        value_model.backbone.language_model.lm_head.requires_grad_(False)
        value_model.score_head.requires_grad_(True)
        return ([p for p in policy.parameters() if p.requires_grad],
                [p for p in value_model.parameters() if p.requires_grad])

    def fresh_optimizer(params):
        matrices = [p for p in params if p.dim() >= 2]
        others = [p for p in params if p.dim() < 2]
        groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.ppo_lr)

    # A rerun: the finished iterations (policy and value model saved) are read back, and PPO goes on
    # from the last of them.
    iterations, finished = [], 0
    while finished < config.ppo_iterations and all(
            model_done(out / f"iter{finished + 1}" / name) for name in ("model", "value_model")):
        finished += 1
    for it in range(1, finished + 1):
        directory = out / f"iter{it}"
        saved = policy if (directory / "metrics.json").is_file() else load_lvlm(directory / "model", dtype=torch.float32)
        iterations.append(evaluate_stage(saved, tokenizer, sources, directory, config, f"iter {it} (saved)"))
    if finished == config.ppo_iterations:
        return iterations
    if finished:
        log(f"[ppo] resuming after iteration {finished}: loading its policy and value model")
        policy.load_state_dict(load_lvlm(out / f"iter{finished}" / "model", dtype=torch.float32).state_dict())
        value_model.load_state_dict(load_reward_model(out / f"iter{finished}" / "value_model",
                                                      dtype=torch.float32).state_dict())
    policy_params, value_params = make_trainable()
    optimizer = fresh_optimizer(policy_params + value_params)
    replay_at = None  # optimizer step -> this rank's replay batch (the PPO-ptx term), or None
    if sources.replay_records is not None:
        replay = replay_dataset(sources.replay_records, tokenizer, policy, sources.load_image)

        def replay_at(step: int) -> dict:
            return replay_batch(replay, replay_indices(step * world + rank, config.ptx_batch, len(replay)),
                                pad_id=tokenizer.pad_id)
    log(f"[ppo] {sum(p.numel() for p in policy_params):,} + {sum(p.numel() for p in value_params):,} trainable "
        f"parameters (policy + value model), {total_steps} optimizer "
        f"steps in all ({config.rollouts_per_iteration} rollout batches of {config.rollout_batch} per iteration, "
        f"{config.ppo_epochs} epochs x {minibatches} minibatches each), {world} rank(s)")

    for it in range(finished + 1, config.ppo_iterations + 1):
        directory = out / f"iter{it}"
        directory.mkdir(parents=True, exist_ok=True)
        log_path = directory / f"rollouts.rank{rank}.jsonl"
        log_path.write_text("")  # an unfinished iteration is redone from its start
        step = (it - 1) * steps_per_iteration
        started = time.time()
        for r in range(config.rollouts_per_iteration):
            g = (it - 1) * config.rollouts_per_iteration + r  # global rollout batch index
            rollout, records = sample_rollout_batch(policy, reference, value_model, reward_model, tokenizer, images,
                                                    sources.ppo_items, g, config)
            with open(log_path, "a") as f:
                f.writelines(json.dumps(x) + "\n" for x in records)
            step, update = ppo_update(policy, value_model, optimizer, rollout, policy_params=policy_params,
                                      value_params=value_params, epochs=config.ppo_epochs, minibatches=minibatches,
                                      micro_batch=config.micro_batch, clip_eps=config.clip_eps,
                                      value_clip_eps=config.value_clip_eps, vf_coef=config.vf_coef,
                                      grad_clip=config.grad_clip, joint_clip=config.joint_grad_clip,
                                      lr_at_step=schedule, step=step, seed=config.seed,
                                      ptx_coef=config.ptx_coef, replay_batch=replay_at)
            log(progress_line(it, r, step, total_steps, rollout, records, update, config, time.time() - started))
        save_policy(policy, directory / "model", sources.sft_dir)
        if is_main_process():
            plain = value_model
            if lora_modules(value_model):
                plain = copy.deepcopy(value_model)
                merge_lora(plain.backbone)
            save_reward_model(plain, directory / "value_model")
            mark_done(directory / "value_model")
        barrier()
        iterations.append(evaluate_stage(policy, tokenizer, sources, directory, config, f"iter {it}"))
    return iterations


# ---------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------


def parse_config(argv=None) -> tuple[RLHFConfig, str]:
    """The resolved config: the preset (``--preset``; default "world" without --data, "paper" with it),
    then every ``--flag value`` given, then ``--no-facts``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="paper (defaults with --data), world (defaults without), micro (CI)")
    parser.add_argument("--no-facts", dest="no_facts", action="store_true",
                        help="standard RLHF: the reward model sees no captions (the ablation)")
    add_config_arguments(parser, RLHFConfig())
    args = parser.parse_args(argv)
    given = config_from_args(args, RLHFConfig())
    preset = args.preset or ("paper" if given.data is not None else "world")
    config = config_from_args(args, PRESETS[preset])
    if args.no_facts:
        config = dataclasses.replace(config, use_facts=False)
    if config.out is None:
        config = dataclasses.replace(config, out=default_out(config, preset))
    given_real = given_flags(config, ("preferences", "images", "captions", "ptx_data", "eval_annotations",
                                      "eval_image_dir", "eval_synonyms"))
    if config.data is None and given_real:
        parser.error(f"{' / '.join(given_real)} go with --data (real data); without --data the built-in world "
                     "is used")
    return config, preset


def main(argv=None) -> dict:
    started = time.time()
    config, preset = parse_config(argv)
    set_cpu_threads(config.threads or None)
    setup_distributed()
    check_config(config)
    if is_main_process():
        print_config(config, f"llava_rlhf ({preset} preset, {'Fact-RLHF' if config.use_facts else 'RLHF without facts'})")
    torch.manual_seed(config.seed)

    # 1. the SFT model, the data, the run directory (a mismatching config is refused before any work)
    sources = world_sources(config) if config.data is None else real_sources(config)
    out = open_run(config.out, RECIPE, config_to_dict(config), models={"policy": sources.sft_dir})
    tokenizer = Tokenizer.from_file(sources.sft_dir)
    policy = load_lvlm(sources.sft_dir, dtype=torch.float32)
    baseline = evaluate_stage(policy, tokenizer, sources, out / "baseline", config, "baseline (SFT)")

    # 2. preference pairs: the oracle on the world, the human-preference file on real data
    images = Images(sources.load_image, policy.config.vision_config.image_size)
    if sources.preference_records is None:
        pairs = world_pair_records(policy, tokenizer, sources, out, config)
    else:
        pairs = sources.preference_records
        log(f"[pairs] {len(pairs)} human preference pairs from {config.preferences}")

    # 3. the reward model (with facts unless --no-facts), and its held-out accuracy; from the SFT model, or
    #    (world, rm_reading_steps > 0) from the SFT model after some text-only reading
    rm_start = reading_model(sources, tokenizer, out, config) if sources.reading_records else sources.sft_dir
    reward_model, rm_report = train_reward_model(rm_start, tokenizer, pairs, images, out, config)
    reward_model.requires_grad_(False)
    reward_model.eval()

    # 4. PPO against it: reference = the frozen SFT model, value model = the reward model with a zeroed head
    reference = load_lvlm(sources.sft_dir, dtype=torch.float32).requires_grad_(False).eval()
    value_model = value_model_from(reward_model)
    iterations = run_ppo(policy, reference, value_model, reward_model, tokenizer, sources, out, config)

    # 5. the summary
    summary = write_summary(out, RECIPE, baseline, iterations, time.time() - started)
    summary["reward_model"] = rm_report
    if is_main_process():
        write_json_atomic(out / "summary.json", summary)
        print(f"\nreward model ({'with' if config.use_facts else 'without'} facts): held-out accuracy "
              f"{100 * rm_report['held_out']['accuracy']:.1f}% on {rm_report['held_out']['pairs']} pairs")
    if baseline:
        print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
