"""The world's object vocabulary, a small mention finder, and the oracle "human" preference.

Objects. The canonical objects are the shapes ("circle", "square", ...), the way CHAIR's
objects are COCO's classes: a description that calls the red circle "blue" has made an
attribute error, not an object hallucination (multiple-choice colour questions measure
those), while a description that mentions a triangle in an image without one has
hallucinated an object. This is also the level at which the world's language prior acts
(it pairs shapes), so the prior-induced hallucinations are exactly CHAIR's hallucinated
objects. `object_synonyms(with_colour=True)` gives the finer colour + shape vocabulary
("red circle") for anyone who wants to count attribute errors as hallucinations too.

Synonyms. Descriptions sometimes name a shape by a synonym ("box" for "square", "disk" for
"circle"); the table below is the whole list, and text.py draws only from it.

The full metrics (CHAIR, POPE, multiple choice) live in rewards/metrics.py, which takes
`object_synonyms()` through its `build_vocabulary`, or the same table as a synonym file
("canonical, synonym1, synonym2" per line, `synonym_file_text`). The mention finder here is
a small stand-in (whole words, greedy longest match, plurals by the s / es rule) so the
oracle preference needs nothing outside lvlm.
"""

from __future__ import annotations

import re

from .scene import DEFAULT_CONFIG, Scene, WorldConfig

# canonical shape -> synonyms (surface phrases other than the canonical name)
SHAPE_SYNONYMS = {
    "circle": ("disk", "dot"),
    "square": ("box", "block"),
    "triangle": (),
    "star": (),
    "cross": ("plus sign",),
    "diamond": ("rhombus",),
    "heart": (),
}

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list:
    """Lower-cased alphanumeric words; everything else separates words."""
    return _WORD.findall(text.lower())


def plural(phrase: str) -> str:
    """Plural of a phrase (its last word): "box" -> "boxes", "plus sign" -> "plus signs".

    The s / es rule is enough for the world's nouns (none is irregular).
    """
    if phrase.endswith(("s", "x", "z", "ch", "sh")):
        return phrase + "es"
    return phrase + "s"


def object_synonyms(config: WorldConfig = DEFAULT_CONFIG, *, with_colour: bool = False) -> dict:
    """The metrics' vocabulary as plain data: {canonical object: [synonym phrases]}.

    with_colour=False: the shapes of `config` ({"square": ["box", "block"], ...}).
    with_colour=True: every colour x shape ({"red square": ["red box", "red block"], ...}).
    The canonical name is not repeated in its list (the layout of rewards.metrics'
    `build_vocabulary` and of a CHAIR synonym file). Plurals are not listed.
    """
    table = {shape: list(SHAPE_SYNONYMS[shape]) for shape in config.shapes}
    if not with_colour:
        return table
    return {
        f"{colour} {shape}": [f"{colour} {synonym}" for synonym in synonyms]
        for shape, synonyms in table.items()
        for colour in config.colour_names
    }


def synonym_file_text(config: WorldConfig = DEFAULT_CONFIG, *, with_colour: bool = False) -> str:
    """The same table as a synonym file: one "canonical, synonym1, synonym2" line per object."""
    lines = [", ".join([canonical, *synonyms]) for canonical, synonyms in object_synonyms(config, with_colour=with_colour).items()]
    return "\n".join(lines) + "\n"


def surface_forms(config: WorldConfig = DEFAULT_CONFIG, *, with_colour: bool = False) -> dict:
    """{surface phrase (lower case, single spaces): canonical object}, plurals included."""
    forms = {}
    for canonical, synonyms in object_synonyms(config, with_colour=with_colour).items():
        for phrase in (canonical, *synonyms):
            forms[phrase] = canonical
            forms[plural(phrase)] = canonical
    return forms


def find_mentions(text: str, config: WorldConfig = DEFAULT_CONFIG, *, with_colour: bool = False) -> list:
    """Canonical objects mentioned in `text`, one entry per mention, in order.

    Whole words, case-insensitive, greedy longest match from left to right ("plus sign" is one
    mention of "cross"). A small version of rewards.metrics.find_objects, which is the one to
    use for reported numbers.
    """
    forms = surface_forms(config, with_colour=with_colour)
    longest = max(len(phrase.split()) for phrase in forms)
    words = _words(text)
    found, i = [], 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            phrase = " ".join(words[i : i + n])
            if phrase in forms:
                found.append(forms[phrase])
                i += n
                break
        else:
            i += 1
    return found


def _truth_set(truth, config: WorldConfig, with_colour: bool) -> set:
    if isinstance(truth, Scene):
        return {o.name if with_colour else o.shape for o in truth.objects}
    forms = surface_forms(config, with_colour=with_colour)
    result = set()
    for item in truth:
        key = " ".join(_words(item))
        if key not in forms:
            raise ValueError(f"ground-truth object {item!r} is not in the world's vocabulary")
        result.add(forms[key])
    return result


def hallucination_counts(text: str, truth, config: WorldConfig = DEFAULT_CONFIG, *, with_colour: bool = False,
                         count_repeats: bool = False) -> tuple:
    """(number of distinct hallucinated objects, number of distinct covered truth objects).

    truth: a Scene, or an iterable of canonical objects (or synonyms). count_repeats: also count, as
    hallucinated, every mention of an object after its first (a scene holds each shape at most once, so
    naming one again restates it or makes up a second one).
    """
    truth_set = _truth_set(truth, config, with_colour)
    mentions = find_mentions(text, config, with_colour=with_colour)
    mentioned = set(mentions)
    repeats = len(mentions) - len(mentioned) if count_repeats else 0
    return len(mentioned - truth_set) + repeats, len(mentioned & truth_set)


ORACLE_REPEATS = ("ignore", "tie_break", "count")


def oracle_prefers(a: str, b: str, truth, config: WorldConfig = DEFAULT_CONFIG, *, with_colour: bool = False,
                   repeats: str = "ignore") -> int:
    """The oracle annotator's choice between responses a and b: 1 (a), -1 (b) or 0 (tie).

    Stands in for LLaVA-RLHF's human preference annotation (Sun et al. 2023, Sec. 2.2:
    annotators pick the response that hallucinates less; on a tie, the more helpful one).
    Here: fewer distinct hallucinated objects wins; then more distinct covered ground-truth
    objects ("more helpful") wins; otherwise a tie. truth: a Scene or an iterable of
    canonical objects. repeats (not in the paper), what a mention of an object after its first counts
    for: "ignore" (nothing), "tie_break" (on a tie, fewer such mentions wins) or "count" (each is a
    hallucinated object: ``hallucination_counts(count_repeats=True)``).
    """
    if repeats not in ORACLE_REPEATS:
        raise ValueError(f"repeats must be one of {ORACLE_REPEATS}, got {repeats!r}")
    count = repeats == "count"
    bad_a, covered_a = hallucination_counts(a, truth, config, with_colour=with_colour, count_repeats=count)
    bad_b, covered_b = hallucination_counts(b, truth, config, with_colour=with_colour, count_repeats=count)
    if bad_a != bad_b:
        return 1 if bad_a < bad_b else -1
    if covered_a != covered_b:
        return 1 if covered_a > covered_b else -1
    if repeats == "tie_break":
        mentions_a = find_mentions(a, config, with_colour=with_colour)
        mentions_b = find_mentions(b, config, with_colour=with_colour)
        restated_a = len(mentions_a) - len(set(mentions_a))
        restated_b = len(mentions_b) - len(set(mentions_b))
        if restated_a != restated_b:
            return 1 if restated_a < restated_b else -1
    return 0
