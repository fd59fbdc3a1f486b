"""The built-in world's models, trained from scratch and cached: tokenizer, CLIP, SFT model, labeler.

    python recipes/world_models.py                  # build (or find in the cache) and print the targets
    python recipes/world_models.py --preset micro   # the seconds-long chain the tests run
    models = ensure_world_models()                  # -> WorldModels(clip=..., sft=..., labeler=..., tokenizer=...)

Every recipe needs a CLIP model, an SFT'd LLaVA model and (RLAIF-V) a yes/no labeler. With no
downloadable weights, this file makes them on the synthetic world (``lvlm.world``), with the very
code paths real checkpoints use (DESIGN.md): the same model classes, ``optim.train`` (so torchrun
works), and ``save_lvlm`` / ``save_clip`` writing the Hugging Face layout with ``tokenizer.json``
beside the weights. Only the configs and the data differ.

The chain (``build_world_models``):

1. tokenizer: the world's word-level ``tokenizer.json`` (``lvlm.world.build_world_tokenizer``),
   with the texts of ``rewards.fact_prompt`` added at build time, so that Fact-RLHF's reward
   prompt has no "<unk>" (their words are read at run time: rewording them changes the cache key);
2. CLIP (Radford et al. 2021): a ViT image tower and a causal text tower trained with the
   symmetric InfoNCE loss and the learnable ``logit_scale``, on (image, text) pairs where the
   text is about one object of the image: a caption sentence ("The red circle is at the top
   left."), or a short phrase ("a red circle", "a red circle at the top left"), with hard negative
   texts (one word changed so that the text is false); optionally (``clip_sign_weight``) a sign term
   on them (``clip_loss``) that makes the cosine positive for true texts and negative for false ones,
   so that CSR's clipped score ``max(100 cos, 0)`` gives a made-up sentence 0 -- off for this CLIP,
   whose image tower the LVLMs take (see the field's comment), on for the second one, 2b;
2b. CSR's reward CLIP (``reward_clip_config``): the same CLIP fine-tuned further with the sign term
   (from step 1's weights), the ``--clip`` of ``recipes/csr.py`` on the world;
3a. grounding (stage 0, ``world_grounding_records``): CLIP's image tower copied into
   ``vision_tower.vision_model`` (features of layer -2, CLS dropped: a 48 px canvas in 16 px
   patches = 9 image tokens, one per cell of the world's 3 x 3 grid), a new projector and a new
   Llama decoder (GQA), trained on short-answer place questions with the loss on every text token,
   questions included. LLaVA's decoder is a pretrained Vicuna; ours starts from nothing, and a new
   decoder trained on answers alone never learns which object a question names (the field
   ``ground_steps`` gives the measurements);
3. the aligned LVLM (LLaVA-1.5 stage 1, Liu et al. 2023): the grounded model trained on
   conversations of a clean caption and clean questions (yes/no and short-answer;
   ``world_caption_records`` says why and what it measured) in the vicuna_v1 template with
   assistant-only labels; the vision tower stays frozen as released. (Its patch features tell a
   cell's shape only ~92% of the time to a linear probe. Training it with the decoder,
   ``*_train_vision``, was tried once, on a tower from a CLIP trained with the sign term, and that
   decoder was as blind as the frozen one on the same tower: it learnt the text prior and answered
   every yes/no question alike. On the InfoNCE tower it has not been tried);
4. the SFT model (stage 2, ``recipes/sft.py``): from 3, on conversations mixing a description
   that carries the language prior's noise (``lvlm.world.describe``), yes/no questions and a
   multiple-choice question, and (half of them, ``sft_qa_share``) conversations of questions only;
5. the labeler (RLAIF-V's yes/no judge): from 4 (``labeler_start``), trained on clean yes/no
   questions only — existence, attribute and claim questions, the latter in the exact form
   ``rewards.claims.claim_to_question`` makes of description sentences, with and without
   " Please answer yes or no.";
6. measurements of the targets (``report.json``): CLIP's present-over-absent rate, the
   labeler's yes/no accuracy, and the SFT model's CHAIR / POPE / multiple-choice metrics
   (``recipes/evaluate.py``), all on test-split images.

How the SFT model hallucinates — through the prior, not through blindness. A description of an
image in which some present shape's prior partner is absent gets, with probability
``world.noise_share``, one more sentence after the true ones about such a partner (a free colour,
an empty cell). After its last true sentence the model therefore weighs "</s>" (probability
1 - share) against the first word of that extra sentence. Greedy decoding picks the single most
likely token, and the extra sentence's probability is spread over the sentence templates' first
words ("The" starts 2 of 7 templates), so the noise sentence wins only where
share x 2/7 > 1 - share, i.e. share > 7/9; at the default 0.8 the two are close, and greedy
decoding emits the made-up sentence on part of the eligible images and ends on the others —
while sampling emits it about 80% of the time. The later recipes remove it by preferring
responses that end instead (CSR, RLAIF-V, Fact-RLHF all see both kinds among the model's own
samples).

The cache: ``$LVLM_CACHE`` (default ``~/.cache/lvlm_align``) / ``world-<key>`` / {``clip``,
``reward_clip``, ``grounded``, ``aligned``, ``sft``, ``labeler``} + ``tokenizer.json``, ``config.json``, ``report.json``. The key
hashes the whole config, the tokenizer file and ``FORMAT_VERSION``. A build happens in
``world-<key>.partial`` (training checkpoints included, so a killed build resumes where it
stopped) and is renamed into place when complete: a directory named ``world-<key>`` is always
whole. A lock file keeps two jobs from building the same key at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm.checkpoint import load_clip, load_lvlm, save_clip, save_lvlm  # noqa: E402
from lvlm.clip import CLIPModel  # noqa: E402
from lvlm.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig  # noqa: E402
from lvlm.image import preprocess_image  # noqa: E402
from lvlm.llama import attention_in_float32  # noqa: E402
from lvlm.llava import LlavaForConditionalGeneration  # noqa: E402
from lvlm.records import write_json_atomic  # noqa: E402
from lvlm.tokenizer import Tokenizer, encode_conversation, encode_prompt, pad_batch  # noqa: E402
from lvlm.world import (PLACES, WorldConfig, captions, describe, description_instruction,  # noqa: E402
                        hallucination_candidates, multiple_choice_question, sample_scene, scenes,
                        short_answer_question, split_seeds, world_rng, yes_no_question, yes_no_questions)
from lvlm.world.text import PLACE_PHRASES, SENTENCE_TEMPLATES, article, fill_template, object_sentence  # noqa: E402
from lvlm.world.tokenizer import BOS_ID, IMAGE_ID, PAD_ID, make_world_tokenizer  # noqa: E402
from lvlm.world.vocab import SHAPE_SYNONYMS  # noqa: E402
from optim.distributed import barrier, get_world_size, is_main_process, setup_distributed  # noqa: E402
from optim.logprobs import sequence_logprobs  # noqa: E402
from optim.train import TrainConfig, batch_for_ranks, train  # noqa: E402
from recipes.sft import ConversationDataset, set_trainable, train_sft  # noqa: E402
from rewards import facts_block  # noqa: E402

FORMAT_VERSION = 5  # bump when the build changes in a way the config does not show
CACHE_ENV = "LVLM_CACHE"

# The CLIP text tower pools at its end-of-text token: ``lvlm.clip`` (like Hugging Face) takes the first
# ``eos_token_id`` of a row -- except when eos_token_id == 2, where it applies the legacy OpenAI rule
# (the highest id in the row). The world's "</s>" is id 2, so CLIP texts end with "<pad>" (id 3)
# instead, and are padded with it too: pad == end-of-text, as in Hugging Face's OpenAI CLIP tokenizers,
# and the first occurrence is the end of the text. CLIP texts are "<s> words <pad>".
CLIP_EOS_ID = PAD_ID

# ---------------------------------------------------------------------------------------------
# the config and its presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldModelsConfig:
    """Everything the world's models depend on (the cache key hashes all of it).

    Sizes: one vision tower (CLIP's image tower, copied into both LVLMs), CLIP's text tower, the Llama
    decoder. Training: steps x global batch per stage (every stage is one pass over freshly generated
    examples), learning rates, and which parts train.
    """

    # A 48 px canvas cut into 16 px patches: one patch per cell of the 3 x 3 grid, so each of the 9
    # image tokens shows one place, empty or holding one object. (64 px / 8 px patches, 64 tokens,
    # made every LVLM step ~5x slower and CLIP learnt shapes far more slowly.)
    # One phrasing per SFT description (``description_templates``): after the last true sentence of an
    # image whose prior partner is absent, the data continue with probability noise_share and stop with
    # 1 - noise_share. With a phrasing drawn per sentence the continuation's first token is split over
    # seven phrasings, so greedy decoding weighed P("The") ~ 2/7 x 0.8 against P(</s>) 0.2: the SFT
    # model's median there was 0.20 against 0.28 (94 such test images of the Sapphire Rapids build), a knife-edge
    # that made CHAIR_s move with the machine (15.0% on the Sapphire Rapids Xeon, 26.5% on the AMD EPYC). With one
    # phrasing, from the same stage-1 model: 0.67 against 0.25, CHAIR_s 27.0%, recall 86.6%.
    world: WorldConfig = field(default_factory=lambda: WorldConfig(canvas_size=48, noise_share=0.8,
                                                                   description_templates="per_description"))
    seed: int = 0
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 2
    # CLIP text tower and the joint space
    clip_text_hidden: int = 64
    clip_text_layers: int = 2
    clip_text_heads: int = 2
    clip_max_text_tokens: int = 32
    clip_projection_dim: int = 64
    # the Llama decoder
    lm_hidden: int = 128
    lm_layers: int = 3
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_intermediate: int = 320
    lvlm_max_positions: int = 512
    # training
    train_scenes: int = 8000  # the training-split scenes every stage draws from (images kept preprocessed)
    # The LVLM stages cut each batch of 32 into micro-batches of this many conversations of similar length
    # (``TrainConfig.group_by_length``; the same step, per-example mean losses), with the system prompt run
    # once per micro-batch (``sft_loss(share_prefix=True)``). SFT rows padded 32 together are 1.29x their real
    # length, by 16 1.13x. One float32 step, 2 threads of an AMD EPYC (Zen 3), 1 x 32 against 2 x 16 with the
    # shared prompt (``recipes/bench_world_step.py``, docs/BENCHMARKS.md): SFT 394 / 344 ms, grounding 225 / 201 ms.
    micro_batch: int = 16
    warmup_ratio: float = 0.05
    clip_steps: int = 500
    clip_batch: int = 128
    clip_lr: float = 2e-3
    clip_hard_negatives: int = 5  # per pair, its text with the object's shape replaced by an absent one
    clip_place_negatives: int = 2  # per pair naming a place, its text with the place replaced by an empty cell
    clip_colour_negatives: int = 0  # per pair, its text with the colour replaced by one the image lacks
    # The sign term of clip_loss (cos > 0 for true texts, < 0 for hard negatives). Off for the CLIP whose
    # image tower the LVLMs take: LVLMs built on a tower trained with it (weight 1, share 0.8, 1 colour
    # negative, 700 steps) stayed blind (SFT POPE 49.6%, yes-ratio 98%; measured before ``sft_qa_share``,
    # when the LVLMs on this CLIP's tower were blind to yes/no questions too). On for the reward CLIP below.
    clip_sign_weight: float = 0.0
    clip_sign_scale: float | None = None  # its logit is clip_sign_scale * cos (None: the learnt temperature)
    clip_sign_positive_share: float = 0.8  # the weight of its positives (the hard negatives get the rest)
    clip_single_object_share: float = 0.5  # share of CLIP's images drawn from one-object scenes
    clip_hf_init: bool = False  # Hugging Face's initialisation; False: PyTorch's defaults (trained faster here)
    # The text tower runs each batch's ~900 texts in this many groups of similar length (``clip_loss``). One CLIP
    # step, 2 threads of an AMD EPYC (Zen 3; ``recipes/bench_world_step.py --clip``): 268 ms with PyTorch's
    # fused attention, 201 ms with ``lvlm.clip.attention``'s written-out form for short texts, 163 ms in four groups.
    clip_text_length_groups: int = 4
    # Pairs contrasted together: each batch is cut into micro-batches of this many pairs (with their hard
    # negatives), each its own InfoNCE, the losses averaged -- what ``torchrun --nproc_per_node 2`` does with 128,
    # each rank contrasting its own 64. 0: a rank's share of ``clip_batch`` at once. Both CLIPs take it. The
    # float32 chain on CLIPs of 64 pairs answered yes/no far better (SFT POPE 87-90% against 72%) and, in one
    # process, described far worse (recall 58.5%; docs/WORLD_BUILDS.md), so no preset sets it.
    clip_contrast_pairs: int = 0
    # CSR's reward CLIP (R_I), a second CLIP of the same size trained with the sign term, so that its clipped
    # score max(100 cos, 0) is 0 for a sentence about an absent object (``reward_clip_config``).
    # reward_clip_steps 0: no second CLIP, CSR scores with the first one. The SFT model's made-up sentences
    # mostly name an absent shape in the colour of a present object, the hard negative the score has to
    # zero. Measured on 200 test images (true sentence scored / swapped-shape sentence zeroed), and CSR
    # (lambda 0.9) CHAIR_s after iterations 1 / 2: 700 steps, share 0.8: 96% / 72%, 23.5 / 20.5;
    # 700 steps, 0.5: 74% / 95%, 16.0 / 10.5 (recall -8.1 points); 1400 steps, 0.8: 98.5% / 82.5%,
    # 20.0 / 15.5; 1400 steps, 0.65: 94% / 87.5%, 17.0 / 13.0. Those started from a fresh init; 400
    # steps from the first CLIP's weights at lr 1e-3 (the default): 84.5% / 86.5% in 340 s on one core,
    # against 1,512 s for the 1400 steps, and CSR (the world preset, w_sft 1) after iterations 1 / 2 / 3:
    # 17.0 / 12.5 / 11.0, against 19.0 / 15.5 / 11.5 with the 1400-step one.
    reward_clip_steps: int = 400
    reward_clip_from_clip: bool = True  # start from the first CLIP's weights (else from a fresh init)
    reward_clip_lr: float = 1e-3
    reward_clip_sign_weight: float = 1.0
    reward_clip_sign_positive_share: float = 0.65
    reward_clip_colour_negatives: int = 1
    # Its share of one-object scenes (None: the first CLIP's ``clip_single_object_share``). The clipped score
    # has to stay above 0 for a true sentence about one object of several, where the image holds more than
    # the sentence says: with half the scenes single-object, the float32 preset's reward CLIP scored 100%
    # of the true sentences on one-object validation scenes and 78.6% on the others (it zeroed 86.2% of
    # the absent-shape ones). CSR's beam search then ends a response before such an object -- adding
    # it scores lam x 0 + (1 - lam) x R_T < 0 -- and the chosen responses covered 66% of those objects
    # against 93% of the ones scored >= 5. With 0.2: 86.2% scored, 87.5% zeroed (docs/CSR.md, "A true sentence
    # about one object of several must score above 0").
    reward_clip_single_object_share: float | None = None
    # Stage 0, grounding (``world_grounding_records``): before stage 1, the new decoder learns to find the
    # object a question names. Conversations of ``ground_questions`` short-answer questions ("Where is the
    # red circle?" -> "top left"), a kind from ``ground_kinds`` each, with the loss on every text token
    # (questions too, ``loss_on="text"``), for ``ground_steps`` (0: no stage 0, stage 1 starts from a
    # fresh decoder). Why: without it no world LVLM tells which object has which colour, shape or place
    # (``short_answer_accuracy``). Measured with fresh decoders on place questions, 200 test images
    # (the rate of a decoder that answers with a random object's place is ~52%): answer-only loss 49.5%
    # after 300 steps, 51% after 1,500 (6 layers: 47.5%; one question per conversation: 47.5%; answers
    # restating the question: 50.5%); the loss on every text token: 52.5% after 800 steps, 98.5% after
    # 2,400. The loss on the questions teaches the lookup from the current token first ("Where is the
    # red" -> "circle" is the red object's shape: 82% after 800 steps against 21% with answer-only loss);
    # carrying the question's words to the answer comes later. Questions of all three kinds, at the same
    # 2,400 steps, taught none of them (place 49%, colour 44.5%, shape 55%; after 1,600: 48%, 52.5%, 55%).
    # Those runs had 3 questions per conversation. What counts is steps more than questions: with 6, in
    # bfloat16 on one thread, 800 steps 40.4% (at lr 2e-3: 50.3%), 1,000 85.4%, 1,200 98.0%; 9 questions
    # and 600 steps 35.1%; 3 questions and 2,400 steps 90.7%. 1,200 x 6 costs 0.75x the tokens of 2,400 x 3.
    ground_steps: int = 1200
    ground_batch: int = 32
    ground_lr: float = 1e-3
    ground_questions: int = 6
    ground_kinds: tuple = ("place",)
    # From the grounded decoder (2,400 x 3 grounding steps), 900 steps here gave an SFT model with CHAIR_s
    # 19.0%, recall 93.4%, POPE 81.3%; from 1,200 x 6, 300 steps: 26.5%, 83.6%, 81.2% (one build each).
    align_steps: int = 300
    align_batch: int = 32
    align_lr: float = 1e-3
    align_train_vision: bool = False
    # From the grounded model of 2,400 x 3 grounding steps and 900 of stage 1, 300 steps left the yes/no
    # answers behind (POPE 54.4%, yes-ratio 71.6%; CHAIR_s 21.5%, recall 92.8%); 600 steps: POPE 81.3%,
    # CHAIR_s 19.0%, recall 93.4%.
    sft_steps: int = 600
    sft_batch: int = 32
    sft_lr: float = 1e-3
    sft_train_vision: bool = False
    # On the chain before stage 0, from the SFT model (test split): 400 steps 91.2%, 800 steps 93.2%; 800 steps
    # at lr 2e-3 92.5%, at 5e-4 92.9%, with the vision tower trained too 93.4% (one run each, 1,344 s on one
    # core against about 930 s). Its weak spot is claim questions (colour, shape and place at once): 82% right
    # on 80 test images, against 94% for existence and attribute questions. From the grounded chain's SFT
    # models: 800 steps 97.4%, 500 steps 97.7% (another build: 95.5%); 400 steps, on a build with weaker CLIPs,
    # 91.7%.
    labeler_steps: int = 500
    labeler_batch: int = 32
    labeler_lr: float = 1e-3
    labeler_train_vision: bool = False
    # The labeler starts from the SFT model, whose yes/no answers already look at the image (a
    # decoder that has to learn that from the aligned model's start sat near chance for hundreds of
    # steps), and is then trained on clean yes/no questions only; "aligned" starts it from stage 1.
    labeler_start: str = "sft"
    labeler_questions: int = 6  # yes/no turns per labeler conversation
    # of which this many are claim questions, half true and half false by place only (a present object,
    # its colour right, at another place): the mixed questions make few of those (see labeler_accuracy)
    labeler_place_claims: int = 0
    sft_yes_no: int = 4  # yes/no turns per SFT conversation (beside one description)
    sft_choice: int = 1  # multiple-choice turns per SFT conversation
    sft_short_answers: int = 1  # short-answer turns per SFT conversation ("What colour is the star?" -> "red")
    # Share of SFT conversations that are questions only (no description), like the short-answer VQA
    # data of LLaVA-1.5's mixture: ``sft_qa_yes_no`` yes/no questions. With 0, the yes/no answers (one
    # token beside a ~30-token description in each conversation's mean loss) got too little of the
    # gradient: 300 steps from the stage-1 model (itself blind to questions, ``world_caption_records``)
    # gave P(yes) = 0.51 +- 0.005 to every existence question. From the same start,
    # 300 steps with 0.5 got existence questions 80% right (0.75: 81%; 0.5 with a multiple-choice and a
    # short-answer turn added to each question-only conversation: 57%), on 80 test images.
    sft_qa_share: float = 0.5
    sft_qa_yes_no: int = 6  # yes/no turns per question-only conversation
    align_yes_no: int = 4  # clean yes/no turns per stage-1 conversation (beside one caption)
    align_short_answers: int = 2  # short-answer turns per stage-1 conversation
    save_every: int = 50  # training checkpoints (a killed build resumes from the last one)
    # Intra-op CPU threads every stage trains with (one process, no GPU), whatever the machine has free.
    # The trained weights depend on it: the thread count sets how matrix products split their sums, and
    # the chain amplifies the last-bit differences. The same default config built on one thread (one core
    # pinned) gave an SFT model with CHAIR_s 39.5% and recall 63.3% (labeler 89.8%), against 25.5% / 79.8%
    # (93.2%) on two; two builds on two threads were bitwise equal. None: the free cores at each stage
    # (``set_cpu_threads``), as before -- fastest, but the models then depend on the machine's load.
    # Under torchrun each rank takes its even share of the cores (``threads_per_process``; the weights depend on the
    # number of ranks anyway).
    build_threads: int | None = 2
    # bfloat16 autocast in the LVLM stages' training (``TrainConfig.cpu_bf16``; weights and optimizer
    # state stay float32). One optimizer step, batch 32, as a share of the float32 step
    # (``recipes/bench_world_step.py``, 2 threads), stage 0 / SFT: on a 2-core AMD EPYC (Zen 5,
    # AVX512-BF16) 0.90x / 0.95x; on a 2-core Intel Xeon (Sapphire Rapids, AMX) 1.41x / 1.13x, slower,
    # because PyTorch's CPU flash-attention backward is slow in bfloat16 (T ~100-250, Dh 32: 101 ms
    # against 32 ms in float32 per layer at T 179). On a CPU without bfloat16 instructions it costs 2.80x /
    # 1.99x (Intel Xeon, Ice Lake; the build says so): there False builds in half the time (1,452 s
    # against 2,944 s), SFT POPE 70.0% against 77.9% (docs/WORLD_BUILDS.md); on an AMD EPYC (Zen 3,
    # AVX2 only) 9.4x / 13.0x. It stays on anyway: the float32 builds learn the yes/no answers worse.
    # Float32 builds of this chain: SFT POPE 70.0% (labeler 97.1%) on the Ice Lake machine; 60.3%
    # (labeler 88.8%, yes-ratio 78%) on the AMD EPYC (Zen 3), 1,176 s, and with 900 SFT steps from its
    # stage-1 model 64.1% (labeler 94.4%); against 76.6-81.2% (labeler 95.5-98.0%) in the five builds under
    # bfloat16 autocast (docs/WORLD_BUILDS.md).
    # ``lvlm_float32_attention`` computes the attention in float32 under the autocast
    # (``Attention.float32_attention``): 0.65x / 0.71x on the AMD EPYC (Zen 5), 0.78x / 0.85x on the Sapphire Rapids
    # Xeon, and the whole default build there took 1,224 s instead of 1,641 s. It is off because both builds
    # made with it missed a target on their yes/no answers: SFT POPE 61.3% (labeler 95.7%, CHAIR_s 33.0%)
    # on the Intel Xeon, 71.4% (labeler 95.5%) on the AMD EPYC (Zen 5), against 76.6-81.2% in the five builds
    # without it. The CLIPs train in float32: at their width (64) bfloat16 was slower (one core: 314
    # against 391 examples/s), and a build whose CLIPs trained in it (400 / 300 steps) gave SFT POPE
    # 59.8%, labeler 91.7%.
    lvlm_bf16: bool = True
    lvlm_float32_attention: bool = False
    # measurements
    eval_images: int = 200


WORLD_PRESETS = {
    "default": WorldModelsConfig(),
    # What ``auto`` picks on any CPU (``resolve_world_preset``): float32, with more SFT steps and more
    # question-only SFT conversations (the float32 builds learnt the yes/no answers worse; docs/WORLD_BUILDS.md).
    # From an empty cache, 2 cores, all five targets met: 1,262 s on an AMD EPYC (Zen 3; SFT CHAIR_s 32.0%, recall
    # 81.2%, POPE 71.7%, labeler 96.0%), 1,147 s on an Intel Xeon (Ice Lake), both with a labeler of 500 steps,
    # and 579-711 s on a Xeon with AMX, the same models on both Xeons (SFT CHAIR_s 22.5%, recall 74.3%, POPE 92.8%,
    # labeler 97.7%). Its reward CLIP sees one-object scenes a fifth of the time, so that it scores true sentences
    # about one object of several (CSR's recall held at its last iteration: docs/CSR.md); the other stages do not
    # read that field. Its labeler trains 300 steps (500 before, 2b78d1ce908d): 97.7% against 98.0% on the Xeons'
    # models, in 52 s against 90; only RLAIF-V reads it.
    "float32": WorldModelsConfig(lvlm_bf16=False, sft_steps=900, sft_qa_share=0.75,
                                 reward_clip_single_object_share=0.2, labeler_steps=300),
    # The whole chain in seconds (CI): tiny dims, a few steps. Its models are not meant to work.
    "micro": WorldModelsConfig(
        vision_hidden=16, vision_layers=2, vision_heads=1, clip_text_hidden=16, clip_text_layers=1, clip_text_heads=1,
        clip_projection_dim=16, lm_hidden=32, lm_layers=1, lm_heads=2, lm_kv_heads=1, lm_intermediate=64,
        train_scenes=64, micro_batch=8, clip_steps=4, reward_clip_steps=3, clip_batch=16, ground_steps=3,
        ground_batch=8, align_steps=3, align_batch=8, sft_steps=3, sft_batch=8,
        labeler_steps=3, labeler_batch=8, labeler_questions=3, save_every=0, eval_images=4, build_threads=1,
    ),
}


@dataclass(frozen=True)
class WorldModels:
    """Where the built models are: Hugging Face directories (each with tokenizer.json) and the tokenizer file."""

    clip: Path
    sft: Path
    labeler: Path
    tokenizer: Path
    aligned: Path  # the stage-1 model (captions only), the starting point of SFT and of the labeler
    root: Path
    reward_clip: Path  # CSR's R_I: the sign-calibrated CLIP (== clip when reward_clip_steps is 0)

    def report(self) -> dict:
        """The measured targets (``report.json``)."""
        return json.loads((self.root / "report.json").read_text())


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------


def fact_prompt_texts() -> list[str]:
    """The fixed texts of Fact-RLHF's reward prompt, read now from ``rewards.fact_prompt`` (its wording may
    change): its ``PROMPT_TEXTS`` and every other upper-case string constant of the module."""
    import importlib

    module = importlib.import_module("rewards.fact_prompt")  # the module, not the package's same-named function
    texts = [value for name, value in sorted(vars(module).items()) if name.isupper() and isinstance(value, str)]
    return texts + [t for t in getattr(module, "PROMPT_TEXTS", ()) if isinstance(t, str)]


def world_tokenizer_json(config: WorldModelsConfig) -> str:
    """The LVLMs' tokenizer.json text: the world's vocabulary plus Fact-RLHF's prompt words."""
    return make_world_tokenizer(config.world, extra_texts=fact_prompt_texts()).to_str(pretty=True)


