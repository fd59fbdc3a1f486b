"""Supervised fine-tuning of a LLaVA-style model on conversations (visual instruction tuning).

    python recipes/sft.py                                   # the built-in world: its aligned model + SFT mixture
    python recipes/sft.py --model DIR --data llava_v1_5_mix665k.json --images DIR --out runs/sft
    torchrun --nproc_per_node 8 recipes/sft.py --model DIR --data FILE --images DIR --out DIR

LLaVA-1.5's second stage (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning",
Sec. 3 and its released training code): the model reads `{system} USER: <image>\\n{q1}
ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...` and is trained with next-token
cross-entropy on the assistant answers only (each answer's tokens and its "</s>"); the system
prompt, the questions and the image positions carry no loss. By default the projector and the
language model are trained and the vision tower stays frozen, as released.

The pieces, each usable on its own:

- ``sft_loss(model, batch)``: the loss for ``optim.train`` (per-example mean over assistant
  tokens, then the mean over the micro-batch: the loop's convention);
- ``collate_sft(examples, pad_id=...)``: pads ids and masks, stacks the images of the rows that
  have one (text-only rows carry none, and no image tokens);
- ``ConversationDataset``: conversation records -> encoded examples, on access; every record is
  checked once when the dataset is built, so a bad record or a missing image fails before training;
- ``load_llava_conversations(path, images)``: LLaVA's conversation JSON (or JSONL) -> records;
- ``set_trainable(model, ...)`` and ``train_sft(...)``: freezing and the call into ``optim.train``.

A record is ``{"turns": [(question, answer), ...], "image": <reference or None>, "where": str}``;
``load_image(reference)`` (given to the dataset) turns the reference into a PIL image.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm.checkpoint import copy_tokenizer, load_lvlm, save_lvlm  # noqa: E402
from lvlm.image import load_image as load_image_file  # noqa: E402
from lvlm.image import preprocess_image  # noqa: E402
from lvlm.records import read_data_file  # noqa: E402
from lvlm.tokenizer import IMAGE_MARKER, Tokenizer, encode_conversation, encode_conversations, pad_batch  # noqa: E402
from optim.distributed import is_main_process  # noqa: E402
from optim.logprobs import token_logprobs  # noqa: E402
from optim.train import TrainConfig, TrainResult, train  # noqa: E402

# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------


def sft_loss(model, batch: dict, *, share_prefix: bool = False) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy on the assistant tokens (LLaVA's SFT objective).

    batch: ``input_ids`` [B, T] (right-padded), ``assistant_mask`` [B, T] bool (True on answer tokens
    and their "</s>"), ``pixel_values`` [N, 3, H, W] or None. The logits at position t predict token
    t + 1, so the labels are ``input_ids[:, 1:]`` scored where ``assistant_mask[:, 1:]``. Each example's
    loss is the mean negative log-likelihood over its own assistant tokens; the batch loss is the mean
    over examples (``optim.train``'s convention: the result does not depend on how a global batch is
    cut into micro-batches). The released LLaVA code averages over all tokens of a micro-batch instead,
    which weighs long answers more. A row with no assistant token contributes 0.

    ``share_prefix``: the system prompt that every row starts with runs once for the batch
    (``LlavaForConditionalGeneration.forward``): the same loss, fewer positions computed.

    Returns (loss, metrics): ``tokens`` (assistant tokens scored) and ``token_accuracy`` (argmax hits).
    """
    ids, mask = batch["input_ids"], batch["assistant_mask"]
    labels, scored = ids[:, 1:], mask[:, 1:]  # [B, T - 1]: position t predicts token t + 1
    predicts_scored = F.pad(scored, (0, 1), value=False)  # [B, T]: the positions whose next token is scored
    logits = model(ids, batch.get("pixel_values"), logits_at=predicts_scored,
                   share_prefix=share_prefix)  # [N, V], N = scored tokens
    targets = labels[scored]  # [N]
    token_logp = token_logprobs(logits[None], targets[None])[0]  # [N], float32
    per_token = torch.zeros(scored.shape, dtype=token_logp.dtype, device=ids.device).masked_scatter(scored, token_logp)
    n_per_row = scored.sum(1)  # [B]
    mean_logp = per_token.sum(1) / n_per_row.clamp_min(1)  # [B]; 0 for a row with nothing scored
    with torch.no_grad():
        hits = (logits.argmax(-1) == targets).sum()
        n_tokens = n_per_row.sum()
    metrics = {"tokens": n_tokens, "token_accuracy": hits.float() / n_tokens.clamp_min(1)}
    return -mean_logp.mean(), metrics


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------


