"""The recipes' shared pieces: run directory checks, rank-split resumable collection, DPO on pairs."""

import json

import pytest
import torch

from lvlm.llava import LlavaForConditionalGeneration
from optim.train import TrainConfig
from recipes._dpo import (PreferencePairs, add_reference_logps, check_batch_splits, check_dpo_settings, collate_pairs,
                          dpo_loss_fn, response_logps, train_dpo)
from recipes._run import collect, format_changes, format_table, open_run, write_summary
from tests.tiny_tokenizer import tiny_llava_config, tiny_tokenizer


def test_open_run_refuses_a_directory_made_with_other_models(tmp_path):
    config = {"lam": 0.9}
    open_run(tmp_path / "run", "csr", config, models={"policy": tmp_path / "world-aaa" / "sft", "clip": None})
    open_run(tmp_path / "run", "csr", config, models={"policy": tmp_path / "world-aaa" / "sft"})  # a rerun
    with pytest.raises(ValueError, match="models.policy"):
        open_run(tmp_path / "run", "csr", config, models={"policy": tmp_path / "world-bbb" / "sft"})


def test_open_run_refuses_a_directory_of_another_config(tmp_path):
    open_run(tmp_path / "run", "csr", {"lam": 0.9, "iterations": 3})
    open_run(tmp_path / "run", "csr", {"lam": 0.9, "iterations": 3})  # same config: a rerun
    with pytest.raises(ValueError, match=r"lam: 0.9 there, 0.0 now"):
        open_run(tmp_path / "run", "csr", {"lam": 0.0, "iterations": 3})
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["lam"] == 0.9


def test_collect_killed_and_rerun_has_no_duplicates_or_gaps(tmp_path):
    calls = []

    def work(batch, crash_at=None):
        calls.extend(batch)
        if crash_at is not None and crash_at in batch:
            raise KeyboardInterrupt  # the job is killed in the middle of a batch
        return [{"value": x * x} for x in batch]

    items = list(range(10))
    with pytest.raises(KeyboardInterrupt):
        collect(items, lambda b: work(b, crash_at=7), tmp_path, "data", batch_size=3)
    shard = (tmp_path / "data.rank0.jsonl").read_text().splitlines()
    assert len(shard) == 6  # two whole batches landed before the kill
    calls.clear()
    records = collect(items, work, tmp_path, "data", batch_size=3)
    assert calls == [6, 7, 8, 9]  # the rerun only did what was missing
    assert [r["value"] for r in records] == [x * x for x in items]
    assert [r["key"] for r in records] == [f"{i:08d}" for i in items]


def test_summary_shape_and_table(tmp_path):
    m = {"chair_s": 0.5, "chair_i": 0.2, "recall": 0.9, "pope_acc": 0.8, "pope_f1": 0.8, "yes_ratio": 0.5,
         "mc_acc": 0.7}
    summary = write_summary(tmp_path, "csr", m, [dict(m, chair_s=0.2)], 12.0)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary and set(on_disk) == {"recipe", "baseline", "iterations", "final", "seconds", "changes"}
    assert on_disk["final"]["chair_s"] == 0.2
    assert on_disk["changes"] is None  # no evaluation details on disk
    assert "50.0" in format_table([("baseline", m)])


def test_summary_counts_changes_from_the_baseline_item_by_item(tmp_path):
    def details(hallucinated, replies):
        return {"descriptions": [{"image": i, "hallucinated": h} for i, h in enumerate(hallucinated)],
                "pope": [{"image": 0, "question": f"q{i}", "answer": a, "reply": r}
                         for i, (a, r) in enumerate(zip(["Yes", "No", "Yes", "No"], replies))]}

    files = {"baseline": details([["star"], ["star"], [], []], ["Yes", "Yes", "No", "No"]),  # POPE: 2 of 4 right
             "iter1": details([[], [], ["star"], []], ["Yes", "No.", "I can't tell", "No"])}  # 3 right
    for name, content in files.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_details.json").write_text(json.dumps(content))
    m = {"chair_s": 0.5}
    summary = write_summary(tmp_path, "csr", m, [m], 1.0)
    # 2 descriptions cleaned, 1 spoiled: p = 2 (1 + 3) / 8 = 1 (capped); POPE: "No." turned right, "I can't
    # tell" (read as "no") stayed wrong: 1 better, 0 worse, p = 2 / 2 = 1.
    assert summary["changes"] == [{"descriptions": {"better": 2, "worse": 1, "n": 4, "p": 1.0},
                                   "pope": {"better": 1, "worse": 0, "n": 4, "p": 1.0}}]
    assert "descriptions 2 / 1 of 4" in format_changes(summary["changes"])
    files["iter1"]["pope"] = files["iter1"]["pope"][:3]  # another evaluation set: refused, not miscounted
    (tmp_path / "iter1" / "eval_details.json").write_text(json.dumps(files["iter1"]))
    with pytest.raises(ValueError, match="not the same items"):
        write_summary(tmp_path, "csr", m, [m], 1.0)


