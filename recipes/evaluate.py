"""Hallucination evaluation: CHAIR on generated descriptions, POPE, multiple choice.

    python recipes/evaluate.py                                   # the world's SFT model, 200 test images
    python recipes/evaluate.py --model runs/csr/iter3            # any LLaVA directory, on the world
    python recipes/evaluate.py --model DIR --annotations instances_val2014.json --images val2014/ \\
        --synonyms synonyms.txt --n_images 500                   # a real checkpoint, COCO-style

What is measured, per image of the evaluation set (``EvalSet``):

- a description, generated greedily for the prompt "Describe this image in detail." (at most
  ``max_new_tokens`` tokens, stopping at "</s>"): CHAIR_s, CHAIR_i and recall against the image's
  objects (``rewards.metrics.chair``; Rohrbach et al. 2018);
- POPE's yes/no questions "Is there a {object} in the image?" with random, popular and adversarial
  negatives (Li et al. 2023): accuracy, F1 and yes-ratio, overall and per negative sampling;
- multiple-choice questions answered with the option's letter: accuracy.

Yes/no and multiple-choice answers come from a short greedy generation (``answer_tokens`` tokens),
read with ``rewards.metrics.parse_yes_no`` / ``parse_choice``: that is how the model is used and how
the POPE and LLaVA benchmark scripts read answers (an answer with neither "yes" nor "no" counts as
"no"). Identical (image, question) pairs — POPE's positives recur across the three samplings — are
generated once. Every answer comes from ``generate_fn(requests) -> texts``, which can be replaced
(tests pass stand-ins with known answers); the default batches greedy decoding on ``search.generate``.

Sizes. The world's set (``world_eval_set``): the first 200 test-split images by default; per image
one description, k present + k absent POPE questions per sampling (k = min(3, #present, #absent)),
one multiple-choice question per object: about 200 descriptions, 2,800 POPE questions (at most
6 distinct per image: there are 6 shapes) and 500 multiple-choice questions; about 20 s on 2 CPU
cores for the default world model. A COCO-style set (``coco_eval_set``) is built from an instances
file: the objects of an image are its annotated categories, POPE's questions are drawn the same way
(popular = most frequent categories of the file, adversarial = most co-occurring with the image's),
and one multiple-choice question asks which of four categories is in the image.

The metrics (fractions in [0, 1]) are returned, printed as a table and written to ``out`` (JSON,
atomically); the generated texts and answers go to ``details`` when given, and ``changes_between``
compares two such files item by item (how many items turned right, how many wrong, and whether
that is more than chance: ``rewards.paired``).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm.image import load_image, preprocess_image  # noqa: E402
from lvlm.records import read_json, write_json_atomic  # noqa: E402
from lvlm.tokenizer import Tokenizer, encode_prompt  # noqa: E402
from rewards.metrics import build_vocabulary, chair, load_synonyms, multiple_choice_accuracy, parse_yes_no, pope  # noqa: E402
from rewards.paired import paired_change  # noqa: E402

DESCRIPTION_PROMPT = "Describe this image in detail."
POPE_TEMPLATE = "Is there {article} {object} in the image?"
MC_SUFFIX = " Answer with the option's letter from the given choices directly."  # LLaVA-1.5's instruction
LETTERS = "ABCD"
POPE_KINDS = ("random", "popular", "adversarial")

# ---------------------------------------------------------------------------------------------
# the evaluation set
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """Images with their ground truth and questions.

    images: per image, a PIL image or a file path (loaded when needed). truths: per image, its objects
    (canonical names or synonyms of ``synonyms``). synonyms: {canonical object: [synonym phrases]}
    (``rewards.metrics.build_vocabulary``'s table). description_prompts: per image, the request for a
    description. pope: {"image": index, "question", "answer": "Yes"/"No", "kind": one of POPE_KINDS}.
    choice: {"image": index, "question" (options and instruction included), "answer": letter}.
    partners: optional, per image, the absent objects the language prior pairs with present ones
    (the world's ``hallucination_candidates``), to report which share of hallucinations they are.
    """

    name: str
    images: list
    truths: list
    synonyms: dict
    description_prompts: list
    pope: list = field(default_factory=list)
    choice: list = field(default_factory=list)
    partners: list | None = None

    def __post_init__(self):
        n = len(self.images)
        if not n:
            raise ValueError(f"EvalSet {self.name!r}: no images")
        for name in ("truths", "description_prompts") + (("partners",) if self.partners is not None else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(f"EvalSet {self.name!r}: {len(getattr(self, name))} {name} for {n} images")
        for what in ("pope", "choice"):
            for q in getattr(self, what):
                if not 0 <= q["image"] < n:
                    raise ValueError(f"EvalSet {self.name!r}: a {what} question refers to image {q['image']} of {n}")


def world_eval_set(world=None, *, n_images: int = 200, split: str = "test") -> EvalSet:
    """The world's evaluation set: the first ``n_images`` scenes of ``split`` (see the module docstring)."""
    from lvlm.world import (DEFAULT_CONFIG, hallucination_candidates, multiple_choice_questions, object_synonyms,
                            pope_questions, scenes)

    world = world or DEFAULT_CONFIG
    chosen = list(scenes(split, world, limit=n_images))
    pope_items, choice_items = [], []
    for i, scene in enumerate(chosen):
        for kind in POPE_KINDS:
            for q in pope_questions(scene, kind):
                pope_items.append({"image": i, "question": q.question, "answer": q.answer, "kind": kind})
        for q in multiple_choice_questions(scene):
            choice_items.append({"image": i, "question": q.question, "answer": q.answer})
    return EvalSet(
        name=f"world-{split}", images=[scene.image() for scene in chosen], truths=[list(s.shapes) for s in chosen],
        synonyms=object_synonyms(world), description_prompts=[DESCRIPTION_PROMPT] * len(chosen),
        pope=pope_items, choice=choice_items, partners=[list(hallucination_candidates(s)) for s in chosen],
    )


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def coco_eval_set(annotations: str | Path, images: str | Path, synonyms: str | Path | None = None, *,
                  n_images: int = 500, seed: int = 0, pope_per_image: int = 3) -> EvalSet:
    """An evaluation set from a COCO-style instances file (``images``, ``annotations``, ``categories``).

    The objects of an image are the names of its annotated categories; images without annotations are
    skipped; ``n_images`` are drawn with ``random.Random(seed)``. ``synonyms``: a CHAIR synonym file
    (``rewards.metrics.load_synonyms``); every category name must be one of its phrases; without it,
    the category names alone. POPE (Li et al. 2023, Sec. 4.1): per image k = min(pope_per_image,
    #present, #absent) present categories and k absent ones, chosen at random, by frequency over the
    whole file (popular) or by co-occurrence with the image's categories (adversarial). One
    multiple-choice question per image: "Which of these objects is in the image?" with one present and
    three absent categories.
    """
    annotations, images = Path(annotations), Path(images)
    data = read_json(annotations, "annotation file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{annotations}: expected a list under {key!r} (a COCO instances file)")
    try:
        names = {c["id"]: c["name"] for c in data["categories"]}
        files = {im["id"]: im["file_name"] for im in data["images"]}
        present: dict = {}
        for k, a in enumerate(data["annotations"]):
            if a["category_id"] not in names:
                raise ValueError(f"{annotations}: annotation {k} has unknown category_id {a['category_id']}")
            if a["image_id"] not in files:
                raise ValueError(f"{annotations}: annotation {k} has unknown image_id {a['image_id']}")
            present.setdefault(a["image_id"], set()).add(names[a["category_id"]])
    except KeyError as e:
        raise ValueError(f"{annotations}: an entry lacks the key {e}") from None

    table = load_synonyms(str(synonyms)) if synonyms is not None else {name: [] for name in names.values()}
    vocab = build_vocabulary(table)
    unknown = []
    for name in sorted(set(names.values())):
        try:
            vocab.canonical(name)
        except ValueError:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{synonyms}: categories {unknown[:10]} are not in the synonym table")
    canonical = {name: vocab.canonical(name) for name in names.values()}
    all_objects = sorted(set(canonical.values()))
    frequency = Counter(o for cats in present.values() for o in {canonical[c] for c in cats})
    co_occurrence = Counter()
    for cats in present.values():
        objs = {canonical[c] for c in cats}
        for a in objs:
            for b in objs:
                if a != b:
                    co_occurrence[(a, b)] += 1

    rng = random.Random(seed)
    ids = sorted(present)
    chosen = sorted(rng.sample(ids, min(n_images, len(ids))))
    missing = [str(images / files[i]) for i in chosen if not (images / files[i]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) named in {annotations} not found under {images}: "
                                + ", ".join(missing[:5]))
    truths, pope_items, choice_items = [], [], []
    for index, image_id in enumerate(chosen):
        objs = sorted({canonical[c] for c in present[image_id]})
        absent = [o for o in all_objects if o not in objs]
        truths.append(objs)
        k = min(pope_per_image, len(objs), len(absent))
        for kind in POPE_KINDS:
            positives = rng.sample(objs, k)
            if kind == "random":
                negatives = rng.sample(absent, k)
            elif kind == "popular":
                negatives = sorted(absent, key=lambda o: (-frequency[o], o))[:k]
            else:
                negatives = sorted(absent, key=lambda o: (-sum(co_occurrence[(p, o)] for p in objs), o))[:k]
            for obj, answer in [(o, "Yes") for o in positives] + [(o, "No") for o in negatives]:
                pope_items.append({"image": index, "question": POPE_TEMPLATE.format(article=_article(obj), object=obj),
                                   "answer": answer, "kind": kind})
        if objs and len(absent) >= 3:
            options = [rng.choice(objs)] + rng.sample(absent, 3)
            right = options[0]
            rng.shuffle(options)
            listed = " ".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
            choice_items.append({"image": index, "question": f"Which of these objects is in the image? {listed}{MC_SUFFIX}",
                                 "answer": LETTERS[options.index(right)]})
    return EvalSet(name=f"coco:{annotations.name}", images=[str(images / files[i]) for i in chosen], truths=truths,
                   synonyms=table, description_prompts=[DESCRIPTION_PROMPT] * len(chosen), pope=pope_items,
                   choice=choice_items)


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------


class Request(NamedTuple):
    """One generation: the question about image ``image`` (an index into the EvalSet), at most ``max_new_tokens``."""

    image: int
    question: str
    max_new_tokens: int


def greedy_generate_fn(model, tokenizer: Tokenizer, dataset: EvalSet, *, batch_size: int = 64,
                       progress: bool = True) -> Callable[[Sequence[Request]], list[str]]:
    """The default ``generate_fn``: greedy decoding with ``search.generate``, ``batch_size`` prompts at a time.

    Prompts are the vicuna_v1 template with the image (``lvlm.tokenizer.encode_prompt``); images are
    preprocessed once each (LLaVA-1.5's pad-to-square, at the vision tower's size) and kept. Generation
    stops at the tokenizer's end ids; the returned text has them removed.
    """
    from recipes._common import Progress
    from search.engine import generate

    config = model.config
    size, per_image = config.vision_config.image_size, config.image_tokens_per_image
    pixels: dict = {}

    def image_tensor(i: int) -> torch.Tensor:
        if i not in pixels:
            source = dataset.images[i]
            pixels[i] = preprocess_image(source if not isinstance(source, (str, Path)) else load_image(source),
                                         size=size)[None]
        return pixels[i]

    stop = list(tokenizer.stop_ids)

    def generate_fn(requests: Sequence[Request]) -> list[str]:
        texts = [""] * len(requests)
        order = sorted(range(len(requests)), key=lambda r: (requests[r].max_new_tokens, len(requests[r].question)))
        bar = Progress("generate", len(requests), unit="prompts", enabled=progress and len(requests) > batch_size)
        was_training = model.training
        model.eval()
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            prompts = [(encode_prompt(tokenizer, requests[r].question, image_tokens_per_image=per_image)["input_ids"],
                        image_tensor(requests[r].image)) for r in chunk]
            longest = max(requests[r].max_new_tokens for r in chunk)
            generations = generate(model, prompts, max_new_tokens=longest, temperature=0.0, stop_ids=stop)
            for r, g in zip(chunk, generations):
                tokens = [t for t in g.tokens[: requests[r].max_new_tokens] if t not in stop]
                texts[r] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(chunk))
        model.train(was_training)
        return texts

    return generate_fn


# ---------------------------------------------------------------------------------------------
# the evaluation
# ---------------------------------------------------------------------------------------------

METRIC_KEYS = ("chair_s", "chair_i", "recall", "pope_acc", "pope_f1", "yes_ratio", "mc_acc")


def _pope_metrics(items: list, answers: list, suffix: str = "") -> dict:
    result = pope([parse_yes_no(a) for a in answers], [q["answer"] for q in items])
    return {f"pope_acc{suffix}": result["accuracy"], f"pope_f1{suffix}": result["f1"],
            f"yes_ratio{suffix}": result["yes_ratio"]}


def evaluate(model, tokenizer, dataset: EvalSet, *, generate_fn: Callable | None = None, batch_size: int = 64,
             max_new_tokens: int = 128, answer_tokens: int = 6, out: str | Path | None = None,
             details: str | Path | None = None, verbose: bool = True) -> dict:
    """Generate, score, print and save; returns the metrics (fractions in [0, 1]).

    model, tokenizer: the LLaVA model and its ``Tokenizer`` (both may be None when ``generate_fn`` is
    given). generate_fn: ``list[Request] -> list[str]`` (default ``greedy_generate_fn``). max_new_tokens:
    the description budget; answer_tokens: the yes/no and multiple-choice budget.

    Keys: chair_s, chair_i, recall; pope_acc, pope_f1, yes_ratio overall and with suffixes _random,
    _popular, _adversarial; mc_acc; for sets with ``partners``, prior_share (hallucinated mentions that
    name an absent prior partner of the image's objects / all hallucinated mentions; 0 when none).
    """
    if generate_fn is None:
        if model is None or tokenizer is None:
            raise ValueError("evaluate: give a model and tokenizer, or a generate_fn")
        generate_fn = greedy_generate_fn(model, tokenizer, dataset, batch_size=batch_size, progress=verbose)

    # 1. descriptions -> CHAIR
    descriptions = generate_fn([Request(i, p, max_new_tokens) for i, p in enumerate(dataset.description_prompts)])
    vocab = build_vocabulary(dataset.synonyms)
    scored = chair(descriptions, dataset.truths, vocab)
    metrics = {"chair_s": scored["chair_s"], "chair_i": scored["chair_i"], "recall": scored["recall"]}

    # 2. yes/no and multiple choice, each distinct (image, question) generated once
    questions = dataset.pope + dataset.choice
    distinct = list(dict.fromkeys((q["image"], q["question"]) for q in questions))
    replies = generate_fn([Request(i, text, answer_tokens) for i, text in distinct]) if distinct else []
    reply = dict(zip(distinct, replies))
    pope_answers = [reply[(q["image"], q["question"])] for q in dataset.pope]
    if dataset.pope:
        metrics.update(_pope_metrics(dataset.pope, pope_answers))
        for kind in POPE_KINDS:
            picked = [(q, a) for q, a in zip(dataset.pope, pope_answers) if q["kind"] == kind]
            if picked:
                metrics.update(_pope_metrics([q for q, _ in picked], [a for _, a in picked], f"_{kind}"))
    else:
        metrics.update({"pope_acc": 0.0, "pope_f1": 0.0, "yes_ratio": 0.0})
    choice_answers = [reply[(q["image"], q["question"])] for q in dataset.choice]
    metrics["mc_acc"] = (multiple_choice_accuracy(choice_answers, [q["answer"] for q in dataset.choice])["accuracy"]
                         if dataset.choice else 0.0)

    # 3. which hallucinations the language prior explains (the world only)
    if dataset.partners is not None:
        bad = [(m, i) for i, r in enumerate(scored["per_response"]) for m in r["hallucinated"]]
        from_prior = sum(m in {vocab.canonical(p) for p in dataset.partners[i]} for m, i in bad)
        metrics["prior_share"] = from_prior / len(bad) if bad else 0.0

    if verbose:
        print_metrics(metrics, title=f"evaluation on {dataset.name}: {len(dataset.images)} images, "
                                     f"{len(dataset.pope)} POPE and {len(dataset.choice)} multiple-choice questions")
    if out is not None:
        write_json_atomic(out, metrics)
    if details is not None:
        write_json_atomic(details, {
            "descriptions": [{"image": i, "truth": list(t), "text": d, "hallucinated": r["hallucinated"]}
                             for i, (t, d, r) in enumerate(zip(dataset.truths, descriptions, scored["per_response"]))],
            "pope": [dict(q, reply=a) for q, a in zip(dataset.pope, pope_answers)],
            "choice": [dict(q, reply=a) for q, a in zip(dataset.choice, choice_answers)],
        })
    return metrics


def print_metrics(metrics: dict, title: str = "metrics", file=None) -> None:
    """A two-column table of the metrics, as percentages."""
    file = file or sys.stdout
    print(title, file=file)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {100 * value:6.1f}%", file=file)
    file.flush()


def changes_between(before: dict, after: dict) -> dict:
    """Two ``details`` of ``evaluate`` on the same set, item by item (``rewards.paired.paired_change``):
    ``{"descriptions": {...}, "pope": {...}}``, each with ``better`` / ``worse`` counts and the sign
    test's ``p``. A description is right when it names no hallucinated object; a POPE answer when it
    is read as the label (an answer with neither word counts as "no", as in ``pope``)."""
    for part in ("descriptions", "pope"):
        keys = [[(item["image"], item.get("question")) for item in details[part]] for details in (before, after)]
        if keys[0] != keys[1]:
            raise ValueError(f"changes_between: the two evaluations' {part} are not the same items "
                             f"({len(keys[0])} and {len(keys[1])}); compare runs on the same evaluation set")

    def pope_right(details):
        return [bool(parse_yes_no(q["reply"])) == parse_yes_no(q["answer"]) for q in details["pope"]]

    def clean(details):
        return [not d["hallucinated"] for d in details["descriptions"]]

    return {"descriptions": paired_change(clean(before), clean(after)),
            "pope": paired_change(pope_right(before), pope_right(after))}


# ---------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    model: str | None = None  # a LLaVA directory; None: the world's SFT model
    annotations: str | None = None  # COCO-style instances JSON; None: the world's test split
    images: str | None = None
    synonyms: str | None = None
    out: str = "runs/eval.json"
    details: str | None = None
    n_images: int = 200
    batch_size: int = 64
    max_new_tokens: int = 128
    answer_tokens: int = 6
    world_preset: str = "auto"  # the world's models: "auto" (float32 on a CPU, default with a GPU), or a WORLD_PRESETS name
    split: str = "test"
    seed: int = 0


def main(argv=None) -> dict:
    from lvlm.checkpoint import load_lvlm
    from recipes._common import add_config_arguments, config_from_args, print_config, set_cpu_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, EvalConfig())
    config = config_from_args(parser.parse_args(argv), EvalConfig())
    set_cpu_threads()
    print_config(config, "evaluate")
    if config.n_images < 1 or config.batch_size < 1 or config.max_new_tokens < 1:
        parser.error(f"--n_images, --batch_size and --max_new_tokens must be >= 1, got {config.n_images}, "
                     f"{config.batch_size}, {config.max_new_tokens}")
    if config.annotations is None and (config.images is not None or config.synonyms is not None):
        parser.error("--images / --synonyms go with --annotations (a COCO-style evaluation); without it the "
                     "built-in world's test split is used")
    if config.annotations is not None:
        if config.model is None or config.images is None:
            parser.error("a COCO-style evaluation needs --model, --annotations and --images")
        dataset = coco_eval_set(config.annotations, config.images, config.synonyms, n_images=config.n_images,
                                seed=config.seed)
        model_dir = Path(config.model)
    else:
        from recipes.world_models import ensure_world_models, world_preset

        preset = world_preset(config.world_preset)
        model_dir = Path(config.model) if config.model else ensure_world_models(preset).sft
        dataset = world_eval_set(preset.world, n_images=config.n_images, split=config.split)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_lvlm(model_dir, device=device)
    tokenizer = Tokenizer.from_file(model_dir)
    return evaluate(model, tokenizer, dataset, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                    answer_tokens=config.answer_tokens, out=config.out, details=config.details)


if __name__ == "__main__":
    main()