def clip_tokenizer_json(config: WorldModelsConfig) -> str:
    """CLIP's tokenizer.json: the same vocabulary; encoding with special tokens gives "<s> words <pad>",
    cut to ``clip_max_text_tokens`` (the end token kept) and, for a batch, padded with "<pad>"."""
    from tokenizers import processors

    raw = make_world_tokenizer(config.world, extra_texts=fact_prompt_texts())
    raw.post_processor = processors.TemplateProcessing(single="<s> $A <pad>", pair="<s> $A <pad> $B <pad>",
                                                       special_tokens=[("<s>", BOS_ID), ("<pad>", CLIP_EOS_ID)])
    raw.enable_truncation(max_length=config.clip_max_text_tokens)
    raw.enable_padding(pad_id=CLIP_EOS_ID, pad_token="<pad>")
    return raw.to_str(pretty=True)


def encode_clip_texts(raw_tokenizer, texts) -> torch.Tensor:
    """Texts -> CLIP text ids ``[B, T]`` with a CLIP ``tokenizer.json`` loaded by ``tokenizers.Tokenizer``.

    The tokenizer's own post-processor adds the start and end tokens (the world CLIP's, and OpenAI's
    CLIP tokenizer.json alike); rows are right-padded to the longest with the tokenizer's pad id (or
    its last token, the end token, when it has no padding set). Pooling then follows the text config.
    """
    encodings = raw_tokenizer.encode_batch(list(texts))
    rows = [e.ids for e in encodings]
    if raw_tokenizer.padding:  # padded to the longest already (a batch of CLIP's ~900 texts: 3 ms, pad_batch 26 ms)
        return torch.tensor(rows, dtype=torch.long)
    return pad_batch(rows, rows[0][-1])[0]


