"""The "ptx" term: the SFT data's likelihood mixed into a preference update, so that what the
preference data never shows (here: short yes/no and multiple-choice answers) is not lost.

InstructGPT (Ouyang et al. 2022, arXiv 2203.02155, Eq. 2) calls its PPO with this term "PPO-ptx":

    objective(phi) = E_{(x, y) ~ pi_phi} [ r(x, y) - beta log(pi_phi(y | x) / pi_SFT(y | x)) ]
                     + gamma E_{x ~ D_pretrain} [ log pi_phi(x) ]

and uses it against the "alignment tax", the regressions on public benchmarks that RLHF alone causes.
Here the mixed-in data is the SFT model's own instruction data, scored as SFT scores it (the answers'
mean token log-likelihood, ``recipes.sft.sft_loss``), and the same term goes into DPO as into PPO:

    loss = preference loss + ptx_coef * NLL(a replay batch)

None of the three papers has it (ANCHORS §1-3), so ``ptx_coef`` is 0 in their presets. On the world the
recipes' preference data are descriptions only, and without it each of them lowered POPE (yes/no) F1,
by 0.3 (CSR) to 7.3 points (RLAIF-V), on every negative sampling alike, with a lower yes-ratio: the
description update leaks into the yes/no answers it never sees. docs/RESULTS.md has what the term
changes.

Which replay examples an update sees depends only on where it is (a DPO pair's index, a PPO step and
rank; ``replay_indices``), so a resumed run, or one over N processes, reads the same replay data as an
uninterrupted one-process run.

DPO (``recipes._dpo``): every pair brings its replay conversation into the batch (``collate_pairs``), one
forward scores chosen, rejected and replay rows together. PPO (``recipes._ppo.ppo_update``): one replay
batch per optimizer step, its loss added to the minibatch's before the step.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from recipes.sft import ConversationDataset, collate_sft, load_image_file, load_llava_conversations, sft_loss


def iteration_records(records: Sequence[dict], n: int, iteration: int) -> list[dict]:
    """Iteration t's ``n`` replay conversations: ``records[(t - 1) n : t n]``, wrapping around, so that
    successive iterations replay different data while there is some."""
    if not records or n < 1 or iteration < 1:
        raise ValueError(f"iteration_records: need records, n >= 1 and iteration >= 1 (n={n}, iteration={iteration})")
    return [records[((iteration - 1) * n + i) % len(records)] for i in range(n)]


def replay_source(n: int, *, world=None, ptx_data: str | None = None,
                  images: str | None = None) -> Callable[[int], list[dict]]:
    """Iteration t -> its ``n`` replay conversations: on the world (``world``, a ``WorldModelsConfig``) its
    SFT conversations without their descriptions (``world_replay_records``), else those of ``ptx_data``
    (LLaVA's conversation JSON, images under ``images``, every record checked now); the t-th window of
    ``n`` in both cases, wrapping around."""
    if world is not None:
        from recipes.world_models import world_replay_records

        return lambda t: world_replay_records(world, n, start=(t - 1) * n)
    return functools.partial(iteration_records, load_llava_conversations(ptx_data, images), n)


def replay_dataset(records: Sequence[dict], tokenizer, model, load_image=None) -> ConversationDataset:
    """Conversation records (``recipes.sft`` format) -> the replay dataset for ``model``'s image size; every
    record is checked now, before any training (a malformed one fails here, named)."""
    return ConversationDataset(records, tokenizer, image_size=model.config.vision_config.image_size,
                               image_tokens_per_image=model.config.image_tokens_per_image,
                               load_image=load_image or load_image_file)


def replay_indices(position: int, rows: int, dataset_size: int) -> list[int]:
    """``rows`` consecutive replay-example indices for update ``position`` (from ``position * rows`` on,
    wrapping around the dataset)."""
    if dataset_size < 1 or rows < 1 or position < 0:
        raise ValueError(f"replay_indices: need position >= 0, rows >= 1 and a non-empty dataset, got "
                         f"position={position}, rows={rows}, dataset_size={dataset_size}")
    return [(position * rows + i) % dataset_size for i in range(rows)]


def replay_batch(dataset: ConversationDataset, indices: Sequence[int], *, pad_id: int) -> dict:
    """The examples at ``indices`` as one ``sft_loss`` batch (``collate_sft``)."""
    return collate_sft([dataset[i] for i in indices], pad_id=pad_id)


def ptx_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """The replay batch's NLL: the mean over rows of each row's mean answer-token NLL (``sft_loss``).
    Returns (loss, {"ptx_nll", "ptx_token_accuracy"})."""
    loss, metrics = sft_loss(model, batch)
    return loss, {"ptx_nll": loss.detach(), "ptx_token_accuracy": metrics["token_accuracy"]}
