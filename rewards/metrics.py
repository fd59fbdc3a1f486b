"""Hallucination metrics against ground truth: CHAIR, POPE and multiple-choice accuracy.

No judge model is involved: every number here is computed from the model's text and the
known contents of the image. The same code scores the built-in synthetic world (objects such
as "red circle", with synonyms such as "disk" for "circle") and COCO (80 classes, synonyms
read from a text file), because everything is driven by an `ObjectVocabulary`.

Sources:
- CHAIR: Rohrbach et al., "Object Hallucination in Image Captioning" (EMNLP 2018), and the
  released `utils/chair.py` of that paper.
- POPE: Li et al., "Evaluating Object Hallucination in Large Vision-Language Models"
  (EMNLP 2023), and its released evaluation script.

The synonym file (`load_synonyms`)
----------------------------------
One line per object class::

    # lines starting with "#" and blank lines are ignored
    person, girl, boy, man, woman, people, child
    dining table, table, desk
    teddy bear, teddybear

The first comma-separated entry is the canonical name, the rest are synonyms (words or
multi-word phrases). Matching is case-insensitive; hyphens and punctuation count as spaces
("hot-dog" == "hot dog"). Plural forms are added automatically (see `plural_forms`), so list
singular forms. This is the layout of the CHAIR release's `data/synonyms.txt` (entries
separated by ", "), so that file can be read as is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

__all__ = [
    "ObjectVocabulary",
    "plural_forms",
    "build_vocabulary",
    "attribute_object_table",
    "load_synonyms",
    "find_objects",
    "score_response",
    "chair",
    "parse_yes_no",
    "parse_yes_no_pope",
    "pope",
    "parse_choice",
    "multiple_choice_accuracy",
]


# ----------------------------------------------------------------------------------------
# Words and plurals
# ----------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    """Lower-cased alphanumeric words; every other character is a separator."""
    return _WORD.findall(text.lower())


# Plurals that the s / es / ies rules get wrong. Nouns whose plural equals the singular
# ("sheep") map to themselves.
_IRREGULAR_PLURALS = {
    "person": "people",
    "man": "men",
    "woman": "women",
    "child": "children",
    "mouse": "mice",
    "goose": "geese",
    "foot": "feet",
    "tooth": "teeth",
    "ox": "oxen",
    "knife": "knives",
    "leaf": "leaves",
    "wolf": "wolves",
    "shelf": "shelves",
    "life": "lives",
    "loaf": "loaves",
    "half": "halves",
    "sheep": "sheep",
    "deer": "deer",
    "fish": "fish",
    "moose": "moose",
    "aircraft": "aircraft",
}

_VOWELS = set("aeiou")


def plural_forms(phrase: str) -> list[str]:
    """Plural spellings of a word or phrase (the last word is pluralised).

    Rules, in order: a small table of irregular nouns ("mouse" -> "mice", "person" ->
    "people", "knife" -> "knives", "sheep" -> "sheep"); words ending in s, x, z, ch or sh
    take "es" ("box" -> "boxes"); a consonant followed by "y" becomes "ies" ("puppy" ->
    "puppies"); words ending in "o" get both "os" and "oes" ("photos", "tomatoes"); every
    other word takes "s" ("circle" -> "circles"). The input is normalised like the text it
    will be matched against (lower case, punctuation as spaces).
    """
    words = _words(phrase)
    if not words:
        return []
    head, last = words[:-1], words[-1]
    if last in _IRREGULAR_PLURALS:
        endings = [_IRREGULAR_PLURALS[last]]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        endings = [last + "es"]
    elif len(last) > 1 and last.endswith("y") and last[-2] not in _VOWELS:
        endings = [last[:-1] + "ies"]
    elif last.endswith("o"):
        endings = [last + "s", last + "es"]
    else:
        endings = [last + "s"]
    return [" ".join(head + [ending]) for ending in endings]


# ----------------------------------------------------------------------------------------
# The vocabulary
# ----------------------------------------------------------------------------------------


@dataclass
class ObjectVocabulary:
    """Maps every surface phrase (normalised: lower case, single spaces) to its object.

    `surface_to_object` holds canonical names, synonyms and their plurals; `objects` is the
    set of canonical names; `max_words` is the longest phrase, in words (the matcher tries
    phrases from that length down to one word).
    """

    surface_to_object: dict[str, str]
    objects: frozenset[str] = field(default_factory=frozenset)
    max_words: int = 1

    def canonical(self, name: str) -> str:
        """The canonical object for a canonical name or any of its surface forms."""
        key = " ".join(_words(name))
        if key in self.objects:
            return key
        if key in self.surface_to_object:
            return self.surface_to_object[key]
        raise ValueError(f"unknown object {name!r}: not a canonical name or synonym in the vocabulary")


def build_vocabulary(
    table: Mapping[str, Iterable[str]], *, plurals: bool = True
) -> ObjectVocabulary:
    """Build an `ObjectVocabulary` from {canonical name: [synonyms, ...]}.

    The canonical name is itself a surface form. With `plurals=True` the plural of every
    surface form is added as well (`plural_forms`), unless that spelling is already an
    explicit surface form (explicit entries win). The same explicit surface form under two
    canonical names is an error.
    """
    surface_to_object: dict[str, str] = {}
    objects = set()
    for canonical_name, synonyms in table.items():
        canonical = " ".join(_words(canonical_name))
        if not canonical:
            raise ValueError(f"empty canonical object name {canonical_name!r}")
        objects.add(canonical)
        for surface_raw in [canonical_name, *synonyms]:
            surface = " ".join(_words(surface_raw))
            if not surface:
                continue
            owner = surface_to_object.get(surface)
            if owner is not None and owner != canonical:
                raise ValueError(
                    f"surface form {surface!r} is listed for two objects: {owner!r} and {canonical!r}"
                )
            surface_to_object[surface] = canonical
    if plurals:
        explicit = dict(surface_to_object)
        for surface, canonical in explicit.items():
            for plural in plural_forms(surface):
                if plural not in explicit:  # explicit entries win over generated plurals
                    surface_to_object.setdefault(plural, canonical)
    max_words = max((len(s.split()) for s in surface_to_object), default=1)
    return ObjectVocabulary(surface_to_object, frozenset(objects), max_words)


def attribute_object_table(
    attributes: Iterable[str], nouns: Mapping[str, Iterable[str]]
) -> dict[str, list[str]]:
    """Synonym table for attribute-noun objects, such as the synthetic world's shapes.

    attribute_object_table(["red"], {"circle": ["disk"]}) == {"red circle": ["red disk"]}.
    Pass the result to `build_vocabulary`.
    """
    table: dict[str, list[str]] = {}
    attributes = list(attributes)
    for noun, synonyms in nouns.items():
        synonyms = list(synonyms)
        for attribute in attributes:
            table[f"{attribute} {noun}"] = [f"{attribute} {s}" for s in synonyms]
    return table


def load_synonyms(path: str) -> dict[str, list[str]]:
    """Read a synonym file (format in the module docstring) into {canonical: [synonyms]}."""
    table: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            entries = [e.strip() for e in line.split(",")]
            entries = [e for e in entries if e]
            if not entries:
                raise ValueError(f"{path}:{line_number}: no object name on this line")
            canonical = entries[0]
            if canonical in table:
                raise ValueError(f"{path}:{line_number}: object {canonical!r} is listed twice")
            table[canonical] = entries[1:]
    if not table:
        raise ValueError(f"{path}: no object classes found")
    return table


def find_objects(text: str, vocab: ObjectVocabulary) -> list[str]:
    """Canonical objects mentioned in `text`, in order, one entry per mention.

    Greedy longest match, left to right: at each word the longest phrase in the vocabulary
    wins and its words are consumed, so "teddy bear" yields "teddy bear" and not also
    "bear", and "hot dog" is not a "dog".
    """
    words = _words(text)
    found = []
    i = 0
    while i < len(words):
        for n in range(min(vocab.max_words, len(words) - i), 0, -1):
            phrase = " ".join(words[i : i + n])
            if phrase in vocab.surface_to_object:
                found.append(vocab.surface_to_object[phrase])
                i += n
                break
        else:
            i += 1
    return found


# ----------------------------------------------------------------------------------------
# CHAIR
# ----------------------------------------------------------------------------------------


def score_response(
    text: str, truth: Iterable[str], vocab: ObjectVocabulary, *, dedup_mentions: bool = False
) -> dict:
    """Objects one response mentions, which of them are hallucinated, which truths it covers.

    Returns {"mentions": [canonical, ...] (one per mention, or one per object with
    `dedup_mentions`), "hallucinated": mentions not in the truth, "covered": sorted truth
    objects mentioned at least once}. `truth` may use canonical names or synonyms.
    """
    truth_set = {vocab.canonical(t) for t in truth}
    mentions = find_objects(text, vocab)
    if dedup_mentions:
        mentions = list(dict.fromkeys(mentions))
    return {
        "mentions": mentions,
        "hallucinated": [m for m in mentions if m not in truth_set],
        "covered": sorted(truth_set.intersection(mentions)),
    }


def chair(
    responses: Sequence[str],
    truths: Sequence[Iterable[str]],
    vocab: ObjectVocabulary,
    *,
    dedup_mentions: bool = False,
) -> dict:
    """CHAIR_s, CHAIR_i and recall of a set of responses (Rohrbach et al. 2018).

    responses: N strings; truths: N collections of the objects really in each image.

    - chair_s = responses naming at least one object not in its image / all responses.
      An object named twice is still one hallucinated response.
    - chair_i = hallucinated object mentions / all object mentions, counted once per
      mention: "a cat ... the cat" is two mentions. This is also what the CHAIR release
      (`utils/chair.py`) counts; some later re-implementations count each object once per
      response instead, which `dedup_mentions=True` reproduces.
    - recall = ground-truth objects mentioned / ground-truth objects, summed over responses
      (each image's truth counted as a set). Report it beside CHAIR: a response that names
      nothing has CHAIR 0 and recall 0.

    Ratios with a zero denominator are reported as 0.0. The CHAIR release's extra COCO
    rules (singularising with a lemmatiser, "baby bird" -> "bird", "toilet seat" is not a
    "seat") are not built in; put such phrases in the synonym table instead (e.g. list
    "toilet seat" as a synonym of "toilet").

    Returns {"chair_s", "chair_i", "recall", "n_responses", "n_hallucinated_responses",
    "n_mentions", "n_hallucinated_mentions", "n_truth_objects", "n_covered_objects",
    "per_response": [score_response(...) for each response]}.
    """
    if len(responses) != len(truths):
        raise ValueError(f"chair: {len(responses)} responses but {len(truths)} ground-truth sets")
    if len(responses) == 0:
        raise ValueError("chair: no responses to score")
    per_response = []
    n_bad_responses = n_mentions = n_bad_mentions = n_truth = n_covered = 0
    for i, (text, truth) in enumerate(zip(responses, truths)):
        truth = list(truth)  # may be a one-shot iterable; it is read twice below
        try:
            scored = score_response(text, truth, vocab, dedup_mentions=dedup_mentions)
            truth_set = {vocab.canonical(t) for t in truth}
        except ValueError as error:
            raise ValueError(f"chair: ground truth of response {i}: {error}") from None
        per_response.append(scored)
        n_mentions += len(scored["mentions"])
        n_bad_mentions += len(scored["hallucinated"])
        n_bad_responses += bool(scored["hallucinated"])
        n_truth += len(truth_set)
        n_covered += len(scored["covered"])
    return {
        "chair_s": n_bad_responses / len(responses),
        "chair_i": n_bad_mentions / n_mentions if n_mentions else 0.0,
        "recall": n_covered / n_truth if n_truth else 0.0,
        "n_responses": len(responses),
        "n_hallucinated_responses": n_bad_responses,
        "n_mentions": n_mentions,
        "n_hallucinated_mentions": n_bad_mentions,
        "n_truth_objects": n_truth,
        "n_covered_objects": n_covered,
        "per_response": per_response,
    }


# ----------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------


def parse_yes_no(text: str) -> bool | None:
    """True / False from the first "yes" or "no" word of an answer; None if it has neither.

    "No, there is a dog." -> False; "Yes." -> True; "I cannot tell." -> None. Words are
    whole words ("yesterday" is not "yes"), case-insensitive.
    """
    for word in _words(text):
        if word == "yes":
            return True
        if word == "no":
            return False
    return None


def parse_yes_no_pope(text: str) -> bool:
    """The released POPE script's reading of an answer, for exact parity with it.

    Keep the text before the first "."; drop commas; split on spaces; the answer is "no"
    (False) when one of the words is "No", "no" or "not", otherwise "yes" (True). Note that
    this counts an unparseable answer as "yes".
    """
    first_sentence = text.split(".")[0].replace(",", "")
    words = first_sentence.split(" ")
    return not ("No" in words or "no" in words or "not" in words)


def _as_bool(value, where: str, *, parse) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return parse(value)
    raise ValueError(f"{where}: expected a bool, None or a string, got {type(value).__name__}")


def pope(
    predictions: Sequence[bool | str | None],
    labels: Sequence[bool | str],
    *,
    unparsed_as: bool = False,
) -> dict:
    """POPE metrics (Li et al. 2023) with "yes" as the positive class.

    predictions: N answers, as bools, or strings read with `parse_yes_no`; None (or a
    string with no yes/no word) is counted as `unparsed_as` — "no" by default, so a model
    cannot gain recall by answering off-topic. (The released POPE script instead counts
    any answer whose first sentence lacks "no"/"not" as "yes"; to reproduce it exactly, map
    answers with `parse_yes_no_pope` first and pass bools.)
    labels: N truths, bools or "yes"/"no" strings.

    Returns {"accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn",
    "n", "n_unparsed"}; precision, recall and F1 are 0.0 when their denominator is 0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"pope: {len(predictions)} predictions but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("pope: no answers to score")
    tp = fp = tn = fn = n_unparsed = 0
    for i, (prediction, label) in enumerate(zip(predictions, labels)):
        said_yes = _as_bool(prediction, f"pope: prediction {i}", parse=parse_yes_no)
        if said_yes is None:
            n_unparsed += 1
            said_yes = unparsed_as
        truth = _as_bool(label, f"pope: label {i}", parse=parse_yes_no)
        if truth is None:
            raise ValueError(f"pope: label {i} ({label!r}) is neither yes nor no")
        if said_yes and truth:
            tp += 1
        elif said_yes:
            fp += 1
        elif truth:
            fn += 1
        else:
            tn += 1
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
        "n_unparsed": n_unparsed,
    }