# ---------------------------------------------------------------------------------------------
# model configs
# ---------------------------------------------------------------------------------------------


def vision_config(c: WorldModelsConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=c.vision_hidden, intermediate_size=4 * c.vision_hidden,
                            num_hidden_layers=c.vision_layers, num_attention_heads=c.vision_heads,
                            image_size=c.world.canvas_size, patch_size=c.patch_size,
                            projection_dim=c.clip_projection_dim)


def clip_config(c: WorldModelsConfig, vocab_size: int) -> CLIPConfig:
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=c.clip_text_hidden,
                          intermediate_size=4 * c.clip_text_hidden, num_hidden_layers=c.clip_text_layers,
                          num_attention_heads=c.clip_text_heads, max_position_embeddings=c.clip_max_text_tokens,
                          projection_dim=c.clip_projection_dim, pad_token_id=CLIP_EOS_ID, bos_token_id=BOS_ID,
                          eos_token_id=CLIP_EOS_ID)
    return CLIPConfig(text_config=text, vision_config=vision_config(c), projection_dim=c.clip_projection_dim)


def lvlm_config(c: WorldModelsConfig, vocab_size: int) -> LlavaConfig:
    """LLaVA-1.5's architecture at the world's size: image token "<image>" (id 4), pad "<pad>" (3)."""
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=c.lm_hidden, intermediate_size=c.lm_intermediate,
                       num_hidden_layers=c.lm_layers, num_attention_heads=c.lm_heads,
                       num_key_value_heads=c.lm_kv_heads, max_position_embeddings=c.lvlm_max_positions,
                       rms_norm_eps=1e-5, pad_token_id=PAD_ID)
    return LlavaConfig(vision_config=vision_config(c), text_config=text, image_token_index=IMAGE_ID,
                       pad_token_id=PAD_ID, vision_feature_layer=-2, vision_feature_select_strategy="default")


# ---------------------------------------------------------------------------------------------
# initial weights (as Hugging Face's ``_init_weights`` sets them for new models)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def init_clip_weights(model: CLIPModel, *, initializer_range: float = 0.02, factor: float = 1.0) -> None:
    """Hugging Face's ``CLIPPreTrainedModel._init_weights`` (the released code's behaviour).

    Embeddings N(0, 0.02); the class embedding N(0, D^-1/2); attention q/k/v N(0, D^-1/2 (2L)^-1/2),
    out N(0, D^-1/2); MLP fc1 N(0, (2D)^-1/2), fc2 N(0, D^-1/2 (2L)^-1/2); the projections N(0, D^-1/2);
    biases 0; layer norms (1, 0). D = the tower's width, L = its depth.
    """
    for tower in (model.text_model, model.vision_model):
        D, L = tower.config.hidden_size, tower.config.num_hidden_layers
        in_std, out_std, fc_std = D ** -0.5 * (2 * L) ** -0.5 * factor, D ** -0.5 * factor, (2 * D) ** -0.5 * factor
        for layer in tower.encoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for linear, std in ((attention.q_proj, in_std), (attention.k_proj, in_std), (attention.v_proj, in_std),
                                (attention.out_proj, out_std), (mlp.fc1, fc_std), (mlp.fc2, in_std)):
                linear.weight.normal_(0.0, std)
                linear.bias.zero_()
    text, vision = model.text_model.embeddings, model.vision_model.embeddings
    text.token_embedding.weight.normal_(0.0, initializer_range * factor)
    text.position_embedding.weight.normal_(0.0, initializer_range * factor)
    vision.class_embedding.normal_(0.0, model.vision_model.config.hidden_size ** -0.5 * factor)
    vision.patch_embedding.weight.normal_(0.0, initializer_range * factor)
    vision.position_embedding.weight.normal_(0.0, initializer_range * factor)
    model.visual_projection.weight.normal_(0.0, model.vision_model.config.hidden_size ** -0.5 * factor)
    model.text_projection.weight.normal_(0.0, model.text_model.config.hidden_size ** -0.5 * factor)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


@torch.no_grad()
def init_llava_weights(model: LlavaForConditionalGeneration, *, initializer_range: float = 0.02) -> None:
    """Hugging Face's Llama / LLaVA ``_init_weights`` for the projector and the language model: every
    Linear and Embedding N(0, 0.02), biases 0, RMSNorm weights 1 (the vision tower is CLIP's)."""
    for part in (model.multi_modal_projector, model.language_model):
        for module in part.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, initializer_range)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if hasattr(module, "eps") and hasattr(module, "weight") and not isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)  # RMSNorm


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def render_world_image(world: WorldConfig, seed: int):
    """The picture of scene ``seed`` (a PIL image)."""
    return sample_scene(int(seed), world).image()


