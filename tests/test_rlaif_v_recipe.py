"""recipes/rlaif_v.py end to end at micro size: the files, summary.json, the RLAIF-V pairs file, a rerun,
the real-checkpoint path on a tiny saved model + JSONL + PNGs, and bad input refused before any output.

The micro world's labeler accepts nearly every claim (its models are trained for a few steps only), so
the world run swaps ``label_responses`` for a rule whose verdicts are known: a claim is rejected when
its question has an odd number of words. The scores, pairs and reference log-probs are then checked
against values recomputed here independently (the reference log-probs by a plain forward pass).
"""

import functools
import json

import pytest
import torch
from PIL import Image

import recipes.rlaif_v as rlaif_v
from lvlm.checkpoint import load_lvlm
from lvlm.tokenizer import Tokenizer, encode_conversation
from recipes.world_models import WORLD_PRESETS, ensure_world_models, render_world_image
from lvlm.world import object_synonyms
from rewards.claims import claim_to_question, repeated_claims, split_claims
from rewards.metrics import build_vocabulary, find_objects

PAIR_FIELDS = {"ds_name", "image", "image_path", "question", "chosen", "rejected", "origin_dataset", "origin_split",
               "idx", "chosen_score", "rejected_score", "ref_chosen_logp", "ref_rejected_logp"}
METRICS = {"chair_s", "chair_i", "recall", "pope_acc", "pope_f1", "yes_ratio", "mc_acc"}


def odd_words_rejected(labeler, tokenizer, image, question_lists, *, max_rows=64, expected=None):
    """A stand-in labeler: a question with an odd number of words is answered "no"."""
    expected = expected or [[True] * len(questions) for questions in question_lists]
    verdicts = [[(len(q.split()) % 2 == 0) == e for q, e in zip(questions, es)]
                for questions, es in zip(question_lists, expected)]
    return verdicts, [-sum(not v for v in vs) for vs in verdicts]


MICRO_ARGS = ["--preset", "micro", "--instructions_per_iteration", "8", "--n_samples", "4", "--max_new_tokens", "16",
              "--eval_images", "2", "--eval_max_new_tokens", "12"]


@pytest.fixture(scope="module")
def micro_models():
    return ensure_world_models(WORLD_PRESETS["micro"], verbose=False)


