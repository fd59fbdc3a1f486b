"""recipes/csr.py end to end on the micro world: files and summary, kill-and-rerun of the beam-search
collection, the same stage under torchrun with 2 processes, and the real-checkpoint path on small data."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lvlm.checkpoint import load_lvlm
from recipes import csr
from recipes.compare_runs import comparison_rows, read_run
from recipes._run import METRIC_KEYS
from recipes.world_models import WORLD_PRESETS, ensure_world_models, render_world_image

ROOT = Path(__file__).resolve().parent.parent
N_PROMPTS = 6  # the collection tests: 3 batches of 2 prompts


@pytest.fixture(scope="module")
def micro_models():
    return ensure_world_models(WORLD_PRESETS["micro"], verbose=False)


def shard_keys(directory: Path) -> dict:
    """{shard file name: [keys in file order]} of every pairs.rank*.jsonl."""
    return {p.name: [json.loads(line)["key"] for line in p.read_text().splitlines() if line.strip()]
            for p in sorted(directory.glob("pairs.rank*.jsonl"))}


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_pair_record(record: dict, lam: float) -> None:
    """A pair's rewards, recomputed from its per-sentence parts: R = lam R_I + (1 - lam) R_T per sentence
    (paper Eq. 3), a response's reward the sum over its sentences, chosen above rejected."""
    for side in ("chosen", "rejected"):
        sentences = record[f"{side}_sentences"]
        # The sentences, concatenated, are the response (decoding may drop the space before punctuation).
        assert sentences and "".join("".join(s["text"] for s in sentences).split()) == "".join(record[side].split())
        for s in sentences:
            assert s["R_I"] >= 0.0  # max(100 cos, 0)
            assert s["R"] == pytest.approx(lam * s["R_I"] + (1 - lam) * s["R_T"], abs=2e-3)
        assert record[f"{side}_reward"] == pytest.approx(sum(s["R"] for s in sentences), abs=2e-3)
        assert math.isfinite(record[f"ref_{side}_logp"]) and record[f"ref_{side}_logp"] < 0
    assert record["chosen"] != record["rejected"]
    assert record["chosen_reward"] > record["rejected_reward"]


def test_micro_run_files_summary_and_rerun(tmp_path, micro_models, monkeypatch):
    out = tmp_path / "run"
    summary = csr.main(["--preset", "micro", "--out", str(out)])

    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk) == {"recipe", "baseline", "iterations", "final", "seconds", "changes"}
    assert on_disk["recipe"] == "csr" and len(on_disk["iterations"]) == 1 and on_disk["seconds"] > 0
    change = on_disk["changes"][0]  # baseline -> iteration 1, item by item, on the same 4 test images
    assert change["descriptions"]["n"] == 4 and change["pope"]["n"] > 0 and 0 < change["pope"]["p"] <= 1
    for metrics in [on_disk["baseline"], on_disk["final"]] + on_disk["iterations"]:
        for key in METRIC_KEYS:
            assert 0.0 <= metrics[key] <= 1.0, key
    assert on_disk["final"] == on_disk["iterations"][-1] == json.loads((out / "iter1" / "metrics.json").read_text())
    assert on_disk["baseline"] == json.loads((out / "baseline" / "metrics.json").read_text())
    # recipes/compare_runs.py reads the run back: one row, baseline -> the one iteration, the same figures
    header, row = comparison_rows([read_run(out)], metrics=("chair_s",), digits=1)
    assert row[:3] == ["run", "csr", "-"] and row[3] == (f"{100 * on_disk['baseline']['chair_s']:.1f} -> "
                                                        f"{100 * on_disk['iterations'][0]['chair_s']:.1f}")

    records = read_jsonl(out / "iter1" / "pairs.jsonl")
    assert [r["key"] for r in records] == [f"{i:08d}" for i in range(4)]
    pairs = [r for r in records if "skip" not in r]
    assert pairs, "the micro run made no pair"
    for record in pairs:
        check_pair_record(record, lam=0.9)
        assert isinstance(record["image"], int)  # a training-split scene seed, never a test one
        assert record["image"] < WORLD_PRESETS["micro"].world.n_train

    model_dir = out / "iter1" / "model"
    for name in ("complete", "config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    before, after = load_lvlm(micro_models.sft).state_dict(), load_lvlm(model_dir).state_dict()
    assert set(before) == set(after)  # LoRA merged: the plain Hugging Face layout again
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("language_model.") and "proj" in k for k in changed)  # only LoRA targets

    # a rerun of the finished run does no work and gives the same table
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished iteration was collected again")

    monkeypatch.setattr(csr, "pair_collector", must_not_run)
    again = csr.main(["--preset", "micro", "--out", str(out)])
    assert again["iterations"] == summary["iterations"] and again["baseline"] == summary["baseline"]

    # the same directory with another config is refused before anything runs
    with pytest.raises(ValueError, match="lam: 0.9 there, 0.0 now"):
        csr.main(["--preset", "micro", "--out", str(out), "--lam", "0"])


