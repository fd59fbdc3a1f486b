"""The training loop (optim/train.py) on the tiny LLaVA with text-only SFT data."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_script import distributed_config, make_dataset, make_model, sft_loss  # noqa: E402

from optim.train import (  # noqa: E402
    NonFiniteLossError,
    TrainConfig,
    batch_for_ranks,
    global_batch_indices,
    list_checkpoints,
    lr_at,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_lr_schedule_by_hand():
    kw = dict(total_steps=10, warmup_steps=2, peak_lr=1.0)
    assert lr_at(0, **kw) == 0.5 and lr_at(1, **kw) == 1.0  # linear warm-up over 2 steps
    assert lr_at(2, **kw) == 1.0  # cosine starts at the peak
    assert lr_at(6, **kw) == pytest.approx(0.5)  # half-way through the 8 decay steps: cos(pi/2) = 0
    assert lr_at(8, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 8)))
    assert lr_at(5, total_steps=10, warmup_steps=0, peak_lr=2.0) == pytest.approx(1.0)


def test_global_batches_cover_each_epoch_once():
    n, g = 10, 3  # 3 batches per epoch, one example left out
    epoch0 = [global_batch_indices(n, g, seed=0, epoch=0, batch=b) for b in range(3)]
    flat = [i for b in epoch0 for i in b]
    assert all(len(b) == 3 for b in epoch0) and len(set(flat)) == 9 and set(flat) <= set(range(n))
    epoch1 = [global_batch_indices(n, g, seed=0, epoch=1, batch=b) for b in range(3)]
    assert epoch1 != epoch0
    assert global_batch_indices(n, g, seed=0, epoch=1, batch=2) == epoch1[2]  # reproducible


def test_loss_falls_and_progress_is_recorded(tmp_path, capsys):
    model = make_model()
    config = TrainConfig(out_dir=str(tmp_path), lr=3e-3, max_steps=30, global_batch_size=8, micro_batch_size=4,
                         warmup_ratio=0.1, log_every=1e9)
    result = train(model, make_dataset(64), sft_loss, config)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    first, last = sum(m["loss"] for m in metrics[:5]) / 5, sum(m["loss"] for m in metrics[-5:]) / 5
    assert first > 4.5  # about log(128) = 4.85 at random init
    assert last < 0.6 * first
    assert result.step == 30 and result.metrics["loss"] == metrics[-1]["loss"]
    # 64 examples / 8 per step = 8 steps per epoch: step 30 is in epoch 3.
    assert metrics[-1]["epoch"] == 3 and metrics[0]["lr"] == pytest.approx(1e-3)  # warm-up 3 steps
    out = capsys.readouterr().out
    assert "step 30/30" in out and "tok/s" in out and "eta" in out
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000030"]


class Preempted(Exception):
    pass


def stop_before_step(k, accumulation):
    """An SFT loss that raises when step k's first micro-batch arrives (a crash mid-run)."""
    calls = [0]

    def loss_fn(model, batch):
        if calls[0] == (k - 1) * accumulation:
            raise Preempted
        calls[0] += 1
        return sft_loss(model, batch)
    return loss_fn


def test_resume_is_exact_and_a_finished_run_is_not_repeated(tmp_path):
    # LoRA with adapter dropout: the result depends on data order, optimizer state and the RNG.
    def config(out_dir):
        return TrainConfig(out_dir=str(out_dir), lr=1e-2, max_steps=8, global_batch_size=4, micro_batch_size=2,
                           warmup_ratio=0.25, weight_decay=0.1, save_every=2, keep_last=2, log_every=1e9)
    straight = make_model(lora=True, dropout=0.1)
    train(straight, make_dataset(), sft_loss, config(tmp_path / "a"))

    interrupted = make_model(lora=True, dropout=0.1)
    with pytest.raises(Preempted):
        train(interrupted, make_dataset(), stop_before_step(6, accumulation=2), config(tmp_path / "b"))
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["ckpt-000002", "ckpt-000004"]
    (tmp_path / "b" / "ckpt-000006.tmp").mkdir()  # debris of a save cut short: ignored and removed
    resumed = make_model(lora=True, dropout=0.1)  # a new process: fresh model, fresh RNG
    result = train(resumed, make_dataset(), sft_loss, config(tmp_path / "b"))
    assert result.step == 8
    assert_same(params(resumed), params(straight))
    assert [m["step"] for m in read_metrics(tmp_path / "b")] == list(range(1, 9))
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["ckpt-000006", "ckpt-000008"]

    # A rerun of the finished run trains nothing and hands back the trained adapters.
    again = make_model(lora=True, dropout=0.1)
    calls = []
    result = train(again, make_dataset(), lambda m, b: calls.append(1), config(tmp_path / "b"))
    assert not calls and result.step == 8
    assert_same(params(again), params(straight))