@pytest.fixture(scope="module")
def world_run(tmp_path_factory, micro_models):
    out = tmp_path_factory.mktemp("rlaif_v") / "run"
    patch = pytest.MonkeyPatch()
    patch.setattr(rlaif_v, "label_responses", odd_words_rejected)
    try:
        summary = rlaif_v.main(MICRO_ARGS + ["--out", str(out), "--best_of_n", "2"])
    finally:
        patch.undo()
    return out, summary


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_world_run_writes_the_layout_and_a_well_formed_summary(world_run):
    out, summary = world_run
    for name in ("config.json", "summary.json", "baseline/metrics.json", "iter1/samples.jsonl", "iter1/pairs.jsonl",
                 "iter1/metrics.json", "iter1/model/config.json", "iter1/model/model.safetensors",
                 "iter1/model/tokenizer.json", "iter1/model/complete", "best_of_n/metrics.json"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert {"recipe", "baseline", "iterations", "final", "seconds"} <= set(on_disk)
    assert on_disk["recipe"] == "rlaif_v" and len(on_disk["iterations"]) == 1
    assert on_disk["final"] == on_disk["iterations"][-1]
    assert on_disk["best_of_n"]["n"] == 2
    assert on_disk["changes"][0]["descriptions"]["n"] == 2  # item by item, on the 2 evaluation images
    for metrics in [on_disk["baseline"], on_disk["final"], on_disk["best_of_n"]["metrics"]]:
        assert METRICS <= set(metrics)
        assert all(0.0 <= metrics[k] <= 1.0 for k in METRICS)
    load_lvlm(out / "iter1" / "model")  # the saved model loads back


def test_samples_hold_n_responses_with_claims_verdicts_and_scores(world_run):
    out, _ = world_run
    samples = _lines(out / "iter1" / "samples.jsonl")
    assert [s["key"] for s in samples] == [f"{i:08d}" for i in range(8)]  # merged: no gaps, no duplicates
    for sample in samples:
        assert sample["origin_split"] == "train" and len(sample["responses"]) == 4
        for r in sample["responses"]:
            assert r["claims"] == split_claims(r["text"])  # divide: the rule-based splitter
            assert r["questions"] == [claim_to_question(c) for c in r["claims"]]
            expected = [len(q.split()) % 2 == 0 for q in r["questions"]]
            assert r["accepted"] == expected
            assert r["score"] == -sum(not a for a in expected) and r["n_claims"] == r["n_judged"]


def test_pairs_have_the_rlaif_v_fields_filters_and_reference_logps(world_run, micro_models):
    out, _ = world_run
    samples = {s["idx"]: s for s in _lines(out / "iter1" / "samples.jsonl")}
    pairs = _lines(out / "iter1" / "pairs.jsonl")
    assert len(pairs) >= 2  # enough for one DPO step at micro size
    per_instruction = {}
    for pair in pairs:
        assert PAIR_FIELDS <= set(pair)
        scores = {r["text"]: r["score"] for r in samples[pair["idx"]]["responses"]}
        assert scores[pair["chosen"]] == pair["chosen_score"] and scores[pair["rejected"]] == pair["rejected_score"]
        assert pair["chosen_score"] - pair["rejected_score"] >= 1
        assert pair["question"] == samples[pair["idx"]]["question"] and pair["image"] == pair["idx"]
        per_instruction[pair["idx"]] = per_instruction.get(pair["idx"], 0) + 1
    assert max(per_instruction.values()) <= 2

    # the reference (iteration 1: the SFT model) log-probs, recomputed by a plain forward pass
    model = load_lvlm(micro_models.sft)
    tokenizer = Tokenizer.from_file(micro_models.sft)
    world = WORLD_PRESETS["micro"].world
    pixels = rlaif_v.preprocess_image(render_world_image(world, pairs[0]["image"]),
                                      size=model.config.vision_config.image_size)[None]
    for side in ("chosen", "rejected"):
        encoded = encode_conversation(tokenizer, [(pairs[0]["question"], pairs[0][side])], num_images=1,
                                      image_tokens_per_image=model.config.image_tokens_per_image)
        ids, mask = encoded["input_ids"][None], encoded["assistant_mask"]
        with torch.no_grad():
            logps = model(ids, pixels)[0].float().log_softmax(-1)  # [T, V]
        positions = torch.nonzero(mask).flatten()
        expected = sum(logps[p - 1, ids[0, p]].item() for p in positions)
        assert pairs[0][f"ref_{side}_logp"] == pytest.approx(expected, abs=1e-3)


def test_dpo_moved_the_model(world_run, micro_models):
    out, _ = world_run
    before, after = load_lvlm(micro_models.sft), load_lvlm(out / "iter1" / "model")
    diffs = [(a - b).abs().max().item() for (_, a), (_, b) in
             zip(after.language_model.named_parameters(), before.language_model.named_parameters())]
    assert max(diffs) > 0
    vision = [(a - b).abs().max().item() for a, b in
              zip(after.vision_tower.parameters(), before.vision_tower.parameters())]
    assert max(vision) == 0  # the vision tower stays frozen


def test_a_rerun_reuses_everything_and_another_config_is_refused(world_run):
    out, summary = world_run
    samples_before = (out / "iter1" / "samples.jsonl").read_text()
    rerun = rlaif_v.main(MICRO_ARGS + ["--out", str(out), "--best_of_n", "2"])  # the real labeler: not asked again
    assert (out / "iter1" / "samples.jsonl").read_text() == samples_before
    assert rerun["iterations"] == summary["iterations"] and rerun["baseline"] == summary["baseline"]
    with pytest.raises(ValueError, match="different config"):
        rlaif_v.main(MICRO_ARGS + ["--out", str(out), "--beta", "0.5"])


# ---------------------------------------------------------------------------------------------
# the real-checkpoint path, small data
# ---------------------------------------------------------------------------------------------


def _write_images(folder, world, seeds):
    folder.mkdir()
    for seed in seeds:
        render_world_image(world, seed).save(folder / f"{seed}.png")


def test_real_path_on_a_saved_checkpoint_jsonl_and_pngs(tmp_path, micro_models, monkeypatch):
    monkeypatch.setattr(rlaif_v, "label_responses", odd_words_rejected)  # so that there are pairs to train on
    world = WORLD_PRESETS["micro"].world
    _write_images(tmp_path / "images", world, [11, 12, 13])
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"image": f"{s}.png", "question": "<image>\nDescribe this image in detail.",
                                        "idx": f"q{s}"}) + "\n" for s in [11, 12, 13]))
    out = tmp_path / "run"
    summary = rlaif_v.main(["--model", str(micro_models.sft), "--labeler", str(micro_models.labeler),
                            "--data", str(data), "--images", str(tmp_path / "images"), "--out", str(out),
                            "--iterations", "1", "--n_samples", "6", "--max_new_tokens", "8", "--collect_batch", "2",
                            "--micro_batch_size", "1", "--global_batch_size", "2", "--epochs", "1"])
    assert summary["baseline"] == {} and summary["iterations"] == [{}]  # no --eval_annotations: no evaluation
    samples = _lines(out / "iter1" / "samples.jsonl")
    assert [s["idx"] for s in samples] == ["q11", "q12", "q13"]
    assert samples[0]["question"] == "Describe this image in detail."  # the image marker is the template's job
    assert samples[0]["image"] == str(tmp_path / "images" / "11.png") and samples[0]["image_path"] == "11.png"
    pairs = _lines(out / "iter1" / "pairs.jsonl")
    assert pairs and all(PAIR_FIELDS <= set(p) and p["image"].endswith(".png") for p in pairs)
    assert (out / "iter1" / "model" / "complete").is_file() and (out / "iter1" / "model" / "tokenizer.json").is_file()
    before, after = load_lvlm(micro_models.sft), load_lvlm(out / "iter1" / "model")
    assert any(not torch.equal(a, b) for a, b in zip(after.parameters(), before.parameters()))  # DPO ran