def _tiny_setup():
    tok = tiny_tokenizer()
    cfg = tiny_llava_config(tok)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    records = [{"key": f"{i:08d}", "question": "Describe the image .", "image": i,
                "chosen": "There is a red circle .", "rejected": "There is a blue star on the left ."}
               for i in range(8)]

    def load_image(seed):
        from PIL import Image
        return Image.new("RGB", (28, 28), (seed * 20, 100, 50))

    pairs = PreferencePairs(records, tok, load_image=load_image, image_size=cfg.vision_config.image_size,
                            image_tokens_per_image=cfg.image_tokens_per_image)
    return tok, model, pairs


def test_dpo_against_itself_is_log2_and_training_raises_the_margin(tmp_path):
    tok, model, pairs = _tiny_setup()
    add_reference_logps(model, pairs, batch_size=3)
    batch = collate_pairs([pairs[i] for i in range(4)], pad_id=tok.pad_id)
    assert batch["input_ids"].shape[0] == 8 and batch["pixel_values"].shape[0] == 8
    model.eval()
    loss, metrics = dpo_loss_fn(beta=0.1)(model, batch)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)

    def margin():
        with torch.no_grad():
            logps, _ = response_logps(model, collate_pairs([pairs[i] for i in range(8)], pad_id=tok.pad_id))
        chosen, rejected = logps.chunk(2)
        return (chosen - rejected).mean().item()

    before = margin()
    config = TrainConfig(out_dir=str(tmp_path / "dpo"), lr=5e-3, max_steps=6, global_batch_size=4,
                         micro_batch_size=2, warmup_ratio=0.0, log_every=1e9)
    train_dpo(model, pairs, config, beta=0.1, lora=None)
    assert margin() > before + 0.5


def test_lora_dpo_does_not_depend_on_what_the_process_drew_before(tmp_path):
    from recipes._dpo import LoraSettings

    results = []
    for run, draws in enumerate((0, 1000)):
        tok, model, pairs = _tiny_setup()
        add_reference_logps(model, pairs, batch_size=3)
        torch.rand(draws)  # what a collection stage before the training may have drawn
        config = TrainConfig(out_dir=str(tmp_path / f"dpo{run}"), lr=5e-3, max_steps=2, global_batch_size=4,
                             micro_batch_size=2, warmup_ratio=0.0, log_every=1e9)
        train_dpo(model, pairs, config, beta=0.1, lora=LoraSettings(r=4, alpha=8.0, dropout=0.05))
        results.append(model.state_dict())
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=0, msg=key)


def test_bench_world_step_times_the_variants_asked_for(capsys):
    from recipes import bench_world_step

    result = bench_world_step.main(["--steps", "1", "--threads", "1", "--stages", "grounding",
                                    "--variants", "float32", "by length+prefix", "bf16 (build)"])
    row = result["grounding"]
    assert set(row) == {"tokens_per_row", "float32", "by length+prefix", "bf16 (build)"}
    assert all(row[k] > 0 for k in row) and row["tokens_per_row"] > 9 + 32  # the image and the system prompt
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_bench_world_step_times_the_clip_variants():
    import dataclasses

    import lvlm.clip
    from recipes import bench_world_step
    from recipes.world_models import WORLD_PRESETS

    c = dataclasses.replace(WORLD_PRESETS["micro"], clip_batch=8)
    ms = bench_world_step.clip_step_ms(c, steps=1)
    assert set(ms) == set(bench_world_step.CLIP_VARIANTS) and all(v > 0 for v in ms.values())
    assert lvlm.clip.SHORT_SEQUENCE == 32  # restored after the fused-attention rounds


def test_a_batch_the_ranks_cannot_split_is_refused_with_a_flag_that_would():
    check_batch_splits(16, 8, 2)  # 16 = 2 ranks x 1 step x 8: fine
    with pytest.raises(ValueError, match=r"16 is not a multiple of --micro_batch_size 8 x 4 rank\(s\); "
                                         r"e.g. --micro_batch_size 4"):
        check_batch_splits(16, 8, 4)
    with pytest.raises(ValueError, match=r"e.g. --micro_batch_size 2$"):
        check_batch_splits(16, 3, 4)  # the largest micro-batch below 3 that splits 16 over 4 ranks
    with pytest.raises(ValueError, match=r"e.g. --global_batch_size 3$"):
        check_batch_splits(2, 1, 3)  # no micro-batch splits 2 over 3 ranks: the batch must change


def test_dpo_settings_that_would_fail_at_the_first_step_are_named_together():
    check_dpo_settings(beta=0.1, lr=1e-6, lora_r=None)
    check_dpo_settings(beta=0.1, lr=1e-6, lora_r=128)
    with pytest.raises(ValueError, match=r"^--beta must be > 0, got 0.0; --lr must be > 0, got -1.0; "
                                         r"--lora_r must be >= 1, got 0$"):
        check_dpo_settings(beta=0.0, lr=-1.0, lora_r=0)
