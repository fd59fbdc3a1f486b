"""DPO on preference pairs, as CSR and RLAIF-V both use it (Rafailov et al. 2023, Eq. 7).

A pair record is ``{"question", "chosen", "rejected", "image": reference or None, ...}``; with
``"ref_chosen_logp"`` / ``"ref_rejected_logp"`` (summed log-probs of the responses under the
reference model, stored once with the data as RLAIF-V does) the reference never runs during training.

    pairs = PreferencePairs(records, tokenizer, load_image=..., image_size=..., image_tokens_per_image=...)
    add_reference_logps(reference_model, pairs)         # once, before training
    train_dpo(model, pairs, TrainConfig(...), beta=0.1, lora=LoraSettings(r=128, alpha=256, dropout=0.05))

The policy's log-prob of a response is the sum of its tokens' log-probs (its answer and "</s>"),
prompt and image masked out (ANCHORS §4): ``optim.sequence_logprobs`` on the shifted sequence.

With ``replay`` (a ``recipes.sft.ConversationDataset`` of the SFT data) and ``ptx_coef`` > 0, pair i also
brings replay conversation ``i mod len(replay)`` into its batch, and the loss gains InstructGPT's ptx
term, ``ptx_coef`` x that conversation's answer NLL (``recipes._ptx``; in none of the DPO papers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lvlm.image import preprocess_image
from lvlm.tokenizer import Tokenizer, encode_conversation, pad_batch
from optim import apply_lora, dpo_with_sft_loss, merge_lora, preference_metrics, sequence_logprobs
from optim.train import TrainConfig, train


def check_batch_splits(global_batch: int, micro: int, world: int) -> None:
    """Refuse a global batch that ``world`` ranks cannot cut into micro-batches of ``micro``, naming a
    flag value that would work (run before any collection, so the mistake costs seconds, not hours)."""
    if global_batch % (micro * world) == 0:
        return
    fits = [m for m in range(micro, 0, -1) if global_batch % (m * world) == 0]
    hint = (f"--micro_batch_size {fits[0]}" if fits else
            f"--global_batch_size {max(1, global_batch // (micro * world)) * micro * world}")
    raise ValueError(f"--global_batch_size {global_batch} is not a multiple of --micro_batch_size {micro} x "
                     f"{world} rank(s); e.g. {hint}")


def check_dpo_settings(*, beta: float, lr: float, lora_r: int | None) -> None:
    """DPO settings that would fail at the first training step, refused before any collection (``lora_r``
    None: no LoRA)."""
    problems = [f"--beta must be > 0, got {beta}"] if beta <= 0 else []
    problems += [f"--lr must be > 0, got {lr}"] if lr <= 0 else []
    problems += [f"--lora_r must be >= 1, got {lora_r}"] if lora_r is not None and lora_r < 1 else []
    if problems:
        raise ValueError("; ".join(problems))


class PreferencePairs:
    """Pair records -> examples: the chosen and the rejected conversation, each encoded with its
    assistant mask, and the image (``[1, 3, H, W]``, or None for a text-only pair); with ``replay``, an
    example also carries its replay conversation (``"replay"``: a ``ConversationDataset`` example).

    Every record is encoded once when the dataset is built, so a bad record fails before training.
    """

    def __init__(self, records: Sequence[dict], tokenizer: Tokenizer, *, load_image: Callable,
                 image_size: int, image_tokens_per_image: int, max_length: int | None = None, replay=None):
        self.replay = replay
        self.records = list(records)
        self.tokenizer, self.load_image = tokenizer, load_image
        self.image_size, self.image_tokens_per_image, self.max_length = image_size, image_tokens_per_image, max_length
        if not self.records:
            raise ValueError("PreferencePairs: no pairs (did data collection produce any?)")
        for record in self.records:
            self._encode(record, "chosen")
            self._encode(record, "rejected")

    def __len__(self) -> int:
        return len(self.records)

    def _encode(self, record: dict, side: str) -> dict:
        where = f"pair {record.get('key', '?')}"
        try:
            encoded = encode_conversation(self.tokenizer, [(record["question"], record[side])],
                                          num_images=int(record.get("image") is not None),
                                          image_tokens_per_image=self.image_tokens_per_image,
                                          max_length=self.max_length)
        except (KeyError, ValueError) as error:
            raise ValueError(f"{where} ({side}): {error}") from None
        return encoded

    def __getitem__(self, index: int) -> dict:
        example = self.pair(index)
        if self.replay is not None:
            example["replay"] = self.replay[index % len(self.replay)]
        return example

    def pair(self, index: int) -> dict:
        """Example ``index`` without its replay conversation."""
        record = self.records[index]
        chosen, rejected = self._encode(record, "chosen"), self._encode(record, "rejected")
        pixels = None
        if record.get("image") is not None:
            pixels = preprocess_image(self.load_image(record["image"]), size=self.image_size)[None]
        return {
            "chosen_ids": chosen["input_ids"], "chosen_mask": chosen["assistant_mask"],
            "rejected_ids": rejected["input_ids"], "rejected_mask": rejected["assistant_mask"],
            "pixel_values": pixels,
            "ref_chosen": record.get("ref_chosen_logp"), "ref_rejected": record.get("ref_rejected_logp"),
        }


def collate_pairs(examples: Sequence[dict], *, pad_id: int) -> dict:
    """B pairs -> one batch of 2B rows: the chosen responses first, then the rejected ones; when every
    example carries a replay conversation, B more rows after them (``replay_rows`` = B).

    input_ids / assistant_mask [2B (+ B), T]; pixel_values: the images in row order (each pair's image
    twice, then the replay rows' images); ref_chosen / ref_rejected [B] float32 when every example has them.
    """
    rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    masks = [e["chosen_mask"] for e in examples] + [e["rejected_mask"] for e in examples]
    images = [e["pixel_values"] for e in examples if e["pixel_values"] is not None]
    images = images + images
    replay = [e["replay"] for e in examples if "replay" in e]
    if replay and len(replay) != len(examples):
        raise ValueError("collate_pairs: some examples carry a replay conversation and some do not")
    rows += [r["input_ids"] for r in replay]
    masks += [r["assistant_mask"] for r in replay]
    images += [r["pixel_values"] for r in replay if r["pixel_values"] is not None]
    batch = {
        "input_ids": pad_batch(rows, pad_id)[0],
        "assistant_mask": pad_batch(masks, False)[0],
        "pixel_values": torch.cat(images) if images else None,
        "replay_rows": len(replay),
    }
    if all(e["ref_chosen"] is not None and e["ref_rejected"] is not None for e in examples):
        batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in examples], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in examples], dtype=torch.float32)
    return batch


def response_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs ``[rows]`` of the assistant tokens of every row, and their token counts ``[rows]``.

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, so the sequence is shifted by one.
    """
    ids, mask = batch["input_ids"], batch["assistant_mask"]
    logits = model(ids, batch["pixel_values"])  # [2B, T, V]
    logps = sequence_logprobs(logits[:, :-1], ids[:, 1:], mask[:, 1:])
    return logps, mask[:, 1:].sum(-1)


@torch.no_grad()
def add_reference_logps(reference, pairs: PreferencePairs, *, batch_size: int = 8, device=None) -> None:
    """Compute the reference model's summed log-probs of every chosen and rejected response once and
    store them in the records (``ref_chosen_logp``, ``ref_rejected_logp``), as RLAIF-V caches them."""
    device = device or next(reference.parameters()).device
    was_training = reference.training
    reference.eval()
    pad = pairs.tokenizer.pad_id
    for start in range(0, len(pairs), batch_size):
        indices = range(start, min(start + batch_size, len(pairs)))
        batch = collate_pairs([pairs.pair(i) for i in indices], pad_id=pad)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logps, _ = response_logps(reference, batch)
        chosen, rejected = logps.float().cpu().chunk(2)
        for i, c, r in zip(indices, chosen.tolist(), rejected.tolist()):
            pairs.records[i]["ref_chosen_logp"], pairs.records[i]["ref_rejected_logp"] = c, r
    reference.train(was_training)


def dpo_loss_fn(*, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                w_sft: float = 0.0, ptx_coef: float = 0.0) -> Callable:
    """The ``loss_fn`` for ``optim.train``: DPO (plus RLAIF-V's optional SFT term) on a pair batch, plus
    ``ptx_coef`` x the replay rows' NLL (the mean over rows of each row's mean answer-token NLL, as
    ``recipes.sft.sft_loss``) when ``ptx_coef`` > 0."""

    def loss_fn(model, batch: dict):
        if "ref_chosen" not in batch:
            raise ValueError("DPO batch without reference log-probs: call add_reference_logps first")
        n_replay = batch.get("replay_rows", 0)
        if (ptx_coef > 0) != (n_replay > 0):
            raise ValueError(f"DPO batch with {n_replay} replay rows and ptx_coef={ptx_coef}: give PreferencePairs "
                             "a replay dataset exactly when ptx_coef > 0")
        logps, counts = response_logps(model, batch)
        n_pairs = (len(logps) - n_replay) // 2
        chosen, rejected = logps[:n_pairs], logps[n_pairs:2 * n_pairs]
        chosen_avg = chosen / counts[:n_pairs].clamp(min=1)
        loss, chosen_rewards, rejected_rewards = dpo_with_sft_loss(
            chosen, rejected, batch["ref_chosen"].to(chosen), batch["ref_rejected"].to(chosen),
            policy_chosen_avg_logps=chosen_avg, w_sft=w_sft, beta=beta, label_smoothing=label_smoothing,
            loss_type=loss_type)
        metrics = preference_metrics(chosen_rewards, rejected_rewards)
        metrics["tokens"] = batch["assistant_mask"][:2 * n_pairs].sum().float()
        if n_replay:
            ptx_nll = -(logps[2 * n_pairs:] / counts[2 * n_pairs:].clamp(min=1)).mean()
            loss = loss + ptx_coef * ptx_nll
            metrics["ptx_nll"] = ptx_nll.detach()
        return loss, metrics

    return loss_fn


@dataclass(frozen=True)
class LoraSettings:
    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05


def train_dpo(model, pairs: PreferencePairs, config: TrainConfig, *, beta: float = 0.1, loss_type: str = "sigmoid",
              label_smoothing: float = 0.0, w_sft: float = 0.0, ptx_coef: float = 0.0,
              lora: LoraSettings | None = None):
    """DPO-train ``model`` in place on ``pairs`` (reference log-probs already stored; with ``ptx_coef`` > 0,
    ``pairs`` built with a replay dataset); with ``lora``, train
    adapters on the language model (vision tower and projector frozen, as CSR) and merge them at the end,
    so the result is a plain model in the Hugging Face layout again. Returns ``optim.train``'s result."""
    if lora is not None:
        # The adapters' initial A comes from the global generator: seed it, or it would depend on whatever
        # this process drew before (two runs of one CSR config trained different adapters).
        torch.manual_seed(config.seed)
        apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout)
    else:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(not name.startswith("vision_tower."))
    if (ptx_coef > 0) != (pairs.replay is not None):
        raise ValueError(f"train_dpo: ptx_coef={ptx_coef} needs PreferencePairs(replay=...) exactly when it is > 0")
    loss_fn = dpo_loss_fn(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, w_sft=w_sft,
                          ptx_coef=ptx_coef)
    pad = pairs.tokenizer.pad_id
    result = train(model, pairs, loss_fn, config, collate_fn=lambda examples: collate_pairs(examples, pad_id=pad))
    if lora is not None:
        merge_lora(model)
    return result