def collate_sft(examples: Sequence[dict], *, pad_id: int, image_token_id: int | None = None,
                image_tokens_per_image: int | None = None) -> dict:
    """Examples -> one batch for ``sft_loss``.

    examples: dicts with ``input_ids`` [T_i] long, ``assistant_mask`` [T_i] bool and ``pixel_values``
    [n_i, 3, H, W] or None. Ids are right-padded with ``pad_id``, masks with False; the images of all
    rows are concatenated in row order (the order in which the model consumes image-token blocks), and
    rows without an image add none. When ``image_token_id`` and ``image_tokens_per_image`` are given,
    every row is checked: image-token count == n_i x tokens per image.
    Returns {"input_ids" [B, T], "assistant_mask" [B, T], "pixel_values" [sum n_i, 3, H, W] or None}.
    """
    if not examples:
        raise ValueError("collate_sft: got no examples")
    images = []
    for i, example in enumerate(examples):
        pixels = example.get("pixel_values")
        n_images = 0 if pixels is None else pixels.shape[0]
        if image_token_id is not None and image_tokens_per_image is not None:
            n_slots = int((example["input_ids"] == image_token_id).sum())
            if n_slots != n_images * image_tokens_per_image:
                raise ValueError(f"collate_sft: example {i} has {n_slots} image-token positions but {n_images} "
                                 f"image(s) of {image_tokens_per_image} tokens")
        if pixels is not None:
            images.append(pixels)
    input_ids, _ = pad_batch([e["input_ids"] for e in examples], pad_id)
    assistant_mask, _ = pad_batch([e["assistant_mask"] for e in examples], False)
    return {"input_ids": input_ids, "assistant_mask": assistant_mask,
            "pixel_values": torch.cat(images) if images else None}


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------