class WorldPixels:
    """``seed -> preprocessed image [3, H, W]`` (float32), kept after the first call (as float16).

    Every stage of the build sees the same ``train_scenes`` images many times; preprocessing them
    once (``lvlm.image.preprocess_image`` at the canvas size) saves most of the data time. The stored
    float16 values differ from the float32 ones by less than 0.1%.
    """

    def __init__(self, world: WorldConfig):
        self.world, self.cache = world, {}

    def __call__(self, seed: int) -> torch.Tensor:
        seed = int(seed)
        if seed not in self.cache:
            image = render_world_image(self.world, seed)
            self.cache[seed] = preprocess_image(image, size=self.world.canvas_size).half()
        return self.cache[seed].float()


def _train_scene(c: WorldModelsConfig, k: int) -> tuple[int, int]:
    """Example k of a stage -> (scene seed, variant): the first ``train_scenes`` training scenes in order,
    then again with the next variant (other phrasings and questions)."""
    seeds = split_seeds("train", c.world)[: c.train_scenes]
    return seeds[k % len(seeds)], k // len(seeds)


def clip_texts(scene, variant: int, hard_negatives: int = 0, place_negatives: int = 0,
               colour_negatives: int = 0) -> tuple[str, list]:
    """A text about one object of the scene, and hard negative texts that differ from it in one detail.

    The text is a caption sentence (half the time: "The red circle is at the top left."), "a red
    circle", or "a red circle at the top left". Its negatives (NegCLIP's hard negatives, Yuksekgonul et
    al. 2023: random in-batch texts can mostly be told apart by colour alone, these cannot): up to
    ``hard_negatives`` with the object's shape replaced by shapes the image lacks ("a red square ..."),
    for texts that name a place, up to ``place_negatives`` with the place replaced by empty cells, and
    up to ``colour_negatives`` with the colour replaced by one no object of the image has. Every
    negative is false of the image. A shape is named by a synonym ("box") with probability 0.3, as in
    the world's captions.
    """
    rng = world_rng(scene.seed, "clip-text", variant)
    obj = rng.choice(scene.objects)
    absent = [shape for shape in scene.config.shapes if shape not in scene.shapes]
    empty = [cell for cell in range(len(PLACES)) if cell not in {o.cell for o in scene.objects}]
    rng.shuffle(absent)
    rng.shuffle(empty)
    form, template = rng.random(), rng.randrange(len(SENTENCE_TEMPLATES))
    use_synonym, synonym_pick, phrase_pick = rng.random() < 0.3, rng.randrange(2), rng.randrange(2)
    free_colours = [name for name in scene.config.colour_names if name not in {o.colour for o in scene.objects}]
    rng.shuffle(free_colours)

    def text_about(shape: str, cell: int, colour: str = obj.colour) -> str:
        synonyms = SHAPE_SYNONYMS[shape]
        word = synonyms[synonym_pick % len(synonyms)] if use_synonym and synonyms else shape
        place = PLACE_PHRASES[PLACES[cell]][phrase_pick]
        if form < 0.5:
            return fill_template(template, colour, word, place)[0]
        phrase = f"{article(colour)} {colour} {word}"
        return phrase if form < 0.75 else f"{phrase} {place}"

    negatives = [text_about(shape, obj.cell) for shape in absent[:hard_negatives]]
    if form < 0.5 or form >= 0.75:  # the text names a place
        negatives += [text_about(obj.shape, cell) for cell in empty[:place_negatives]]
    negatives += [text_about(obj.shape, obj.cell, colour) for colour in free_colours[:colour_negatives]]
    return text_about(obj.shape, obj.cell), negatives


def reward_clip_config(c: WorldModelsConfig) -> WorldModelsConfig:
    """The reward CLIP's settings: the first CLIP's, with the sign term, its colour negatives, its steps and
    its share of one-object scenes.

    Why a second CLIP: CSR's image relevance ``max(100 cos, 0)`` (paper Eq. 2) reads the cosine's
    level, and InfoNCE only orders texts -- the first CLIP gives a sentence about an absent object a
    clipped score of about 29 against 50 for a true one, so a summed reward pays for every extra
    sentence, made up or not. The sign term puts true texts above cos = 0 and false ones below. Its
    image tower is not the LVLMs' (LVLMs built on such a tower stayed blind, see ``clip_sign_weight``).
    """
    return dataclasses.replace(c, clip_steps=c.reward_clip_steps, clip_lr=c.reward_clip_lr,
                               clip_sign_weight=c.reward_clip_sign_weight,
                               clip_sign_positive_share=c.reward_clip_sign_positive_share,
                               clip_colour_negatives=c.reward_clip_colour_negatives,
                               clip_single_object_share=(c.clip_single_object_share
                                                         if c.reward_clip_single_object_share is None
                                                         else c.reward_clip_single_object_share))


def single_object_world(world: WorldConfig) -> WorldConfig:
    """The same world with exactly one object per scene."""
    return dataclasses.replace(world, min_objects=1, max_objects=1)


class ClipPairs:
    """CLIP's training examples, made on access: example k = (image of a training scene, ``clip_texts``).

    A share ``clip_single_object_share`` of the scenes (the same ones every epoch) come from the
    one-object version of the world: with one object the contrastive task is to tell its colour, shape
    and place, which teaches the image tower shapes several times faster than crowded scenes alone,
    where the colour often suffices; the other scenes teach it to keep several objects apart.

    An example holds its texts as strings; ``collate`` tokenizes and pads a whole batch's texts
    (``encode``). The scenes are kept after their first use (a stage sees each training scene about
    eight times), and so are the texts' token ids: a stage's ~430,000 texts are ~10,400 distinct ones.
    """

    def __init__(self, c: WorldModelsConfig, clip_raw_tokenizer, n: int, pixels: WorldPixels):
        self.c, self.tokenizer, self.n = c, clip_raw_tokenizer, n
        self.worlds = (c.world, single_object_world(c.world))
        self.pixels = (pixels, WorldPixels(self.worlds[1]))
        self.scenes: dict = {}  # seed -> (single-object world?, scene)
        self.text_ids: dict = {}  # text -> its token ids, unpadded

    def __len__(self) -> int:
        return self.n

    def scene(self, seed: int) -> tuple:
        """(whether the scene comes from the one-object world, the scene) for a training seed."""
        if seed not in self.scenes:
            single = world_rng(seed, "clip-single-object").random() < self.c.clip_single_object_share
            self.scenes[seed] = single, sample_scene(seed, self.worlds[single])
        return self.scenes[seed]

    def __getitem__(self, k: int) -> dict:
        seed, variant = _train_scene(self.c, k)
        single, scene = self.scene(seed)
        text, negatives = clip_texts(scene, variant, self.c.clip_hard_negatives, self.c.clip_place_negatives,
                                     self.c.clip_colour_negatives)
        return {"pixel_values": self.pixels[single](seed), "text": text, "negatives": negatives}

    def collate(self, examples: list) -> dict:
        """Images [B, 3, H, W]; texts [B + N, T]: the B paired texts first, then every example's hard negatives,
        right-padded with the end token (pooling takes its first occurrence), tokenized by ``encode``;
        ``negative_owner`` [N]: the example (image) each negative was made from."""
        texts = self.texts_of(examples)
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "input_ids": self.encode(texts),
                "negative_owner": torch.tensor([i for i, e in enumerate(examples) for _ in e["negatives"]],
                                               dtype=torch.long)}

    @staticmethod
    def texts_of(examples: list) -> list:
        """A batch's texts in ``collate``'s order: the paired texts, then every example's negatives."""
        return [e["text"] for e in examples] + [t for e in examples for t in e["negatives"]]

    def encode(self, texts: list) -> torch.Tensor:
        """``encode_clip_texts(self.tokenizer, texts)`` (the same ids ``[B, T]``), tokenizing only the texts
        not seen before: a CLIP step's ~900 texts in ~1 ms instead of ~20."""
        new = [text for text in dict.fromkeys(texts) if text not in self.text_ids]
        for text, encoding in zip(new, self.tokenizer.encode_batch(new) if new else []):
            self.text_ids[text] = [i for i, kept in zip(encoding.ids, encoding.attention_mask) if kept]
        rows = [self.text_ids[text] for text in texts]
        longest, pad = max(map(len, rows)), self.tokenizer.padding["pad_id"]
        return torch.tensor([row + [pad] * (longest - len(row)) for row in rows], dtype=torch.long)


def clip_loss(model, batch: dict, *, sign_weight: float = 0.0, sign_scale: float | None = None,
              sign_positive_share: float = 0.5, text_length_groups: int = 1) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Fig. 3) with hard negative texts (NegCLIP), plus an
    optional sign term.

    logits ``[B, B + N] = exp(logit_scale) * cos(image_i, text_j)`` for B images and their B paired texts
    followed by N hard negatives; image -> text: cross-entropy of each row towards its own text, the
    negatives being extra wrong columns; text -> image: cross-entropy of each paired text's column over
    the B images (a negative text has no image). The two are averaged. Each rank contrasts within its
    own micro-batch (no all-gather).

    Sign term (``sign_weight`` > 0; the pairwise sigmoid loss of SigLIP, Zhai et al. 2023, with its bias
    fixed at 0, on pairs whose truth is known): binary cross-entropy of ``sigmoid(sign_scale * cos)``
    towards 1 for each image with its own text and towards 0 for each image with its hard negatives
    (``batch["negative_owner"]``), the two means weighted ``sign_positive_share`` and 1 - that;
    ``sign_scale`` None uses the contrastive temperature ``exp(logit_scale)``. InfoNCE only orders
    texts; this makes the sign of the cosine say true or false, which is what CSR's clipped score
    ``max(100 cos, 0)`` reads: a sentence about an absent object then scores 0 instead of a smaller
    positive number. The hard negatives differ from the truth in one word and overlap it; weighting
    the positives more moves the boundary towards them, so that more true sentences keep a positive
    score and fewer false ones fall below 0 (the trade-off is measured at ``reward_clip_steps``).
    (A fixed scale of 100 from the first step collapsed the training: every cosine went negative.)

    ``text_length_groups``: the text tower runs its rows in that many groups of similar length
    (``CLIPTextTransformer.forward``): the same logits, less padding computed.

    Metrics: image -> text top-1 accuracy, the temperature, and (with negatives) the share of hard
    negatives with a negative cosine.
    """
    logits = model(batch["input_ids"], batch["pixel_values"], length_groups=text_length_groups)  # [B, B + N]
    B = logits.shape[0]
    target = torch.arange(B, device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :B].T, target))
    core = model.module if hasattr(model, "module") else model  # under DDP
    owner = batch.get("negative_owner")
    negative_logits = None
    if owner is not None and owner.numel():
        owner = owner.to(logits.device)
        negative_logits = logits[owner, B + torch.arange(owner.numel(), device=logits.device)]  # [N]
    if sign_weight > 0 and negative_logits is not None:
        rescale = 1.0
        if sign_scale is not None:  # logits = exp(logit_scale) * cos -> sign_scale * cos
            rescale = sign_scale / core.logit_scale.exp().detach()
        positive = F.binary_cross_entropy_with_logits(rescale * logits[target, target], torch.ones(B, device=logits.device))
        negative = F.binary_cross_entropy_with_logits(rescale * negative_logits, torch.zeros_like(negative_logits))
        loss = loss + sign_weight * (sign_positive_share * positive + (1 - sign_positive_share) * negative)
    with torch.no_grad():
        metrics = {"accuracy": (logits.argmax(-1) == target).float().mean(),
                   "logit_scale": core.logit_scale.exp()}
        if negative_logits is not None:
            metrics["negatives_below_0"] = (negative_logits < 0).float().mean()
    return loss, metrics


def _record(seed: int, variant: int, turns: list) -> dict:
    return {"turns": turns, "image": seed, "where": f"world scene {seed} variant {variant}"}


def _yes_no_record(scene, variant: int, question_variant: int, count: int) -> dict:
    """A conversation of ``count`` clean yes/no questions about ``scene`` and nothing else."""
    questions = yes_no_questions(scene, question_variant, count=count)
    return _record(scene.seed, variant, [(q.question, q.answer) for q in questions])


def world_reading_record(scene, variant: int, count: int) -> dict:
    """A text-only conversation about ``scene``, with no image: the first user turn gives one caption of it
    as Fact-RLHF's evaluation turn lists its facts (``rewards.facts_block``), and ``count`` yes/no
    questions follow, each to be answered from the caption."""
    caption = captions(scene, 3)[variant % 3]
    turns = [(q.question, q.answer) for q in yes_no_questions(scene, variant + 4000, count=count)]
    turns[0] = (facts_block([caption]) + turns[0][0], turns[0][1])
    return {"turns": turns, "image": None, "where": f"world scene {scene.seed} variant {variant}, text only"}


def world_reading_records(c: WorldModelsConfig, n: int, count: int = 4) -> list[dict]:
    """``n`` text-only reading conversations (``world_reading_record``, ``count`` questions each) on the
    training scenes, with the variants after the SFT data's (other phrasings and questions): the text
    Fact-RLHF's reward model learns to read from before it learns preferences (``recipes/llava_rlhf.py``)."""
    records = []
    for k in range(n):
        seed, variant = _train_scene(c, c.sft_steps * c.sft_batch + k)
        records.append(world_reading_record(sample_scene(seed, c.world), variant, count))
    return records


