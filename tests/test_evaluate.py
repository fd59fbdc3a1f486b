"""Tests of recipes/evaluate.py: metric plumbing with stand-in answers of known quality, a micro model end to end,
and the COCO-style path on a hand-made annotation file."""

import json
import re

import pytest
import torch

from lvlm.checkpoint import save_lvlm
from lvlm.llava import LlavaForConditionalGeneration
from lvlm.tokenizer import Tokenizer
from lvlm.world import sample_scene
from lvlm.world.tokenizer import build_world_tokenizer
from recipes import evaluate as ev
from recipes.world_models import WORLD_PRESETS, init_llava_weights, lvlm_config

KEYS = ("chair_s", "chair_i", "recall", "pope_acc", "pope_f1", "yes_ratio", "mc_acc")
POPE_QUESTION = re.compile(r"Is there an? (.+) in the image\?")


@pytest.fixture(scope="module")
def world_set():
    return ev.world_eval_set(n_images=12)


def truthful(dataset, *, hallucinate=False, always_yes=False):
    """A stand-in generation function: descriptions name exactly the true objects (plus, with hallucinate,
    one absent object per image: a prior partner when there is one); yes/no answers follow the truth
    (or are always "Yes"); multiple-choice answers are the key's letter."""
    key = {(q["image"], q["question"]): q["answer"] for q in dataset.choice}
    shapes = sorted(dataset.synonyms)

    def generate(requests):
        out = []
        for r in requests:
            truth = dataset.truths[r.image]
            if r.question in dataset.description_prompts:
                named = list(truth)
                if hallucinate:
                    partners = dataset.partners[r.image]
                    named.append(partners[0] if partners else next(s for s in shapes if s not in truth))
                out.append(" ".join(f"There is a {name}." for name in named))
            elif POPE_QUESTION.fullmatch(r.question):
                asked = POPE_QUESTION.fullmatch(r.question).group(1)
                out.append("Yes" if always_yes or asked in truth else "No")
            else:
                out.append(key[(r.image, r.question)])
        return out

    return generate


def test_ground_truth_answers_score_perfectly(world_set, tmp_path):
    out = tmp_path / "metrics.json"
    metrics = ev.evaluate(None, None, world_set, generate_fn=truthful(world_set), out=out, verbose=False)
    assert metrics["chair_s"] == 0.0 and metrics["chair_i"] == 0.0
    assert metrics["recall"] == 1.0
    assert metrics["pope_acc"] == 1.0 and metrics["pope_f1"] == 1.0
    assert metrics["yes_ratio"] == 0.5  # POPE is balanced: k present and k absent per image
    assert metrics["mc_acc"] == 1.0
    assert json.loads(out.read_text()) == metrics


def test_always_yes_and_hallucinated_descriptions(world_set):
    metrics = ev.evaluate(None, None, world_set, verbose=False,
                          generate_fn=truthful(world_set, hallucinate=True, always_yes=True))
    for kind in ("", "_random", "_popular", "_adversarial"):
        assert metrics[f"yes_ratio{kind}"] == 1.0
        assert metrics[f"pope_acc{kind}"] == 0.5
        assert metrics[f"pope_f1{kind}"] == pytest.approx(2 / 3)  # precision 1/2, recall 1
    n = len(world_set.truths)
    assert metrics["chair_s"] == 1.0  # every description names one absent object
    assert metrics["chair_i"] == pytest.approx(n / (sum(len(t) for t in world_set.truths) + n))
    assert metrics["recall"] == 1.0
    with_partner = sum(bool(p) for p in world_set.partners)
    assert metrics["prior_share"] == pytest.approx(with_partner / n)


def test_each_distinct_question_is_generated_once(world_set):
    asked = []

    def counting(requests):
        asked.extend((r.image, r.question) for r in requests)
        return truthful(world_set)(requests)

    ev.evaluate(None, None, world_set, generate_fn=counting, verbose=False)
    assert len(asked) == len(set(asked))
    distinct_pope = {(q["image"], q["question"]) for q in world_set.pope}
    assert len(distinct_pope) < len(world_set.pope)  # positives recur across the three samplings
    assert len(asked) == len(world_set.images) + len(distinct_pope) + len(world_set.choice)


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("micro_llava")
    build_world_tokenizer(directory)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(lvlm_config(WORLD_PRESETS["micro"], Tokenizer.from_file(directory).vocab_size))
    init_llava_weights(model)
    save_lvlm(model, directory)
    return directory


def test_micro_model_end_to_end_writes_all_metrics(micro_checkpoint, tmp_path):
    from lvlm.checkpoint import load_lvlm

    model, tokenizer = load_lvlm(micro_checkpoint), Tokenizer.from_file(micro_checkpoint)
    out, details = tmp_path / "eval.json", tmp_path / "details.json"
    ev.evaluate(model, tokenizer, ev.world_eval_set(n_images=3), max_new_tokens=12, batch_size=4, out=out,
                details=details, verbose=False)
    metrics = json.loads(out.read_text())
    for key in KEYS:
        assert key in metrics
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert len(json.loads(details.read_text())["descriptions"]) == 3