class ConversationDataset:
    """Conversation records -> training examples (``input_ids``, ``assistant_mask``, ``pixel_values``).

    records: dicts ``{"turns": [(question, answer), ...], "image": reference or None, "where": str}``
    ("where" names the record in errors, e.g. "data.json record 17"). load_image: reference -> PIL
    image (default: a file path, ``lvlm.image.load_image``), preprocessed here with
    ``lvlm.image.preprocess_image``; or load_pixels: reference -> the preprocessed tensor [3, H, W]
    (a cache of already preprocessed images). image_size: the vision tower's input side; image_tokens_per_image: positions per image
    (``LlavaConfig.image_tokens_per_image``). max_length: longer examples are cut to this many tokens
    (LLaVA's ``model_max_length`` truncation); one whose image tokens would be cut raises. loss_on:
    which tokens ``assistant_mask`` marks for the loss -- "assistant" (the answers and their "</s>",
    LLaVA's SFT) or "text" (every token after the image: the questions, the role words and the answers;
    every token after "<s>" when there is no image), next-token prediction on the whole conversation as
    a language model's pretraining has it.

    Building the dataset encodes every record once (``check=True``) so that a malformed record fails
    here, before any training; examples are encoded again, and images loaded, on access -- or, with
    ``keep_encoded``, the check's encodings are kept (about 9 bytes a token: right for the world's
    datasets of a few million tokens, not for LLaVA's 665k conversations). The check keeps every
    example's token count (``length``, for ``TrainConfig.group_by_length``).
    """

    def __init__(self, records: Sequence[dict], tokenizer: Tokenizer, *, image_size: int, image_tokens_per_image: int,
                 load_image: Callable | None = None, load_pixels: Callable | None = None,
                 max_length: int | None = None, check: bool = True, loss_on: str = "assistant",
                 keep_encoded: bool = False):
        if loss_on not in ("assistant", "text"):
            raise ValueError(f"ConversationDataset: loss_on must be 'assistant' or 'text', got {loss_on!r}")
        self.loss_on = loss_on
        self.records = list(records)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.image_tokens_per_image = image_tokens_per_image
        self.load_image = load_image or load_image_file
        self.load_pixels = load_pixels
        self.max_length = max_length
        if not self.records:
            raise ValueError("ConversationDataset: no records")
        if keep_encoded and not check:
            raise ValueError("ConversationDataset: keep_encoded keeps the check's encodings; it needs check=True")
        self.encoded, self.lengths = None, None
        if keep_encoded:  # the check, kept
            self.encoded = [e for chunk in self._encoded_chunks() for e in chunk]
            self.lengths = [len(e["input_ids"]) for e in self.encoded]
        elif check:  # each encoding dropped at once (real data sets are too large to hold), its length kept
            self.lengths = [len(e["input_ids"]) for chunk in self._encoded_chunks() for e in chunk]

    def __len__(self) -> int:
        return len(self.records)

    def length(self, index: int) -> int:
        """Example ``index``'s token count (image tokens included), as the check measured it."""
        if self.lengths is None:
            raise ValueError("ConversationDataset.length needs the encoding check (check=True)")
        return self.lengths[index]

    def _encoded_chunks(self, size: int = 4096):
        """Every record's encoding (``_encode``'s), a chunk of ``size`` records at a time, each chunk's texts
        tokenised in one batch call (``encode_conversations``)."""
        for first in range(0, len(self.records), size):
            chunk = self.records[first:first + size]
            names = [record.get("where", "record") for record in chunk]
            conversations = [self._conversation(record) for record in chunk]
            encoded = encode_conversations(self.tokenizer, conversations,
                                           image_tokens_per_image=self.image_tokens_per_image, names=names)
            yield [self._loss_mask_and_cut(record, e) for record, e in zip(chunk, encoded)]

    @staticmethod
    def _num_images(record: dict) -> int:
        return 0 if record.get("image") is None else 1

    def _conversation(self, record: dict) -> tuple:
        """(turns, number of images) of a record; a record without turns raises, named."""
        if "turns" not in record:
            raise ValueError(f"{record.get('where', 'record')}: the record has no 'turns'")
        return record["turns"], self._num_images(record)

    def _encode(self, record: dict) -> dict:
        turns, num_images = self._conversation(record)
        try:
            encoded = encode_conversation(self.tokenizer, turns, num_images=num_images,
                                          image_tokens_per_image=self.image_tokens_per_image)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{record.get('where', 'record')}: {error}") from None
        return self._loss_mask_and_cut(record, encoded)

    def _loss_mask_and_cut(self, record: dict, encoded: dict) -> dict:
        """An encoded conversation -> the example's ids and loss mask: ``loss_on`` applied, cut to ``max_length``."""
        where, num_images = record.get("where", "record"), self._num_images(record)
        ids, mask = encoded["input_ids"], encoded["assistant_mask"]
        if self.loss_on == "text":
            is_image = ids == self.tokenizer.image_token_id
            after = int(is_image.nonzero()[-1]) + 1 if bool(is_image.any()) else 1
            mask = torch.zeros_like(mask)
            mask[after:] = True
        if self.max_length is not None and len(ids) > self.max_length:
            if num_images and self.tokenizer.image_token_id in ids[self.max_length:].tolist():
                raise ValueError(f"{where}: {len(ids)} tokens; max_length={self.max_length} would cut the image "
                                 "tokens (raise max_length)")
            ids, mask = ids[: self.max_length], mask[: self.max_length]
        if not bool(mask.any()):
            raise ValueError(f"{where}: no assistant tokens to train on (empty answers, or cut by max_length)")
        return {"input_ids": ids, "assistant_mask": mask}

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        example = dict(self.encoded[index]) if self.encoded is not None else self._encode(record)
        example["pixel_values"] = None
        if record.get("image") is not None:
            if self.load_pixels is not None:
                example["pixel_values"] = self.load_pixels(record["image"])[None]  # [1, 3, H, W]
                return example
            try:
                image = self.load_image(record["image"])
            except (OSError, ValueError) as error:
                raise ValueError(f"{record.get('where', 'record')}: {error}") from None
            example["pixel_values"] = preprocess_image(image, size=self.image_size)[None]  # [1, 3, H, W]
        return example


HUMAN_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")