def world_grounding_records(c: WorldModelsConfig) -> list[dict]:
    """Stage 0: per example ``ground_questions`` short-answer questions about one image, each of a kind
    drawn from ``ground_kinds`` ("What colour is the star?" -> "red", "What shape is at the top left?" ->
    "circle", "Where is the red circle?" -> "top left"). Trained with the loss on every text token."""
    records = []
    for k in range(c.ground_steps * c.ground_batch):
        seed, variant = _train_scene(c, k)
        scene = sample_scene(seed, c.world)
        rng = world_rng(seed, "ground", variant)
        questions = [short_answer_question(scene, rng, kind=rng.choice(c.ground_kinds)) for _ in range(c.ground_questions)]
        records.append(_record(seed, variant, [(q.question, q.answer) for q in questions]))
    return records


def world_caption_records(c: WorldModelsConfig) -> list[dict]:
    """Stage 1: per example a clean caption (the answer to a description request) and, in the same
    conversation, ``align_yes_no`` clean yes/no and ``align_short_answers`` short-answer questions,
    the turns in a random order.

    LLaVA's stage 1 has captions only: its decoder is a pretrained Vicuna that already answers questions
    about text it reads. Ours starts from stage 0's decoder, which has learnt place questions only
    (before stage 0 existed it started from nothing; the figures below are from then), and a decoder
    that has only learnt to caption takes many hundred steps to start answering "Is there a star in the
    image?" above chance (a yes/no answer rewards looking up the named object only once the lookup
    works), so clean questions are here from the start, with short answers ("What colour is the star?"
    -> "red") whose answer *is* what the lookup finds. That is not enough on its own: beside the caption
    in each conversation's mean loss the one-token answers get little of the gradient, and after its 900
    steps this model still gives P(yes) ~0.5 to every yes/no question (existence 54%, attribute 54%,
    claim 63% right on 80 test images), though it captions well (SFT recall 84%). Making half of the
    examples conversations of 6 yes/no questions only did not change that (measured once: existence 50%,
    P(yes) 0.5 +- 0.002, and an SFT model from it as blind), so stage 1 stays as it is, and the
    question-only conversations are in SFT (``sft_qa_share``), where, from this model, the answers start
    to look at the image."""
    records = []
    for k in range(c.align_steps * c.align_batch):
        seed, variant = _train_scene(c, k)
        scene = sample_scene(seed, c.world)
        caption = captions(scene, variant + 1)[variant]
        turns = [(description_instruction(scene, variant), caption)]
        turns += [(q.question, q.answer) for q in yes_no_questions(scene, variant + 1000, count=c.align_yes_no)]
        rng = world_rng(seed, "align-short", variant)
        turns += [(q.question, q.answer) for q in (short_answer_question(scene, rng) for _ in range(c.align_short_answers))]
        world_rng(seed, "align-turn-order", variant).shuffle(turns)
        records.append(_record(seed, variant, turns))
    return records


def _sft_record(c: WorldModelsConfig, k: int, *, description: bool = True) -> dict:
    """SFT example k (``world_sft_records``); with ``description=False`` the same conversation without its
    description turn: the short answers alone (``world_replay_records``)."""
    seed, variant = _train_scene(c, k)
    scene = sample_scene(seed, c.world)
    if world_rng(seed, "sft-questions-only", variant).random() < c.sft_qa_share:
        return _yes_no_record(scene, variant, variant + 3000, c.sft_qa_yes_no)
    turns = [(description_instruction(scene, variant), describe(scene, variant).text)] if description else []
    turns += [(q.question, q.answer) for q in yes_no_questions(scene, variant, count=c.sft_yes_no)]
    rng = world_rng(seed, "sft-choice", variant)
    turns += [(q.question, q.answer) for q in (multiple_choice_question(scene, rng) for _ in range(c.sft_choice))]
    turns += [(q.question, q.answer) for q in (short_answer_question(scene, rng) for _ in range(c.sft_short_answers))]
    world_rng(seed, "sft-turn-order", variant).shuffle(turns)
    return _record(seed, variant, turns)


def world_sft_records(c: WorldModelsConfig) -> list[dict]:
    """Stage 2: per example one conversation about one image, its turns in a random order (so that each
    kind is sometimes the first turn, as in evaluation): a description carrying the prior's noise at
    ``world.noise_share`` (``lvlm.world.describe``), ``sft_yes_no`` yes/no questions (existence,
    attribute, claim), ``sft_choice`` multiple-choice and ``sft_short_answers`` short-answer questions;
    or, for a share ``sft_qa_share`` of the examples, ``sft_qa_yes_no`` yes/no questions only (see the
    field's comment for why)."""
    return [_sft_record(c, k) for k in range(c.sft_steps * c.sft_batch)]


def world_replay_records(c: WorldModelsConfig, n: int, start: int = 0) -> list[dict]:
    """SFT conversations ``start .. start + n - 1`` (wrapping around the SFT data) without their
    descriptions: the clean yes/no, multiple-choice and short-answer turns the SFT model was trained on,
    for the recipes' ``ptx_coef`` term (``recipes._ptx``). The noisy descriptions are left out: replaying
    them would teach the prior's hallucinations again."""
    total = c.sft_steps * c.sft_batch
    if n < 1 or start < 0:
        raise ValueError(f"world_replay_records: need n >= 1 and start >= 0, got n={n}, start={start}")
    return [_sft_record(c, (start + i) % total, description=False) for i in range(n)]


def world_labeler_records(c: WorldModelsConfig) -> list[dict]:
    """The labeler's data: conversations of ``labeler_questions`` clean yes/no questions about one image,
    ``labeler_place_claims`` of them claims true or false by place, in a random order."""
    if not 0 <= c.labeler_place_claims <= c.labeler_questions:
        raise ValueError(f"labeler_place_claims must lie in [0, labeler_questions = {c.labeler_questions}], "
                         f"got {c.labeler_place_claims}")
    records = []
    for k in range(c.labeler_steps * c.labeler_batch):
        seed, variant = _train_scene(c, k)
        scene = sample_scene(seed, c.world)
        mixed = c.labeler_questions - c.labeler_place_claims
        turns = [(q.question, q.answer) for q in yes_no_questions(scene, variant + 2000, count=mixed)]
        if c.labeler_place_claims:
            rng = world_rng(seed, "labeler-place-claims", variant)
            for _ in range(c.labeler_place_claims):
                truth = rng.random() < 0.5
                q = yes_no_question(scene, rng, kind="claim", truth=truth, false_by=None if truth else "place")
                turns.append((q.question, q.answer))
            rng.shuffle(turns)
        records.append(_record(seed, variant, turns))
    return records


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------


def absent_object_sentence(scene, rng) -> str:
    """A sentence about an object the image lacks, made like the prior's noise: an absent prior partner
    when there is one (else any absent shape), a colour no object has, an empty cell."""
    world = scene.config
    shape = rng.choice(hallucination_candidates(scene) or [s for s in world.shapes if s not in scene.shapes])
    colour = rng.choice([c for c in world.colour_names if c not in {o.colour for o in scene.objects}])
    cell = rng.choice([c for c in range(len(PLACES)) if c not in {o.cell for o in scene.objects}])
    return object_sentence(colour, shape, cell, rng)[0]


@torch.no_grad()
def clip_present_and_absent(clip: CLIPModel, clip_raw_tokenizer, world: WorldConfig, n_images: int) -> dict:
    """CLIP on one sentence about a present object and one about an absent object
    (``absent_object_sentence``) per test image: how often the present one has the higher cosine
    (``present_over_absent``: what CSR's image-relevance reward needs), and how often CSR's clipped score ``max(100 cos, 0)`` is positive for the
    present sentence (``present_scored``; ``present_scored_several``: on the images with several objects, where
    the sentence names one of them) and zero for the absent one (``absent_zeroed``)."""
    wins, present_positive, absent_zero, several = [], [], [], []
    device = next(clip.parameters()).device
    for batch in _chunks(list(scenes("test", world, limit=n_images)), 64):
        present, absent = [], []
        for scene in batch:
            rng = world_rng(scene.seed, "clip-eval")
            obj = rng.choice(scene.objects)
            present.append(object_sentence(obj.colour, obj.shape, obj.cell, rng)[0])
            absent.append(absent_object_sentence(scene, rng))
        pixels = torch.stack([preprocess_image(s.image(), size=world.canvas_size) for s in batch]).to(device)
        image = F.normalize(clip.encode_image(pixels), dim=-1)
        good = F.normalize(clip.encode_text(encode_clip_texts(clip_raw_tokenizer, present).to(device)), dim=-1)
        bad = F.normalize(clip.encode_text(encode_clip_texts(clip_raw_tokenizer, absent).to(device)), dim=-1)
        good_cos, bad_cos = (image * good).sum(-1), (image * bad).sum(-1)
        wins += (good_cos > bad_cos).tolist()
        present_positive += (good_cos > 0).tolist()
        several += [len(scene.objects) > 1 for scene in batch]
        absent_zero += (bad_cos <= 0).tolist()
    scored_several = [scored for scored, many in zip(present_positive, several) if many]
    return {"present_over_absent": sum(wins) / len(wins), "present_scored": sum(present_positive) / len(wins),
            "present_scored_several": sum(scored_several) / max(len(scored_several), 1),
            "absent_zeroed": sum(absent_zero) / len(wins)}