# ---- COCO-style ------------------------------------------------------------------------------


@pytest.fixture
def coco_files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sample_scene(1).image().save(images / "one.png")
    sample_scene(2).image().save(images / "two.png")
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(["circle", "square", "triangle", "star", "cross"])]
    annotations = [{"id": 1, "image_id": 10, "category_id": 1}, {"id": 2, "image_id": 10, "category_id": 1},
                   {"id": 3, "image_id": 10, "category_id": 2}, {"id": 4, "image_id": 20, "category_id": 3}]
    data = {"images": [{"id": 10, "file_name": "one.png"}, {"id": 20, "file_name": "two.png"},
                       {"id": 30, "file_name": "unannotated.png"}],
            "annotations": annotations, "categories": categories}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("circle, disk\nsquare, box\ntriangle\nstar\ncross, plus sign\n")
    return path, images, synonyms


def test_coco_eval_set_builds_pope_like_the_paper(coco_files):
    path, images, synonyms = coco_files
    dataset = ev.coco_eval_set(path, images, synonyms, n_images=10)
    assert dataset.truths == [["circle", "square"], ["triangle"]]  # the unannotated image is skipped
    # image 0: 2 present, 3 absent -> k = 2; image 1: 1 present -> k = 1; per sampling 2k questions
    assert len(dataset.pope) == 3 * (4 + 2)
    negatives = {(q["image"], q["kind"]): set() for q in dataset.pope}
    for q in dataset.pope:
        if q["answer"] == "No":
            negatives[(q["image"], q["kind"])].add(POPE_QUESTION.fullmatch(q["question"]).group(1))
    # popular: by frequency over the file (triangle 1 image, cross and star 0; ties by name)
    assert negatives[(0, "popular")] == {"triangle", "cross"}
    assert negatives[(1, "popular")] == {"circle"}
    # adversarial: by co-occurrence with the image's objects (none co-occur here: ties by name)
    assert negatives[(0, "adversarial")] == {"cross", "star"}
    assert len(dataset.choice) == 2


def test_coco_path_with_stand_in_answers(coco_files, tmp_path):
    path, images, synonyms = coco_files
    dataset = ev.coco_eval_set(path, images, synonyms)

    def generate(requests):  # describe with synonyms ("disk", "box"), answer POPE from the annotations
        truth_words = {"circle": "disk", "square": "box", "triangle": "triangle"}
        out = []
        for r in requests:
            truth = dataset.truths[r.image]
            match = POPE_QUESTION.fullmatch(r.question)
            if r.question in dataset.description_prompts:
                out.append(" ".join(f"I see a {truth_words[t]}." for t in truth))
            elif match:
                out.append("yes" if match.group(1) in truth else "no")
            else:
                out.append("A")
        return out

    metrics = ev.evaluate(None, None, dataset, generate_fn=generate, verbose=False)
    assert metrics["chair_s"] == 0.0 and metrics["recall"] == 1.0
    assert metrics["pope_acc"] == 1.0
    assert metrics["mc_acc"] == sum(q["answer"] == "A" for q in dataset.choice) / len(dataset.choice)


def test_coco_errors_name_the_problem(coco_files, tmp_path):
    path, images, synonyms = coco_files
    partial = tmp_path / "partial.txt"
    partial.write_text("circle\nsquare\n")
    with pytest.raises(ValueError, match="triangle"):
        ev.coco_eval_set(path, images, partial)
    with pytest.raises(FileNotFoundError, match="one.png"):
        ev.coco_eval_set(path, tmp_path / "nowhere", synonyms)


def test_cli_on_a_coco_style_set(coco_files, micro_checkpoint, tmp_path):
    path, images, synonyms = coco_files
    out = tmp_path / "coco.json"
    ev.main(["--model", str(micro_checkpoint), "--annotations", str(path), "--images", str(images),
             "--synonyms", str(synonyms), "--out", str(out), "--max_new_tokens", "8"])
    metrics = json.loads(out.read_text())
    assert set(KEYS) <= set(metrics) and all(0.0 <= v <= 1.0 for v in metrics.values())


@pytest.mark.parametrize("flags, message", [(["--images", "somewhere"], "go with --annotations"),
                                            (["--synonyms", "somewhere"], "go with --annotations"),
                                            (["--batch_size", "0"], "--batch_size and --max_new_tokens must be >= 1")])
def test_flags_that_cannot_work_are_refused_not_ignored(flags, message, refusal, tmp_path):
    assert message in refusal(ev.main, flags + ["--out", str(tmp_path / "eval.json")])
    assert not (tmp_path / "eval.json").exists()