def test_dpo_settings_that_cannot_train_are_refused_before_any_search(tmp_path, micro_models, monkeypatch):
    """The micro preset's DPO batch (2, micro-batches of 1) over 3 ranks, or beta 0: refused before the run
    directory or the first beam search, not after a whole collection (as they were)."""
    monkeypatch.setattr(csr, "get_world_size", lambda: 3)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="global_batch_size 2 is not a multiple of --micro_batch_size 1 x 3 rank"):
        csr.main(["--preset", "micro", "--out", str(out)])
    monkeypatch.setattr(csr, "get_world_size", lambda: 1)
    with pytest.raises(ValueError, match="--beta must be > 0, got 0.0"):  # would fail at the first DPO step
        csr.main(["--preset", "micro", "--out", str(out), "--beta", "0"])
    assert not out.exists()


def test_rank_mix_pairs_are_chosen_by_path_average(tmp_path, micro_models):
    """--normalize rank: each sentence's R is its negated rank mix (in [-1, 0)), and a response's reward is the
    released code's path average, sum of ranks / (sentences + 1), negated -- not the sum, which would always
    choose the shortest response."""
    out = tmp_path / "run"
    csr.main(["--preset", "micro", "--out", str(out), "--normalize", "rank", "--n_prompts", "4",
              "--stop_after", "collect"])
    pairs = [r for r in read_jsonl(out / "iter1" / "pairs.jsonl") if "skip" not in r]
    assert pairs, "the micro run made no pair"
    for record in pairs:
        for side in ("chosen", "rejected"):
            ranks = [-s["R"] for s in record[f"{side}_sentences"]]
            assert all(0.0 < r <= 1.0 for r in ranks)
            assert record[f"{side}_reward"] == pytest.approx(-sum(ranks) / (len(ranks) + 1), abs=2e-3)
        assert record["chosen_reward"] > record["rejected_reward"]


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def resumed_collection(tmp_path_factory, micro_models):
    """Iteration 1's collection killed during its second batch, then rerun; returns (dir, calls of the rerun)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    args = ["--preset", "micro", "--out", str(out), "--n_prompts", str(N_PROMPTS), "--stop_after", "collect"]
    real = csr.pair_collector
    batches = []

    def collector(fail_at):
        def make(*a, **k):
            work = real(*a, **k)

            def wrapped(items):
                batches.append([item["index"] for item in items])
                if len(batches) == fail_at:
                    raise Killed
                return work(items)
            return wrapped
        return make

    csr.pair_collector = collector(fail_at=2)
    try:
        with pytest.raises(Killed):
            csr.main(args)
        killed = shard_keys(out / "iter1")
        batches.clear()
        csr.pair_collector = collector(fail_at=None)
        csr.main(args)
    finally:
        csr.pair_collector = real
    return out, killed, list(batches)


def test_collection_killed_and_rerun_has_no_duplicates_or_gaps(resumed_collection):
    out, killed, rerun_batches = resumed_collection
    assert killed == {"pairs.rank0.jsonl": ["00000000", "00000001"]}  # the first batch landed, then the kill
    assert rerun_batches == [[2, 3], [4, 5]]  # the rerun did only what was missing
    assert shard_keys(out / "iter1") == {"pairs.rank0.jsonl": [f"{i:08d}" for i in range(N_PROMPTS)]}
    merged = read_jsonl(out / "iter1" / "pairs.jsonl")
    assert [r["key"] for r in merged] == [f"{i:08d}" for i in range(N_PROMPTS)]
    for record in merged:
        if "skip" not in record:
            check_pair_record(record, lam=0.9)


def test_torchrun_two_processes_collect_the_same_pairs(tmp_path, resumed_collection):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "recipes/csr.py", "--preset", "micro", "--out", str(out), "--n_prompts", str(N_PROMPTS),
               "--stop_after", "collect"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert shard_keys(out / "iter1") == {  # rank r took items r, r + 2, ...
        "pairs.rank0.jsonl": ["00000000", "00000002", "00000004"],
        "pairs.rank1.jsonl": ["00000001", "00000003", "00000005"]}
    two = read_jsonl(out / "iter1" / "pairs.jsonl")
    one = read_jsonl(resumed_collection[0] / "iter1" / "pairs.jsonl")
    assert [r["key"] for r in two] == [f"{i:08d}" for i in range(N_PROMPTS)]
    # a prompt's search depends on its seed only: the same pairs as one process in other batches
    # (texts exactly; numbers up to the float noise of other batch shapes)
    for a, b in zip(one, two):
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], abs=1e-3), key
            elif key.endswith("_sentences"):
                assert [s["text"] for s in a[key]] == [s["text"] for s in b[key]]
                assert [s["R"] for s in a[key]] == pytest.approx([s["R"] for s in b[key]], abs=1e-3)
            else:
                assert a[key] == b[key], key


def test_real_checkpoint_path_on_small_data(tmp_path, micro_models):
    """--model/--clip/--data/--images with saved checkpoints, PNG files and a JSONL + a LLaVA JSON file."""
    world = WORLD_PRESETS["micro"].world
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        render_world_image(world, seed).save(images / f"{seed}.png")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"image": f"{s}.png", "question": "Describe this image in detail."}) + "\n"
                            for s in range(3)))
    base = ["--preset", "micro", "--model", str(micro_models.sft), "--clip", str(micro_models.clip),
            "--images", str(images), "--ptx_coef", "0"]  # the world presets' ptx term needs --ptx_data here

    # bad input: named by file and line, raised before the output directory exists
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "0.png", "question": "Describe."}) + "\n" + json.dumps({"image": "0.png"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: needs a non-empty 'question'"):
        csr.main(base + ["--data", str(bad), "--out", str(tmp_path / "x")])
    bad.write_text(json.dumps({"image": "0.png", "question": "Q"}) + "\n" + json.dumps({"image": "9.png", "question": "Q"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"bad\.jsonl:2: .*9\.png"):
        csr.main(base + ["--data", str(bad), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()

    # LLaVA conversations: the first human turn is the prompt, without its <image> marker
    conversations = tmp_path / "conv.json"
    conversations.write_text(json.dumps([{"image": "1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in this image?"}, {"from": "gpt", "value": "A shape."}]}]))
    assert csr.load_prompt_records(conversations, images) == [
        {"image": str(images / "1.png"), "question": "What is in this image?"}]

    out = tmp_path / "run"
    summary = csr.main(base + ["--data", str(data), "--out", str(out)])
    assert summary["baseline"] == {} and summary["iterations"] == [{}]  # no evaluation set given: skipped
    records = read_jsonl(out / "iter1" / "pairs.jsonl")
    assert len(records) == 3 and all(r["image"].endswith(".png") for r in records)
    assert (out / "iter1" / "model" / "complete").is_file()
    assert (out / "iter1" / "model" / "tokenizer.json").is_file()

    # the ptx term replays SFT conversations (LLaVA's JSON) beside the pairs; without them, a clear error
    with pytest.raises(ValueError, match="--ptx_data"):
        csr.main(base + ["--data", str(data), "--out", str(tmp_path / "y"), "--ptx_coef", "1"])
    broken = tmp_path / "sft_bad.json"
    broken.write_text(json.dumps([{"image": "1.png", "conversations": [{"from": "human", "value": "Q"}]}]))
    with pytest.raises(ValueError, match=r"sft_bad\.json record 0: the last message is a question"):
        csr.main(base + ["--data", str(data), "--out", str(tmp_path / "y"), "--ptx_coef", "1", "--ptx_data", str(broken)])
    assert not (tmp_path / "y").exists()
    csr.main(base + ["--data", str(data), "--out", str(tmp_path / "ptx"), "--ptx_coef", "1", "--ptx_data",
                     str(conversations)])
    timings = json.loads((tmp_path / "ptx" / "iter1" / "timings.json").read_text())
    assert timings["dpo"]["ptx_nll"] > 0  # the replayed conversation's answer NLL was in the loss


def test_the_world_preset_picks_csr_settings_and_flags_still_win():
    from recipes.csr import WORLD_CSR, WORLD_CSR_ON, parse_config

    default, _ = parse_config(["--world_preset", "default"])
    assert (default.redundant_cos, default.w_sft, default.beta) == (WORLD_CSR.redundant_cos, WORLD_CSR.w_sft,
                                                                    WORLD_CSR.beta) == (None, 1.0, 0.1)
    f32, _ = parse_config(["--world_preset", "float32"])
    assert {name: getattr(f32, name) for name in WORLD_CSR_ON["float32"]} == WORLD_CSR_ON["float32"]
    assert f32.redundant_cos is not None and f32.beta != WORLD_CSR.beta
    mine, _ = parse_config(["--world_preset", "float32", "--w_sft", "1", "--redundant_cos", "none", "--beta", "0.1"])
    assert (mine.redundant_cos, mine.w_sft, mine.beta) == (None, 1.0, 0.1)  # "none" sets a field back to None
    paper, _ = parse_config(["--model", "some/dir"])
    assert paper.redundant_cos is None and paper.w_sft == 0.0 and paper.beta == 0.1  # real checkpoints: the paper's


@pytest.mark.parametrize("flag", ["--data", "--clip", "--ptx_data", "--eval_annotations"])
def test_real_data_flags_without_a_model_are_refused_not_ignored(flag, refusal):
    err = refusal(csr.parse_config, ["--preset", "micro", flag, "somewhere"])
    assert f"{flag} need --model (without it, the built-in world runs)" in err


@pytest.mark.parametrize("flags, message", [(["--k", "0"], "--n_candidates and --k must be >= 1"),
                                            (["--n_candidates", "0"], "--n_candidates and --k must be >= 1"),
                                            (["--temperature", "0"], "--temperature must be > 0")])
def test_search_settings_that_cannot_make_pairs_are_refused_up_front(flags, message, refusal):
    assert message in refusal(csr.parse_config, ["--preset", "micro"] + flags)