def test_nan_stops_the_run_and_the_last_checkpoint_loads(tmp_path):
    calls = [0]

    def nan_at_step_5(model, batch):  # accumulation 2: step 5's micro-batches are calls 8 and 9
        loss, metrics = sft_loss(model, batch)
        calls[0] += 1
        return (loss * float("nan") if calls[0] == 9 else loss), metrics

    config = TrainConfig(out_dir=str(tmp_path), lr=1e-2, max_steps=8, global_batch_size=4, micro_batch_size=2,
                         save_every=2, log_every=1e9)
    model = make_model(lora=True)
    with pytest.raises(NonFiniteLossError, match=r"step 5/8.*ckpt-000004"):
        train(model, make_dataset(), nan_at_step_5, config)
    # The bad update was not applied: the model still holds step 4's weights, as saved.
    saved = torch.load(tmp_path / "ckpt-000004" / "trainable.pt", weights_only=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert saved.keys() == trainable.keys()
    assert all(torch.equal(saved[n], trainable[n].detach()) for n in saved)
    # ...and the run resumes from it.
    result = train(make_model(lora=True), make_dataset(), sft_loss, config)
    assert result.step == 8 and math.isfinite(result.metrics["loss"])


def test_batch_for_ranks_by_hand_and_always_splits():
    assert batch_for_ranks(32, 16, 1) == (32, 16)
    assert batch_for_ranks(32, 16, 2) == (32, 16)
    assert batch_for_ranks(32, 16, 3) == (30, 10)  # micro-batch 32 // 3 = 10, 3 x 10 = 30
    assert batch_for_ranks(32, 16, 5) == (30, 6)
    assert batch_for_ranks(128, 128, 3) == (126, 42)
    assert batch_for_ranks(2, 16, 4) == (4, 1)  # at least one example per rank
    for batch in range(1, 70):
        for micro in range(1, 20):
            for world in range(1, 9):
                g, m = batch_for_ranks(batch, micro, world)
                assert 1 <= m <= micro and g % (m * world) == 0 and g >= m * world
                assert g <= max(batch, world)  # lowered, never raised, except to give each rank one example


def test_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not divisible"):
        train(make_model(), make_dataset(), sft_loss,
              TrainConfig(out_dir=str(tmp_path), global_batch_size=6, micro_batch_size=4))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(make_model(), make_dataset(4), sft_loss, TrainConfig(out_dir=str(tmp_path), global_batch_size=8))
    frozen = make_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, make_dataset(), sft_loss, TrainConfig(out_dir=str(tmp_path), global_batch_size=4))


class _WithLengths(list):
    """``make_dataset`` examples with ``length(i)``: the count of real (unpadded) tokens."""

    def length(self, index):
        return int(self[index]["mask"].sum())


def _collate_to_longest(examples):
    """Stack, cutting the padding to the micro-batch's longest example (as the real collates pad)."""
    longest = max(int(e["mask"].sum()) for e in examples)
    return {k: torch.stack([e[k][:longest] for e in examples]) for k in ("input_ids", "mask")}


