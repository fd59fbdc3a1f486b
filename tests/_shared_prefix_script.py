"""SFT of the tiny LLaVA with the system prompt shared (``sft_loss(share_prefix=True)``), run by
tests/test_shared_prefix.py under torchrun with FSDP2, and in one process without sharing:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_shared_prefix_script.py OUT fsdp share

Rank 0 saves every parameter to OUT/final.pt.
"""

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from optim.train import TrainConfig, train  # noqa: E402
from recipes.sft import collate_sft, sft_loss  # noqa: E402
from test_shared_prefix import _batch, _model  # noqa: E402


def examples(cfg) -> list:
    """24 conversations: the same 6-token prefix, an image, answers of different lengths."""
    out, start = [], 6 + cfg.image_tokens_per_image + 1
    for seed in range(8):
        ids, pixels = _batch(cfg, g=torch.Generator().manual_seed(seed))
        for b in range(ids.shape[0]):
            mask = torch.zeros_like(ids[b], dtype=torch.bool)
            mask[start:] = ids[b, start:] != 0
            out.append({"input_ids": ids[b], "assistant_mask": mask, "pixel_values": pixels[b:b + 1].float()})
    return out


def run(out_dir: str, fsdp: bool, share: bool) -> None:
    model = _model().float()
    config = TrainConfig(out_dir=out_dir, lr=1e-3, max_steps=3, global_batch_size=4, micro_batch_size=2, fsdp=fsdp,
                         log_every=1e9)
    train(model, examples(model.config), functools.partial(sft_loss, share_prefix=share), config,
          collate_fn=functools.partial(collate_sft, pad_id=0))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(out_dir) / "final.pt")


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2] == "fsdp", sys.argv[3] == "share")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
