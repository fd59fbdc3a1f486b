"""A tiny SFT run shared by tests/test_train_loop.py; also run by it under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_train_script.py OUT_DIR

trains the tiny LLaVA (text-only sequences) with the loop in optim/train.py twice, with DDP and with
FSDP2, and has rank 0 save every parameter to OUT_DIR/ddp.pt and OUT_DIR/fsdp.pt.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lvlm.config import preset  # noqa: E402
from lvlm.llava import LlavaForConditionalGeneration  # noqa: E402
from optim.lora import apply_lora  # noqa: E402
from optim.train import TrainConfig, train  # noqa: E402

SEQ_LEN = 12


def make_dataset(n: int = 32, seed: int = 0) -> list[dict]:
    """Counting sequences (each token = previous + 1, ids 4..127) of 6..12 tokens, right-padded with 0.

    Learnable (the next token is always the current one plus 1) and of varying length, so that a
    wrong loss normalisation across ranks or micro-batches shows.
    """
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(6, SEQ_LEN + 1, (), generator=g))
        start = int(torch.randint(0, 124, (), generator=g))
        ids = torch.zeros(SEQ_LEN, dtype=torch.long)
        ids[:length] = 4 + (start + torch.arange(length)) % 124
        mask = torch.zeros(SEQ_LEN, dtype=torch.bool)
        mask[:length] = True
        examples.append({"input_ids": ids, "mask": mask})
    return examples


def sft_loss(model, batch):
    """Cross-entropy of each next token; the mean over a sequence's tokens, then over sequences."""
    ids, mask = batch["input_ids"], batch["mask"]
    logits = model(ids)[:, :-1].float()  # position t predicts token t + 1
    targets, scored = ids[:, 1:], mask[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T-1]
    per_sequence = (nll * scored).sum(1) / scored.sum(1)
    return per_sequence.mean(), {"tokens": scored.sum()}


def make_model(lora: bool = False, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(preset("tiny-llava"))
    if lora:
        apply_lora(model, r=4, alpha=8, dropout=dropout)
    else:  # full fine-tuning of the language model; text-only data leaves the image path unused
        model.vision_tower.requires_grad_(False)
        model.multi_modal_projector.requires_grad_(False)
    return model


def distributed_config(out_dir, fsdp: bool) -> TrainConfig:
    """2 ranks x 1 micro x 2 accumulation = global batch 4."""
    return TrainConfig(out_dir=str(out_dir), lr=3e-3, warmup_ratio=0.25, max_steps=4, global_batch_size=4,
                       micro_batch_size=1, fsdp=fsdp, weight_decay=0.1, log_every=1e9)


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    for mode in ("ddp", "fsdp"):
        model = make_model()
        train(model, make_dataset(), sft_loss, distributed_config(out_dir / mode, fsdp=mode == "fsdp"))
        if torch.distributed.get_rank() == 0:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out_dir / f"{mode}.pt")
    torch.distributed.destroy_process_group()