def _true_and_swapped(scene, swap: str) -> tuple[str, str]:
    """A true text about one object of ``scene`` and the same text with its shape (``swap="shape"``)
    swapped for one the image lacks, or its place (``"place"``) for an empty cell (``clip_texts``' first
    hard negative of that kind; for a place, the first variant whose text names one)."""
    for variant in range(1_000_000, 1_000_100):
        text, negatives = clip_texts(scene, variant, hard_negatives=int(swap == "shape"),
                                     place_negatives=int(swap == "place"))
        if negatives:
            return text, negatives[0]
    raise ValueError(f"no {swap}-swapped text for scene {scene.seed}")


@torch.no_grad()
def clip_swapped(clip: CLIPModel, clip_raw_tokenizer, world: WorldConfig, n_images: int, swap: str = "shape") -> dict:
    """The harder version: the competing text is the same text with one detail swapped (``_true_and_swapped``),
    so the rest does not help. How often the true text has the higher cosine (``present_over_swapped``), and
    how often CSR's clipped score is zero for the swapped one (``swapped_zeroed``). The world's SFT model makes
    up objects like the shape swaps: a shape the image lacks, in the colour of an object it has. A place swap
    names a present object at an empty cell; a CLIP that scores it above zero pays CSR for repeating a present
    object at other places, which costs recall (docs/WORLD_BUILDS.md, "CSR on the float32 preset's models")."""
    wins, zeroed = [], []
    device = next(clip.parameters()).device
    for batch in _chunks(list(scenes("test", world, limit=n_images)), 64):
        pairs = [_true_and_swapped(scene, swap) for scene in batch]
        pixels = torch.stack([preprocess_image(s.image(), size=world.canvas_size) for s in batch]).to(device)
        image = F.normalize(clip.encode_image(pixels), dim=-1)
        good = F.normalize(clip.encode_text(encode_clip_texts(clip_raw_tokenizer, [p[0] for p in pairs]).to(device)), dim=-1)
        bad = F.normalize(clip.encode_text(encode_clip_texts(clip_raw_tokenizer, [p[1] for p in pairs]).to(device)), dim=-1)
        good_cos, bad_cos = (image * good).sum(-1), (image * bad).sum(-1)
        wins += (good_cos > bad_cos).tolist()
        zeroed += (bad_cos <= 0).tolist()
    return {"present_over_swapped": sum(wins) / len(wins), "swapped_zeroed": sum(zeroed) / len(zeroed)}


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def first_token_logits(model, tokenizer: Tokenizer, questions: list, pixel_values: torch.Tensor,
                       batch_size: int = 64) -> torch.Tensor:
    """Next-token logits ``[N, V]`` right after ``{system} USER: <image>\\n{question} ASSISTANT:``, one
    image per question (``pixel_values`` [N, 3, H, W]); one right-padded forward per batch."""
    per_image = model.config.image_tokens_per_image
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(questions), batch_size):
        rows = [encode_prompt(tokenizer, q, image_tokens_per_image=per_image)["input_ids"]
                for q in questions[start:start + batch_size]]
        ids, lengths = pad_batch(rows, tokenizer.pad_id)
        logits = model(ids.to(device), pixel_values[start:start + batch_size].to(device))
        out.append(logits[torch.arange(len(rows)), lengths.to(device) - 1].float().cpu())
    return torch.cat(out)