def test_bad_input_is_refused_before_anything_is_written(tmp_path, micro_models):
    world = WORLD_PRESETS["micro"].world
    _write_images(tmp_path / "images", world, [11])
    base = ["--model", str(micro_models.sft), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "run")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "11.png", "question": "Describe."}) + "\n"
                   + json.dumps({"image": "11.png"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: needs a non-empty 'question'"):
        rlaif_v.main(base + ["--data", str(bad)])
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "99.png", "question": "Describe."}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl:1: .*99\.png"):
        rlaif_v.main(base + ["--data", str(missing)])
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps({"image": "11.png", "question": "Describe."}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"torn\.jsonl:2"):
        rlaif_v.main(base + ["--data", str(torn)])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        rlaif_v.main(base + ["--data", str(missing), "--labeler", str(tmp_path)])
    assert not (tmp_path / "run").exists()


def test_reject_repeats_counts_claims_that_restate_objects_as_rejected(tmp_path, micro_models, monkeypatch):
    monkeypatch.setattr(rlaif_v, "label_responses", odd_words_rejected)
    out = tmp_path / "run"
    rlaif_v.main(MICRO_ARGS + ["--out", str(out), "--reject_repeats", "true"])
    vocab = build_vocabulary(object_synonyms(WORLD_PRESETS["micro"].world))
    objects_of = functools.partial(find_objects, vocab=vocab)
    responses = [r for s in _lines(out / "iter1" / "samples.jsonl") for r in s["responses"]]
    for r in responses:
        repeated = repeated_claims(r["claims"], objects_of)
        by_labeler = [len(q.split()) % 2 == 0 for q in r["questions"]]
        assert r["repeated"] == repeated
        assert r["accepted"] == [a and not rep for a, rep in zip(by_labeler, repeated)]
        assert r["score"] == -sum(not a for a in r["accepted"])
    assert any(any(r["repeated"]) for r in responses), "no response of the micro run repeated an object"


def test_the_world_preset_picks_rlaif_v_settings_and_flags_still_win():
    default, _ = rlaif_v.resolve_config(["--world_preset", "default"])
    assert (default.reject_repeats, default.iterations) == (False, rlaif_v.WORLD_RLAIF_V.iterations) == (False, 2)
    f32, _ = rlaif_v.resolve_config(["--world_preset", "float32"])
    assert {name: getattr(f32, name) for name in rlaif_v.WORLD_RLAIF_V_ON["float32"]} == \
        rlaif_v.WORLD_RLAIF_V_ON["float32"] == {"reject_repeats": True, "iterations": 3}
    mine, _ = rlaif_v.resolve_config(["--world_preset", "float32", "--reject_repeats", "false", "--iterations", "2"])
    assert (mine.reject_repeats, mine.iterations) == (False, 2)
    paper, _ = rlaif_v.resolve_config(["--model", "some/dir", "--data", "x.jsonl"])
    assert paper.reject_repeats is False and paper.iterations == 4  # real checkpoints: the paper's


def test_reject_repeats_is_refused_on_a_real_run(tmp_path, micro_models):
    with pytest.raises(SystemExit):
        rlaif_v.main(["--model", str(micro_models.sft), "--data", str(tmp_path / "x.jsonl"), "--reject_repeats", "true",
                      "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--data", "--images", "--ptx_data", "--eval_synonyms"])
def test_real_data_flags_without_a_model_are_refused_not_ignored(flag, refusal):
    err = refusal(rlaif_v.resolve_config, ["--preset", "micro", flag, "somewhere"])
    assert f"{flag} need --model (without it, the built-in world runs)" in err


@pytest.mark.parametrize("flags, message", [(["--n_samples", "1"], "--n_samples must be >= 2"),
                                            (["--temperature", "0"], "--temperature must be > 0"),
                                            (["--top_p", "0"], "--top_p in (0, 1]")])
def test_sampling_settings_that_cannot_make_pairs_are_refused_up_front(flags, message, refusal):
    assert message in refusal(rlaif_v.resolve_config, ["--preset", "micro"] + flags)


# ---------------------------------------------------------------------------------------------
# small pieces, by hand
# ---------------------------------------------------------------------------------------------


def test_iteration_slices_wrap_around_a_short_file():
    items = list(range(5))
    assert rlaif_v.iteration_slice(items, 1, 2) == [0, 1]
    assert rlaif_v.iteration_slice(items, 3, 2) == [4, 0]
    assert rlaif_v.iteration_slice(items, 2, 0) == items  # 0: the whole file every iteration


def test_dpo_batch_is_lowered_for_few_pairs():
    config = rlaif_v.PAPER_RLAIF_V  # global batch 8, micro-batch 1
    assert rlaif_v.dpo_batch_size(config, 100, 2) == 8
    assert rlaif_v.dpo_batch_size(config, 5, 2) == 4
    assert rlaif_v.dpo_batch_size(config, 1, 2) == 0
    with pytest.raises(ValueError, match="not a multiple"):
        rlaif_v.dpo_batch_size(config, 100, 3)


def test_label_responses_scores_minus_rejected_claims(micro_models):
    """The real labeler path on one image: verdicts and scores agree with label_questions run directly."""
    from rewards.claims import labeler_prompt
    from rewards.labeler import label_questions

    labeler, tokenizer = load_lvlm(micro_models.labeler), Tokenizer.from_file(micro_models.labeler)
    image = render_world_image(WORLD_PRESETS["micro"].world, 5)
    questions = [["Is there a red circle?", "Is the blue star at the top?"], [], ["Is there a green cross?"]]
    verdicts, scores = rlaif_v.label_responses(labeler, tokenizer, image, questions)
    flat = [labeler_prompt(q) for qs in questions for q in qs]
    pixels = rlaif_v.preprocess_image(image, size=labeler.config.vision_config.image_size)[None]
    _, _, accepted = label_questions(labeler, tokenizer, pixels, flat,
                                     image_tokens_per_image=labeler.config.image_tokens_per_image)
    accepted = accepted.tolist()
    assert verdicts == [accepted[:2], [], accepted[2:]]
    assert scores == [-(2 - sum(accepted[:2])), 0, -(1 - sum(accepted[2:]))]


def test_divide_and_conquer_reads_a_short_answer_as_one_claim():
    """A yes/no instruction: "Yes"/"No" answers are one claim each, asked as the instruction (without the
    labeler suffix) and needing the labeler's same answer; a longer answer is split by the rules."""
    question = "Is there a red circle in the image? Please answer yes or no."
    texts = ["Yes.", "No, there is not.", "There is a red circle on the left. It is big."]
    claims, questions, needs_yes = rlaif_v.divide_and_conquer(question, texts)
    assert claims == [["Yes."], ["No, there is not."], ["There is a red circle on the left.", "It is big."]]
    assert questions == [["Is there a red circle in the image?"], ["Is there a red circle in the image?"],
                         ["Is there a red circle on the left?", "Is it big?"]]
    assert needs_yes == [[True], [False], [True, True]]
    # a description request is never read as a short answer, whatever its first word
    assert rlaif_v.divide_and_conquer("Describe the image.", ["No circle is here."])[2] == [[True]]


def test_label_responses_accepts_a_no_claim_when_the_labeler_says_no(micro_models):
    """expected=False flips the verdict: accepted exactly when p_no > p_yes (ties still rejected)."""
    from rewards.claims import labeler_prompt
    from rewards.labeler import label_questions

    labeler, tokenizer = load_lvlm(micro_models.labeler), Tokenizer.from_file(micro_models.labeler)
    image = render_world_image(WORLD_PRESETS["micro"].world, 5)
    questions = [["Is there a red circle?"], ["Is there a red circle?"], ["Is there a green cross?", "Is it big?"]]
    expected = [[True], [False], [False, True]]
    verdicts, scores = rlaif_v.label_responses(labeler, tokenizer, image, questions, expected=expected)
    pixels = rlaif_v.preprocess_image(image, size=labeler.config.vision_config.image_size)[None]
    p_yes, p_no, _ = label_questions(labeler, tokenizer, pixels, [labeler_prompt(q) for qs in questions for q in qs],
                                     image_tokens_per_image=labeler.config.image_tokens_per_image)
    says = [(bool(y > n), bool(n > y)) for y, n in zip(p_yes.tolist(), p_no.tolist())]
    want = [says[0][0]], [says[1][1]], [says[2][1], says[3][0]]
    assert verdicts == list(want)
    assert scores == [-(len(w) - sum(w)) for w in want]


def test_world_instructions_mix_in_yes_no_questions():
    from lvlm.world.vocab import SHAPE_SYNONYMS
    from rewards.claims import yes_no_answer

    world = WORLD_PRESETS["micro"].world
    plain = rlaif_v.world_instructions(world, 40)
    mixed = rlaif_v.world_instructions(world, 40, yes_no_share=0.5)
    assert plain == rlaif_v.world_instructions(world, 40, yes_no_share=0.0)  # the share 0 run is unchanged
    assert all(yes_no_answer(p["question"], "yes") is None for p in plain)
    asked = [m for m in mixed if yes_no_answer(m["question"], "yes") is not None]
    assert 10 <= len(asked) <= 30  # about half, drawn by seed
    words = {w for shape in world.shapes for w in (shape, *SHAPE_SYNONYMS[shape])}
    for m in asked:  # each an existence or colour question about one of the world's shapes
        assert m["question"].startswith("Is there") and any(f" {w} in the image?" in m["question"] for w in words)
    assert [m["idx"] for m in mixed] == [p["idx"] for p in plain]
    assert mixed == rlaif_v.world_instructions(world, 40, yes_no_share=0.5)  # deterministic
    with pytest.raises(ValueError, match="yes_no_share"):
        rlaif_v.world_instructions(world, 4, yes_no_share=1.5)


def test_model_based_divide_and_conquer_reads_the_splitters_dash_lists(micro_models):
    from rewards.claims import QUESTION_PROMPT, SPLIT_PROMPT

    def splitter(prompts):
        replies = []
        for prompt in prompts:
            if prompt.startswith(SPLIT_PROMPT):
                replies.append("### Facts:\n- The circle is red.\n- The star is blue.")
            else:
                assert prompt.startswith(QUESTION_PROMPT) and "- The star is blue." in prompt
                replies.append("### Questions:\n- Is the circle red?")  # one question short
        return replies

    claims, questions, needs_yes = rlaif_v.divide_and_conquer("Describe.", ["A red circle and a blue star."], splitter)
    assert claims == [["The circle is red.", "The star is blue."]] and questions == [["Is the circle red?"]]
    assert needs_yes == [[True]]

    model, tokenizer = load_lvlm(micro_models.sft), Tokenizer.from_file(micro_models.sft)
    texts = rlaif_v.text_generate_fn(model, tokenizer, max_new_tokens=4)(["List the facts.", "Rewrite this."])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