def load_llava_conversations(path: str | Path, images: str | Path | None) -> list[dict]:
    """LLaVA's conversation file -> records for ``ConversationDataset`` (image references are file paths).

    The file (JSON list, or JSONL) holds ``{"id": ..., "image": "x.jpg", "conversations": [{"from": "human",
    "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``; "image" may be absent (a text-only
    conversation). Turns must alternate human / gpt, starting with human and ending with gpt; "<image>"
    may appear only in the first human turn and only when the record has an image (the chat template puts
    it in front of the question). Every image must exist under ``images``. All problems are reported at
    once (the first 10), naming the file and record, before anything is trained.
    """
    path = Path(path)
    data = read_data_file(path)  # FileNotFoundError / ValueError with file:line
    problems, missing, records = [], [], []
    images_dir = Path(images) if images is not None else None
    for index, record in enumerate(data):
        where = f"{path} record {index}" + (f" (id {record['id']!r})" if "id" in record else "")
        conversation = record.get("conversations")
        if not isinstance(conversation, list) or not conversation:
            problems.append(f"{where}: 'conversations' must be a non-empty list")
            continue
        turns, question, bad = [], None, None
        for k, message in enumerate(conversation):
            if not isinstance(message, dict) or not isinstance(message.get("value"), str):
                bad = f"message {k} must be an object with a string 'value'"
                break
            role = message.get("from")
            expect_human = k % 2 == 0
            if (role in HUMAN_ROLES) != expect_human or role not in HUMAN_ROLES + ASSISTANT_ROLES:
                bad = f"message {k} is from {role!r}; expected {'human' if expect_human else 'gpt'} (turns alternate)"
                break
            if expect_human:
                question = message["value"]
                if k > 0 and IMAGE_MARKER in question:
                    bad = f"message {k} holds {IMAGE_MARKER!r}; only the first question may"
                    break
            else:
                turns.append((question, message["value"]))
        if bad is None and len(conversation) % 2:
            bad = "the last message is a question with no answer"
        image = record.get("image")
        if bad is None and image is not None and not isinstance(image, str):
            bad = f"'image' must be one file name (multi-image records are not supported), got {image!r}"
        if bad is None and image is None and IMAGE_MARKER in turns[0][0]:
            bad = f"the first question holds {IMAGE_MARKER!r} but the record has no 'image'"
        if bad is None and image is not None and turns[0][0].count(IMAGE_MARKER) > 1:
            bad = f"the first question holds {turns[0][0].count(IMAGE_MARKER)} {IMAGE_MARKER!r} markers; one image only"
        if bad is not None:
            problems.append(f"{where}: {bad}")
            continue
        image_path = None
        if image is not None:
            if images_dir is None:
                problems.append(f"{where}: has an image ({image!r}) but no image folder was given (--images)")
                continue
            image_path = images_dir / image
            if not image_path.is_file():
                missing.append(f"{where}: {image_path}")
                continue
        records.append({"turns": turns, "image": None if image_path is None else str(image_path), "where": where})
    if problems:
        raise ValueError(f"{len(problems)} malformed record(s) in {path}:\n  " + "\n  ".join(problems[:10]))
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) of {path} not found:\n  " + "\n  ".join(missing[:10]))
    if not records:
        raise ValueError(f"{path}: no conversations")
    return records


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def set_trainable(model, *, vision: bool = False, projector: bool = True, language_model: bool = True) -> int:
    """Freeze / unfreeze the three parts of a LLaVA model; returns the number of trainable parameters.

    LLaVA-1.5 as released: stage 1 trains the projector only, stage 2 the projector and the language
    model; the vision tower stays frozen in both.
    """
    model.vision_tower.requires_grad_(vision)
    model.multi_modal_projector.requires_grad_(projector)
    model.language_model.requires_grad_(language_model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sft_collate_for(model, tokenizer: Tokenizer):
    """``collate_sft`` bound to the model's pad / image ids (a picklable ``functools.partial``)."""
    config = model.config
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (config.pad_token_id or 0)
    return functools.partial(collate_sft, pad_id=pad_id, image_token_id=config.image_token_index,
                             image_tokens_per_image=config.image_tokens_per_image)


def train_sft(model, dataset: ConversationDataset, config: TrainConfig, *, share_prefix: bool = False) -> TrainResult:
    """SFT of ``model`` in place with ``optim.train`` (any freezing is set beforehand, ``set_trainable``);
    ``share_prefix``: see ``sft_loss``."""
    return train(model, dataset, functools.partial(sft_loss, share_prefix=share_prefix), config,
                 collate_fn=sft_collate_for(model, dataset.tokenizer))


# ---------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------


@dataclass
class SFTConfig:
    """The script's settings; ``--flag value`` overrides any field.

    model/data/images None: the built-in world (its aligned stage-1 model, its SFT mixture, rendered
    images), with the world's stage-2 settings as defaults (``recipes.world_models``).
    """

    model: str | None = None  # a Hugging Face LLaVA directory (tokenizer.json beside the weights)
    data: str | None = None  # LLaVA conversation JSON / JSONL
    images: str | None = None  # folder the records' "image" names are relative to
    out: str = "runs/sft"
    world_preset: str = "auto"  # the world's models: "auto" (float32 on a CPU, default with a GPU), or a WORLD_PRESETS name
    lr: float = 2e-5  # LLaVA-1.5 stage 2
    epochs: int = 1
    max_steps: int | None = None
    global_batch_size: int = 128
    micro_batch_size: int = 16
    group_by_length: bool = True  # micro-batches of similar length (TrainConfig.group_by_length): less padding
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 2048
    train_vision: bool = False
    train_projector: bool = True
    train_language_model: bool = True
    activation_checkpointing: bool = False
    bf16: bool = True
    save_every: int = 0
    seed: int = 0


def world_sft_defaults(config: SFTConfig) -> SFTConfig:
    """The world preset's stage-2 settings in place of the real-model defaults (flags still win later)."""
    from recipes.world_models import world_preset

    w = world_preset(config.world_preset)
    return dataclasses.replace(config, lr=w.sft_lr, max_steps=w.sft_steps, global_batch_size=w.sft_batch,
                               micro_batch_size=w.micro_batch, warmup_ratio=w.warmup_ratio,
                               train_vision=w.sft_train_vision, max_length=w.lvlm_max_positions, out="runs/sft-world",
                               seed=w.seed)


def main(argv=None) -> None:
    from recipes._common import add_config_arguments, config_from_args, print_config, set_cpu_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, SFTConfig())
    args = parser.parse_args(argv)
    config = config_from_args(args, SFTConfig())
    world = config.model is None and config.data is None
    if world and config.images is not None:
        parser.error("--images goes with --model and --data; without them the built-in world is used")
    if world:  # world defaults first, then the flags the user gave on top
        config = config_from_args(args, world_sft_defaults(config_from_args(args, SFTConfig())))
    elif config.model is None or config.data is None:
        parser.error("give both --model and --data (and --images for records with images), or neither (the world)")
    set_cpu_threads()
    if is_main_process():
        print_config(config, "sft")

    if world:
        from recipes.world_models import ensure_world_models, world_preset, world_sft_records

        preset = world_preset(config.world_preset)
        models = ensure_world_models(preset)
        source = models.aligned
        records = world_sft_records(preset)
        load = functools.partial(_render_world_image, preset.world)
    else:
        source = Path(config.model)
        records = load_llava_conversations(config.data, config.images)
        load = None
    tokenizer = Tokenizer.from_file(source)
    model = load_lvlm(source, dtype=torch.float32)
    dataset = ConversationDataset(records, tokenizer, image_size=model.config.vision_config.image_size,
                                  image_tokens_per_image=model.config.image_tokens_per_image, load_image=load,
                                  max_length=config.max_length)
    n = set_trainable(model, vision=config.train_vision, projector=config.train_projector,
                      language_model=config.train_language_model)
    if is_main_process():
        print(f"sft: {len(dataset)} conversations, {n:,} trainable parameters, from {source}", flush=True)
    out = Path(config.out)
    train_config = TrainConfig(out_dir=str(out / "train"), lr=config.lr, epochs=config.epochs,
                               max_steps=config.max_steps, global_batch_size=config.global_batch_size,
                               micro_batch_size=config.micro_batch_size, group_by_length=config.group_by_length,
                               warmup_ratio=config.warmup_ratio,
                               weight_decay=config.weight_decay, bf16=config.bf16, save_every=config.save_every,
                               activation_checkpointing=config.activation_checkpointing, seed=config.seed)
    result = train_sft(model, dataset, train_config)
    if is_main_process():
        save_lvlm(model, out)
        copy_tokenizer(source, out)
        print(f"sft: {result.step} steps, last loss {result.metrics.get('loss', float('nan')):.4f}; saved {out}",
              flush=True)


def _render_world_image(world_config, seed: int):
    from lvlm.world import sample_scene

    return sample_scene(int(seed), world_config).image()


if __name__ == "__main__":
    main()