# ----------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------

# "B." / "B)" / "(B)" / "B:" / "B," at the start, or the whole answer is the letter.
_LEADING_CHOICE = re.compile(r"^\(?([A-Z])(?:[.):,]|\s*$)")
# "... the correct option is B", "... answer is (C)", "The answer is: D."
_STATED_CHOICE = re.compile(r"(?:correct option|answer) is:?\s*\(?([A-Z])\b", re.IGNORECASE)


def parse_choice(text: str) -> str | None:
    """The option letter an answer picks, or None.

    Accepted, in order: the answer starts with the letter followed by ".", ")", ":" or ","
    (optionally inside parentheses: "(B)"), or is the letter alone; otherwise it says
    "correct option is X" or "answer is X" anywhere. Letters are capitals A-Z, so an answer
    starting with the article "A red ..." is not read as option A.
    """
    stripped = text.strip()
    match = _LEADING_CHOICE.match(stripped)
    if match:
        return match.group(1)
    match = _STATED_CHOICE.search(stripped)
    if match and match.group(1).isupper():
        return match.group(1)
    return None


def multiple_choice_accuracy(answers: Sequence[str], correct_letters: Sequence[str]) -> dict:
    """Share of answers whose `parse_choice` letter equals the correct one.

    An unparseable answer counts as wrong. Returns {"accuracy", "n_correct", "n",
    "n_unparsed"}.
    """
    if len(answers) != len(correct_letters):
        raise ValueError(
            f"multiple_choice_accuracy: {len(answers)} answers but {len(correct_letters)} correct letters"
        )
    if len(answers) == 0:
        raise ValueError("multiple_choice_accuracy: no answers to score")
    n_correct = n_unparsed = 0
    for answer, letter in zip(answers, correct_letters):
        picked = parse_choice(answer)
        if picked is None:
            n_unparsed += 1
        elif picked == letter.strip().upper():
            n_correct += 1
    return {
        "accuracy": n_correct / len(answers),
        "n_correct": n_correct,
        "n": len(answers),
        "n_unparsed": n_unparsed,
    }