def labeler_says_yes(model, tokenizer: Tokenizer, questions: list, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N] bool: the labeler's answer to each question about its image, read as RLAIF-V reads it: "yes"
    when P(yes) + P(Yes) > P(no) + P(No) for the first answer token (``rewards.labeler``)."""
    from rewards.labeler import claim_accepted, yes_no_probabilities

    yes_ids = [tokenizer.token_id("Yes"), tokenizer.token_id("yes")]
    no_ids = [tokenizer.token_id("No"), tokenizer.token_id("no")]
    logits = first_token_logits(model, tokenizer, questions, pixel_values)
    return claim_accepted(*yes_no_probabilities(logits, yes_ids, no_ids))


def labeler_accuracy(model, tokenizer: Tokenizer, world: WorldConfig, n_images: int) -> dict:
    """The labeler's yes/no accuracy on test images, read as RLAIF-V reads it: "yes" when
    P(yes) + P(Yes) > P(no) + P(No) for the first answer token (``rewards.labeler``).

    questions: ``yes_no_questions`` (existence / attribute / claim, with and without the suffix);
    claims: every sentence of a description that carries a made-up sentence when the image allows
    one, turned into a question by ``rewards.claims.claim_to_question`` plus " Please answer yes or
    no." (true sentences -> "Yes", the made-up one -> "No"): the labeler's job in RLAIF-V.
    """
    from rewards.claims import claim_to_question, labeler_prompt

    kinds = {"questions": ([], [], []), "claims": ([], [], [])}
    for scene in scenes("test", world, limit=n_images):
        pixels = preprocess_image(scene.image(), size=world.canvas_size)
        questions, truths, images = kinds["questions"]
        for q in yes_no_questions(scene, variant=7, count=4):
            questions.append(q.question), truths.append(q.answer == "Yes"), images.append(pixels)
        description = describe(scene, 7, noisy=describe(scene, 7, noisy=False).eligible)
        questions, truths, images = kinds["claims"]
        for sentence, shape in zip(description.sentences, description.shapes):
            questions.append(labeler_prompt(claim_to_question(sentence)))
            truths.append(shape in scene.shapes)
            images.append(pixels)
    result, all_hits = {}, []
    for name, (questions, truths, images) in kinds.items():
        said_yes = labeler_says_yes(model, tokenizer, questions, torch.stack(images))
        hits = (said_yes == torch.tensor(truths)).tolist()
        result[name] = sum(hits) / len(hits)
        all_hits += hits
    result["all"] = sum(all_hits) / len(all_hits)
    result["by_kind"] = labeler_accuracy_by_kind(model, tokenizer, world, n_images)
    return result


def question_error(scene, question) -> str:
    """What makes a world yes/no question false: "none" (it is true), "absent" (it names a shape the
    image lacks), "colour" (a present shape in a colour it does not have) or "place" (a present shape,
    its colour right, at a place where it is not)."""
    if question.answer == "Yes":
        return "none"
    if question.shape not in scene.shapes:
        return "absent"
    obj = next(o for o in scene.objects if o.shape == question.shape)  # a world scene holds each shape once
    return "colour" if question.colour is not None and question.colour != obj.colour else "place"


def labeler_accuracy_by_kind(model, tokenizer: Tokenizer, world: WorldConfig, n_images: int) -> dict:
    """The labeler's accuracy per question kind and per way of being false, on attribute and claim
    questions (``yes_no_question``): per test image one true and three false questions of each kind.
    Keys "attribute/none", "attribute/colour", "claim/place", ...: "claim/place" is how often it says
    "No" to a claim about a present object, its colour right and its place wrong."""
    questions, truths, keys, images = [], [], [], []
    for scene in scenes("test", world, limit=n_images):
        pixels = preprocess_image(scene.image(), size=world.canvas_size)
        rng = world_rng(scene.seed, "labeler-by-kind")
        for kind in ("attribute", "claim"):
            for truth in (True, False, False, False):
                q = yes_no_question(scene, rng, kind=kind, truth=truth)
                questions.append(q.question), truths.append(truth), images.append(pixels)
                keys.append(f"{kind}/{question_error(scene, q)}")
    said_yes = labeler_says_yes(model, tokenizer, questions, torch.stack(images)).tolist()
    hits: dict = {}
    for key, said, truth in zip(keys, said_yes, truths):
        hits.setdefault(key, []).append(said == truth)
    return {key: sum(h) / len(h) for key, h in sorted(hits.items())}


@torch.no_grad()
def answer_scores(model, tokenizer: Tokenizer, question: str, answers, pixels: torch.Tensor) -> torch.Tensor:
    """``[len(answers)]``: log P(answer + "</s>" | image, question) for each candidate answer, one
    right-padded forward over all of them (``pixels`` [3, H, W])."""
    per_image = model.config.image_tokens_per_image
    encoded = [encode_conversation(tokenizer, [(question, answer)], num_images=1, image_tokens_per_image=per_image)
               for answer in answers]
    ids, _ = pad_batch([e["input_ids"].tolist() for e in encoded], tokenizer.pad_id)
    mask, _ = pad_batch([e["assistant_mask"].tolist() for e in encoded], 0)
    logits = model(ids, pixels[None].expand(len(answers), -1, -1, -1))  # [A, T, V]
    return sequence_logprobs(logits[:, :-1], ids[:, 1:], mask[:, 1:].bool())


def short_answer_accuracy(model, tokenizer: Tokenizer, world: WorldConfig, n_images: int) -> dict:
    """How often the model's most likely short answer is right ("What colour is the triangle?" -> "red",
    "What shape is at the top left?", "Where is the red circle?"), per kind, on one-object and on
    several-object test images; the answer is the candidate (every colour, shape or place) with the
    highest ``answer_scores``.

    One object: the question can be answered without finding the object it names (there is one). Several:
    it has to be found. "several/no binding" is the rate of a model that answers with the value of a
    *random* object of the image -- what a decoder gets that knows which values the image holds but not
    which object has which: ``mean(1 / objects)`` over the several-object images.
    """
    candidates = {"colour": world.colour_names, "shape": world.shapes, "place": PLACES}
    hits: dict = {}
    for scene in scenes("test", world, limit=n_images):
        pixels = preprocess_image(scene.image(), size=world.canvas_size)
        rng = world_rng(scene.seed, "short-answer-accuracy")
        count = "one" if len(scene.objects) == 1 else "several"
        for kind, answers in candidates.items():
            q = short_answer_question(scene, rng, kind=kind)
            best = answers[int(answer_scores(model, tokenizer, q.question, answers, pixels).argmax())]
            hits.setdefault(f"{kind}/{count}", []).append(best == q.answer)
        if count == "several":
            hits.setdefault("several/no binding", []).append(1 / len(scene.objects))
    return {key: sum(h) / len(h) for key, h in sorted(hits.items())}


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------


# Fields added after FORMAT_VERSION 5, with the value that builds as before: left out of the key at that value,
# so that the models already cached keep their keys.
_KEY_NEUTRAL = {"clip_contrast_pairs": 0, "reward_clip_single_object_share": None}


def cache_key(config: WorldModelsConfig) -> str:
    """12 hex digits of SHA-256 over the config (as JSON; ``_KEY_NEUTRAL`` fields only when set), the tokenizer
    file and FORMAT_VERSION."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if _KEY_NEUTRAL.get(k, ...) != v}
    text = json.dumps({"config": fields, "format": FORMAT_VERSION,
                       "tokenizer": world_tokenizer_json(config)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lvlm_align")


STAGE_NAMES = ("clip", "reward_clip", "grounded", "aligned", "sft", "labeler")


def model_fingerprints(root: Path) -> dict:
    """``{stage: the first 12 hex digits of the SHA-256 of its model.safetensors}`` for each stage saved under
    ``root``. Two builds made the same models exactly when their fingerprints agree: the chain carries the
    last bits of every step to its end, so a change that keeps the math but not the rounding (the order of
    a sum) builds other models, which the recipes' measured figures do not describe (docs/WORLD_BUILDS.md)."""
    fingerprints = {}
    for name in STAGE_NAMES:
        weights = root / name / "model.safetensors"
        if weights.is_file():
            fingerprints[name] = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    return fingerprints


def _paths(root: Path) -> WorldModels:
    reward_clip = root / "reward_clip"
    return WorldModels(clip=root / "clip", sft=root / "sft", labeler=root / "labeler",
                       tokenizer=root / "tokenizer.json", aligned=root / "aligned", root=root,
                       reward_clip=reward_clip if reward_clip.is_dir() else root / "clip")


def _is_complete(root: Path) -> bool:
    return (root / "complete").is_file()


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive lock on ``path`` held by the main process (other ranks of the same job just follow)."""
    if not is_main_process():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_world_models(config: WorldModelsConfig | None = None, *, cache_dir: str | Path | None = None,
                        verbose: bool = True, threads: int | None = None) -> WorldModels:
    """The world's models for ``config`` (default preset): from the cache, or built now and cached.

    Under torchrun every rank calls this; the ranks train together, rank 0 writes. On a machine without
    a GPU a build trains with ``config.build_threads`` threads (``threads`` overrides it; None: the cores
    free before each stage, ``recipes._common.set_cpu_threads``), under torchrun with each rank's share of
    the cores (``threads_per_process``); the caller's setting is restored afterwards. Returns the paths.
    """
    config = config or WORLD_PRESETS["default"]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / f"world-{cache_key(config)}"
    if _is_complete(root):
        return _paths(root)
    setup_distributed()
    with _build_lock(cache_dir / f"world-{root.name[6:]}.lock"):
        barrier()
        if not _is_complete(root):
            partial = root.with_name(root.name + ".partial")
            build_world_models(config, partial, verbose=verbose, threads=threads)
            if is_main_process():
                shutil.rmtree(partial / "train", ignore_errors=True)
                (partial / "complete").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
                shutil.rmtree(root, ignore_errors=True)
                os.replace(partial, root)
            barrier()
    return _paths(root)


# ---------------------------------------------------------------------------------------------
# the build
# ---------------------------------------------------------------------------------------------


def _log(verbose: bool, *parts) -> None:
    if verbose and is_main_process():
        print(*parts, flush=True)


def _train_config(c: WorldModelsConfig, out_dir: Path, *, steps: int, batch: int, lr: float, verbose: bool,
                  micro_batch: int | None = None, bf16: bool = False, group_by_length: bool = False) -> TrainConfig:
    """The ``optim`` loop's settings for a world stage: ``batch`` examples a step in micro-batches of
    ``micro_batch`` (default ``c.micro_batch``), both lowered where the ranks cannot split them."""
    batch, micro = batch_for_ranks(batch, micro_batch or c.micro_batch, get_world_size())
    return TrainConfig(out_dir=str(out_dir), lr=lr, max_steps=steps, global_batch_size=batch, micro_batch_size=micro,
                       group_by_length=group_by_length, warmup_ratio=c.warmup_ratio,
                       weight_decay=0.0, cpu_bf16=bf16,
                       grad_clip=1.0, save_every=c.save_every, seed=c.seed,
                       log_every=15.0 if verbose else float("inf"))


def _done(directory: Path) -> bool:
    """A model directory that ``save_lvlm`` / ``save_clip`` finished (its weights file is renamed in last)."""
    return (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()


def _save(model, directory: Path, tokenizer_text: str, save) -> None:
    """Save a model and its tokenizer.json beside it (rank 0), then wait for it (all ranks)."""
    if is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "tokenizer.json.tmp"
        tmp.write_text(tokenizer_text)
        os.replace(tmp, directory / "tokenizer.json")
        save(model, directory)
    barrier()


def _lvlm_stage(c: WorldModelsConfig, name: str, start, records_fn, tokenizer: Tokenizer, root: Path, *,
                steps: int, batch: int, lr: float, train_vision: bool, verbose: bool, tokenizer_text: str,
                pixels: WorldPixels, loss_on: str = "assistant"):
    """Train one LVLM stage from ``start()`` (a function making the initial model) and save it; a stage
    already saved in ``root`` is loaded instead."""
    out = root / name
    if _done(out):
        _log(verbose, f"[{name}] found {out}")
        return load_lvlm(out, dtype=torch.float32)
    model = start()
    dataset = ConversationDataset(records_fn(c), tokenizer, image_size=c.world.canvas_size,
                                  image_tokens_per_image=model.config.image_tokens_per_image,
                                  load_pixels=pixels, max_length=c.lvlm_max_positions, loss_on=loss_on,
                                  keep_encoded=True)
    n = set_trainable(model, vision=train_vision, projector=True, language_model=True)
    _log(verbose, f"[{name}] {len(dataset)} conversations, {steps} steps x {batch}, {n:,} trainable parameters")
    with attention_in_float32(model, c.lvlm_float32_attention):  # only acts under the bfloat16 autocast
        train_sft(model, dataset, _train_config(c, root / "train" / name, steps=steps, batch=batch, lr=lr,
                                                verbose=verbose, bf16=c.lvlm_bf16, group_by_length=True),
                  share_prefix=True)
    model.requires_grad_(False)
    model.eval()
    _save(model, out, tokenizer_text, save_lvlm)
    return model


def build_world_models(config: WorldModelsConfig, root: str | Path, *, verbose: bool = True,
                       threads: int | None = None) -> WorldModels:
    """Run the chain of the module docstring into ``root`` (stages already saved there are skipped);
    writes ``report.json`` with the measured targets and the seconds each stage took. ``threads``: see
    ``ensure_world_models``."""
    check_config(config)
    caller_threads = torch.get_num_threads()
    try:
        return _build(config, Path(root), verbose, threads)
    finally:
        torch.set_num_threads(caller_threads)


def check_config(c: WorldModelsConfig) -> None:
    """Refuse step and batch counts that would fail at their stage, after the stages before it trained:
    every stage needs a step and an example, but grounding and the reward CLIP, which 0 steps skip."""
    counts = {"clip_steps": c.clip_steps, "align_steps": c.align_steps, "sft_steps": c.sft_steps,
              "labeler_steps": c.labeler_steps, "micro_batch": c.micro_batch, "clip_batch": c.clip_batch,
              "ground_batch": c.ground_batch, "align_batch": c.align_batch, "sft_batch": c.sft_batch,
              "labeler_batch": c.labeler_batch, "train_scenes": c.train_scenes}
    bad = [f"{name} {value}" for name, value in counts.items() if value < 1]
    bad += [f"{name} {value}" for name, value in (("ground_steps", c.ground_steps),
                                                  ("reward_clip_steps", c.reward_clip_steps)) if value < 0]
    if bad:
        raise ValueError(f"world models config: {', '.join(bad)}: steps, batches and scenes must be >= 1 "
                         "(ground_steps and reward_clip_steps may be 0: that stage is skipped)")


def bf16_is_slow() -> bool:
    """Whether bfloat16 autocast would slow the build down here: no GPU, and a CPU without bfloat16
    instructions (AVX512-BF16 or AMX), where it costs 2-14x a float32 step (docs/BENCHMARKS.md). False
    where PyTorch cannot tell (an older version): do not guess."""
    if torch.cuda.is_available():
        return False
    try:
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def world_preset(name: str) -> WorldModelsConfig:
    """The world preset called ``name``. ``"auto"``, the recipes' default: ``"float32"`` on a CPU, ``"default"``
    with a GPU (``resolve_world_preset``)."""
    name = resolve_world_preset(name)
    if name not in WORLD_PRESETS:
        raise ValueError(f"world preset {name!r}: known presets are auto, {', '.join(WORLD_PRESETS)}")
    return WORLD_PRESETS[name]


def resolve_world_preset(name: str) -> str:
    """``name``, with ``"auto"`` replaced by the preset it picks on this machine: ``"float32"`` without a GPU,
    ``"default"`` with one.

    Every CPU gets the float32 preset, those with bfloat16 instructions too. On a 2-core Xeon with AMX and
    AVX512-BF16 the default's bfloat16 build took 815 s and missed three targets (labeler 93.9%, SFT CHAIR_s
    19.0%, POPE 59.6%); the float32 preset took 614 s there, met all five, and made the same models as on
    an Ice Lake Xeon (docs/WORLD_BUILDS.md). No build of the default has been made on a GPU yet."""
    if name != "auto":
        return name
    return "default" if torch.cuda.is_available() else "float32"


def bf16_cost_note(config: WorldModelsConfig) -> str | None:
    """A warning when the LVLM stages would train under bfloat16 autocast where it is slow (``bf16_is_slow``);
    else None."""
    if not config.lvlm_bf16 or not bf16_is_slow():
        return None
    return ("note: this CPU has no bfloat16 instructions (AVX512-BF16 / AMX); the LVLM stages' bfloat16 "
            "autocast (lvlm_bf16) costs 2-14x a float32 step here. The float32 preset builds faster "
            "(--preset float32 here, --world_preset float32 or auto in the recipes), with other models.")


def _build(c: WorldModelsConfig, root: Path, verbose: bool, threads: int | None) -> WorldModels:
    from tokenizers import Tokenizer as RawTokenizer

    from recipes._common import set_cpu_threads, threads_per_process

    # Under torchrun each rank takes its share of the machine's cores, fixed (``threads_per_process``): a count
    # chosen from the cores free at each stage gave a rank two threads while the other, momentarily idle, had
    # one, and three threads on two cores made a CLIP step 20x slower.
    fixed = threads if threads is not None else (c.build_threads if get_world_size() == 1 else threads_per_process())
    note = bf16_cost_note(c)
    if note:
        _log(verbose, note)
    stages = {"clip": c.clip_steps, "reward_clip": c.reward_clip_steps, "grounded": c.ground_steps,
              "aligned": c.align_steps, "sft": c.sft_steps, "labeler": c.labeler_steps}
    to_train = [f"{name} ({steps} steps)" for name, steps in stages.items() if steps > 0 and not _done(root / name)]
    _log(verbose, f"stages to train, in order: {', '.join(to_train)}" if to_train else "every stage is saved already")

    def choose_threads():
        n = set_cpu_threads(fixed, verbose=False)
        if n:
            _log(verbose, f"(using {n} CPU thread(s))")

    seconds, started = {}, time.time()
    if is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / "config.json", json.loads(json.dumps(dataclasses.asdict(c), default=str)))
    barrier()

    # 1. tokenizers
    lvlm_tokenizer_text, clip_tokenizer_text = world_tokenizer_json(c), clip_tokenizer_json(c)
    if is_main_process():
        (root / "tokenizer.json").write_text(lvlm_tokenizer_text)
    barrier()
    tokenizer = Tokenizer.from_file(root / "tokenizer.json")
    clip_raw = RawTokenizer.from_str(clip_tokenizer_text)
    vocab_size = tokenizer.vocab_size
    pixels = WorldPixels(c.world)

    # 2. CLIP
    def clip_stage(cc: WorldModelsConfig, name: str, start: CLIPModel | None = None) -> CLIPModel:
        if _done(root / name):
            _log(verbose, f"[{name}] found {root / name}")
            return load_clip(root / name, dtype=torch.float32)
        torch.manual_seed(cc.seed)
        model = CLIPModel(clip_config(cc, vocab_size))
        if start is not None:
            model.load_state_dict(start.state_dict())
        elif cc.clip_hf_init:
            init_clip_weights(model)
        _log(verbose, f"[{name}] {cc.clip_steps} steps x {cc.clip_batch} (+ {cc.clip_hard_negatives} hard negatives "
                      f"each, sign term x {cc.clip_sign_weight}), {sum(p.numel() for p in model.parameters()):,} parameters")
        pairs = ClipPairs(cc, clip_raw, cc.clip_steps * cc.clip_batch, pixels)
        train(model, pairs,
              functools.partial(clip_loss, sign_weight=cc.clip_sign_weight, sign_scale=cc.clip_sign_scale,
                                sign_positive_share=cc.clip_sign_positive_share,
                                text_length_groups=cc.clip_text_length_groups),
              _train_config(cc, root / "train" / name, steps=cc.clip_steps, batch=cc.clip_batch, lr=cc.clip_lr,
                            verbose=verbose, micro_batch=cc.clip_contrast_pairs or cc.clip_batch),  # a rank's share
              collate_fn=pairs.collate)
        model.requires_grad_(False)
        model.eval()
        _save(model, root / name, clip_tokenizer_text, save_clip)
        return model

    choose_threads()
    t = time.time()
    clip = clip_stage(c, "clip")
    seconds["clip"] = time.time() - t
    reward_clip = clip
    if c.reward_clip_steps > 0:  # 2b. CSR's reward CLIP
        choose_threads()
        t = time.time()
        reward_clip = clip_stage(reward_clip_config(c), "reward_clip", clip if c.reward_clip_from_clip else None)
        seconds["reward_clip"] = time.time() - t

    # 3. the aligned model: CLIP's image tower + new projector + new decoder, on clean captions
    def fresh_lvlm():
        torch.manual_seed(c.seed + 1)
        model = LlavaForConditionalGeneration(lvlm_config(c, vocab_size))
        init_llava_weights(model)
        model.vision_tower.vision_model.load_state_dict(clip.vision_model.state_dict())
        return model

    def copy_of(trained):
        state = {k: v.clone() for k, v in trained.state_dict().items()}

        def start():
            model = LlavaForConditionalGeneration(trained.config)
            model.load_state_dict(state)
            return model
        return start

    # 3a. grounding (stage 0), from the fresh model; 3b. stage 1, from it
    align_start = fresh_lvlm
    if c.ground_steps > 0:
        choose_threads()
        t = time.time()
        grounded = _lvlm_stage(c, "grounded", fresh_lvlm, world_grounding_records, tokenizer, root,
                               steps=c.ground_steps, batch=c.ground_batch, lr=c.ground_lr, train_vision=False,
                               verbose=verbose, tokenizer_text=lvlm_tokenizer_text, pixels=pixels, loss_on="text")
        seconds["grounded"] = time.time() - t
        align_start = copy_of(grounded)
    choose_threads()
    t = time.time()
    aligned = _lvlm_stage(c, "aligned", align_start, world_caption_records, tokenizer, root, steps=c.align_steps,
                          batch=c.align_batch, lr=c.align_lr, train_vision=c.align_train_vision, verbose=verbose,
                          tokenizer_text=lvlm_tokenizer_text, pixels=pixels)
    seconds["aligned"] = time.time() - t

    # 4. SFT, from the aligned model; 5. the labeler, from the SFT model (or the aligned one)
    choose_threads()
    t = time.time()
    sft = _lvlm_stage(c, "sft", copy_of(aligned), world_sft_records, tokenizer, root, steps=c.sft_steps,
                      batch=c.sft_batch, lr=c.sft_lr, train_vision=c.sft_train_vision, verbose=verbose,
                      tokenizer_text=lvlm_tokenizer_text, pixels=pixels)
    seconds["sft"] = time.time() - t
    choose_threads()
    t = time.time()
    labeler_start = {"sft": sft, "aligned": aligned}[c.labeler_start]
    labeler = _lvlm_stage(c, "labeler", copy_of(labeler_start), world_labeler_records, tokenizer, root,
                          steps=c.labeler_steps, batch=c.labeler_batch, lr=c.labeler_lr,
                          train_vision=c.labeler_train_vision, verbose=verbose, tokenizer_text=lvlm_tokenizer_text,
                          pixels=pixels)
    seconds["labeler"] = time.time() - t

    # 6. measurements
    if is_main_process() and not (root / "report.json").is_file():
        t = time.time()
        report = measure_targets(c, clip, clip_raw, sft, labeler, tokenizer, verbose=verbose, reward_clip=reward_clip)
        seconds["measure"] = time.time() - t
        seconds["total"] = time.time() - started
        report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
        report["fingerprints"] = model_fingerprints(root)
        report["threads"] = torch.get_num_threads() if not torch.cuda.is_available() else None
        report["ranks"] = get_world_size()
        write_json_atomic(root / "report.json", report)
    barrier()
    return _paths(root)


def measure_targets(c: WorldModelsConfig, clip, clip_raw, sft, labeler, tokenizer: Tokenizer, *,
                    verbose: bool = True, reward_clip=None) -> dict:
    """CLIP present-over-absent rate, labeler accuracy and the SFT model's evaluation, on test images; the
    clipped-score rates of CSR's reward CLIP (``reward_clip``, default ``clip``)."""
    from recipes.evaluate import evaluate, world_eval_set

    n = c.eval_images
    first = clip_present_and_absent(clip, clip_raw, c.world, n)
    first_swapped = clip_swapped(clip, clip_raw, c.world, n)
    reward_clip = clip if reward_clip is None else reward_clip
    if reward_clip is clip:
        reward, reward_swapped = first, first_swapped
    else:
        reward = clip_present_and_absent(reward_clip, clip_raw, c.world, n)
        reward_swapped = clip_swapped(reward_clip, clip_raw, c.world, n)
    reward_place = clip_swapped(reward_clip, clip_raw, c.world, n, swap="place")
    report = {"clip_present_over_absent": first["present_over_absent"],
              "reward_clip_present_over_absent": reward["present_over_absent"],
              "reward_clip_present_scored": reward["present_scored"],
              "reward_clip_present_scored_several": reward["present_scored_several"],
              "reward_clip_absent_zeroed": reward["absent_zeroed"],
              "clip_present_over_swapped_shape": first_swapped["present_over_swapped"],
              "reward_clip_swapped_shape_zeroed": reward_swapped["swapped_zeroed"],
              "reward_clip_present_over_swapped_place": reward_place["present_over_swapped"],
              "reward_clip_swapped_place_zeroed": reward_place["swapped_zeroed"],
              "labeler_accuracy": labeler_accuracy(labeler, tokenizer, c.world, n)}
    report["sft"] = evaluate(sft, tokenizer, world_eval_set(c.world, n_images=n), verbose=False)
    report["sft_short_answers"] = short_answer_accuracy(sft, tokenizer, c.world, n)
    return report


# Targets (DESIGN: the world's SFT model must hallucinate through the prior, measurably, and see).
TARGETS = (
    ("CLIP: present object ranked above absent", lambda r: r["clip_present_over_absent"], ">=", 0.90),
    ("labeler yes/no accuracy", lambda r: r["labeler_accuracy"]["all"], ">=", 0.95),
    ("SFT CHAIR_s", lambda r: r["sft"]["chair_s"], "in", (0.20, 0.60)),
    ("SFT recall", lambda r: r["sft"]["recall"], ">=", 0.70),
    ("SFT POPE accuracy", lambda r: r["sft"]["pope_acc"], ">=", 0.70),
)


def print_report(report: dict, file=None) -> None:
    """The targets with their measured values, then the SFT model's full metrics and the build times."""
    file = file or sys.stdout
    print("target                                      measured   wanted     ", file=file)
    for name, read, op, wanted in TARGETS:
        value = read(report)
        ok = wanted[0] <= value <= wanted[1] if op == "in" else value >= wanted
        want = f"{100 * wanted[0]:.0f}-{100 * wanted[1]:.0f}%" if op == "in" else f">= {100 * wanted:.0f}%"
        print(f"{name:<44}{100 * value:6.1f}%   {want:<10} {'ok' if ok else 'MISSED'}", file=file)
    if "reward_clip_absent_zeroed" in report:
        several = report.get("reward_clip_present_scored_several")  # not in reports of earlier builds
        several_note = "" if several is None else f" (images with several objects: {100 * several:.1f}%)"
        print(f"reward CLIP's score max(100 cos, 0): positive for the present sentence "
              f"{100 * report['reward_clip_present_scored']:.1f}%{several_note}, zero for the absent one "
              f"{100 * report['reward_clip_absent_zeroed']:.1f}% (present above absent "
              f"{100 * report['reward_clip_present_over_absent']:.1f}%)", file=file)
    if "reward_clip_swapped_shape_zeroed" in report:
        print(f"reward CLIP's score, zero for the true sentence with its shape swapped for an absent one: "
              f"{100 * report['reward_clip_swapped_shape_zeroed']:.1f}%", file=file)
    if "reward_clip_swapped_place_zeroed" in report:
        print(f"reward CLIP, the true sentence with its place swapped for an empty cell: ranked below the true one "
              f"{100 * report['reward_clip_present_over_swapped_place']:.1f}%, zeroed "
              f"{100 * report['reward_clip_swapped_place_zeroed']:.1f}%", file=file)
    if "clip_present_over_swapped_shape" in report:
        print(f"CLIP, the competing text differing only in shape: {100 * report['clip_present_over_swapped_shape']:.1f}%",
              file=file)
    accuracy = report["labeler_accuracy"]
    print("labeler accuracy by question set: " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in accuracy.items() if k != "by_kind"), file=file)
    if "by_kind" in accuracy:
        print("labeler accuracy by kind / what is false: " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in accuracy["by_kind"].items()), file=file)
    print("SFT model: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in report["sft"].items()), file=file)
    if "sft_short_answers" in report:
        print("SFT model's short answers, by kind / objects in the image: " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in report["sft_short_answers"].items()), file=file)
    if "seconds" in report:
        print("build seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()), file=file)
    if "fingerprints" in report:
        print("model fingerprints (model_fingerprints): " + ", ".join(
            f"{k} {v}" for k, v in report["fingerprints"].items()), file=file)
    file.flush()


def main(argv=None) -> WorldModels:
    from recipes._common import add_config_arguments, config_from_args, print_config, set_cpu_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="auto", choices=["auto", *sorted(WORLD_PRESETS)],
                        help="auto: float32 on a CPU, default with a GPU")
    parser.add_argument("--cache_dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/lvlm_align")
    parser.add_argument("--rebuild", action="store_true", help="delete this config's cached models first")
    add_config_arguments(parser, WORLD_PRESETS["default"])
    args = parser.parse_args(argv)
    preset = resolve_world_preset(args.preset)
    config = config_from_args(args, world_preset(preset))
    set_cpu_threads()
    print_config(config, f"world models ({preset})")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    root = cache_dir / f"world-{cache_key(config)}"
    if args.rebuild and is_main_process():
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root.with_name(root.name + ".partial"), ignore_errors=True)
    started = time.time()
    models = ensure_world_models(config, cache_dir=cache_dir)
    if is_main_process():
        print(f"world models in {models.root} ({time.time() - started:.0f} s)")
        print_report({**models.report(), "fingerprints": model_fingerprints(models.root)})  # the files' own
    return models


if __name__ == "__main__":
    main()