def test_group_by_length_makes_the_same_steps_with_less_padding(tmp_path):
    widths = {False: [], True: []}

    def loss_fn(group):
        def fn(model, batch):
            widths[group].append(batch["input_ids"].shape[1])
            return sft_loss(model, batch)
        return fn

    dataset = _WithLengths(make_dataset(48))
    trained = {}
    for group in (False, True):
        model = make_model()
        config = TrainConfig(out_dir=str(tmp_path / str(group)), lr=3e-3, max_steps=4, global_batch_size=8,
                             micro_batch_size=2, group_by_length=group, log_every=1e9)
        train(model, dataset, loss_fn(group), config, collate_fn=_collate_to_longest)
        trained[group] = params(model)
    # Per-example mean losses: the same 8 examples make the same step however they are cut.
    assert_same(trained[True], trained[False], atol=1e-5)
    moved = max((trained[True][k] - make_model().state_dict()[k]).abs().max() for k in trained[True])
    assert moved > 1e-3
    for a, b in zip(read_metrics(tmp_path / "True"), read_metrics(tmp_path / "False")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"]
    # Grouped, each step's 4 micro-batches come shortest first, and pad less in all.
    for step in range(4):
        grouped = widths[True][4 * step:4 * step + 4]
        assert grouped == sorted(grouped)
    assert sum(widths[True]) < sum(widths[False])

    with pytest.raises(ValueError, match="length"):
        train(make_model(), make_dataset(48), sft_loss,
              TrainConfig(out_dir=str(tmp_path / "no-lengths"), global_batch_size=8, micro_batch_size=2,
                          group_by_length=True))


def test_rank_share_by_length_deals_sorted_micro_batches_back_and_forth():
    from optim.train import rank_share_by_length

    lengths = {i: n for i, n in enumerate([9, 3, 14, 1, 7, 12, 5, 10, 2, 16, 4, 8, 6, 11, 13, 15])}
    batch = [3, 8, 1, 10, 6, 12, 4, 11, 0, 7, 13, 5, 14, 2, 15, 9]  # a permutation's batch of 16
    ordered = sorted(batch, key=lengths.get)
    assert rank_share_by_length(batch, lengths.get, micro_batch_size=4, rank=0, world=1) == ordered
    shares = [rank_share_by_length(batch, lengths.get, micro_batch_size=2, rank=r, world=2) for r in (0, 1)]
    chunks = [ordered[i:i + 2] for i in range(0, 16, 2)]  # 8 micro-batches, shortest first
    assert shares[0] == [*chunks[0], *chunks[3], *chunks[4], *chunks[7]]  # rank 0: 0, 3, 4, 7
    assert shares[1] == [*chunks[1], *chunks[2], *chunks[5], *chunks[6]]  # rank 1: 1, 2, 5, 6
    # every example once; the two ranks' padded work close: sum of each micro-batch's longest
    assert sorted(shares[0] + shares[1]) == sorted(batch)
    work = [sum(max(lengths[i] for i in share[j:j + 2]) for j in range(0, 8, 2)) for share in shares]
    assert abs(work[0] - work[1]) <= 2


def test_two_processes_match_one_process(tmp_path):
    """torchrun x2 (Gloo, CPU), micro 1 x accumulation 2 per rank, with DDP and with FSDP2, against one
    process with micro 2 x accumulation 2: the same global batches, so the same parameters."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # --standalone: a single-node rendezvous on a port the launcher picks itself (no port race).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "_train_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    model = make_model()
    one = dataclasses.replace(distributed_config(tmp_path / "one", fsdp=False), micro_batch_size=2)
    train(model, make_dataset(), sft_loss, one)
    expected = params(model)
    moved = max((expected[k] - make_model().state_dict()[k]).abs().max() for k in expected)
    assert moved > 1e-3  # training did something the comparison can see
    no_accumulation = make_model()  # micro 4 x accumulation 1
    train(no_accumulation, make_dataset(), sft_loss,
          dataclasses.replace(distributed_config(tmp_path / "flat", fsdp=False), micro_batch_size=4))
    assert_same(params(no_accumulation), expected, atol=1e-5)
    for mode in ("ddp", "fsdp", "flat"):
        if mode != "flat":
            assert_same(torch.load(tmp_path / f"{mode}.pt", weights_only=True), expected, atol=1e-5)
        # Adam and clipping hide a constant gradient scale; the logged loss and grad norm do not.
        for a, b in zip(read_metrics(tmp_path / mode), read_metrics(tmp_path / "one")):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
            assert a["tokens"] == b["tokens"]


def test_cpu_bf16_autocasts_the_loss_on_cpu_only_when_asked(tmp_path):
    seen = []

    def loss_fn(model, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        loss, metrics = sft_loss(model, batch)
        assert loss.dtype == torch.float32  # the loss itself is float32 either way
        return loss, metrics

    for flag in (False, True):
        config = TrainConfig(out_dir=str(tmp_path / str(flag)), lr=1e-3, max_steps=2, global_batch_size=2,
                             micro_batch_size=2, log_every=1e9, cpu_bf16=flag)
        train(make_model(lora=True), make_dataset(), loss_fn, config)
    assert seen == [False, False, True, True]
