"""The world's text: descriptions, captions, instructions, yes/no and multiple-choice questions.

Everything is generated from a scene's ground truth with a private random stream per
(image, purpose, variant) (`scene.world_rng`), so the same seed always gives the same text.

Descriptions. One sentence per object, in reading order of the grid (row by row, left to
right), each in one of several phrasings (`SENTENCE_TEMPLATES`), sometimes with a synonym
for the shape ("box" for "square") and one of a few phrases for the place ("in the top left
corner"). Every sentence ends with "."; the end of a response is the chat template's "</s>".

The language prior's noise. Machine-written instruction data carries hallucinations into the
models trained on it, typically objects that usually go with what is in the picture. Here, a
description of an image in which some present shape's prior partner is absent (the image is
"eligible") gets, with probability `config.noise_share`, one extra sentence about such an
absent partner, in a colour no object has and at an empty cell. By default it comes after
the true sentences (`noise_position="end"`): a model that learned the data continues after
the last true sentence with probability about noise_share instead of ending, so sampled
descriptions hallucinate at about noise_share x (share of eligible images), and greedy
decoding hallucinates where that continuation beats the end token (noise_share near or above
0.5). `Description.noisy` and `.hallucinated` say which descriptions carry noise, so the
rate can be checked, and captions (the clean ground truth) never do.

Questions. POPE-style yes/no questions "Is there a {shape} in the image?" with random,
popular and adversarial negatives (Li et al. 2023); yes/no questions on colour and place,
including the questions that rewards/claims.py's `claim_to_question` makes of each
description sentence (so a yes/no labeler trained on them can check claims, as in RLAIF-V);
and four-option multiple-choice questions on colour, shape and place, answered by a letter.
"""

from __future__ import annotations

from dataclasses import dataclass

from .scene import GRID, PLACES, Scene, shape_statistics, world_rng
from .vocab import SHAPE_SYNONYMS

# ----------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------

# Phrases for each place (keys: scene.PLACES). "top" is the top-middle cell.
PLACE_PHRASES = {
    "top left": ("at the top left", "in the top left corner"),
    "top": ("at the top", "along the top"),
    "top right": ("at the top right", "in the top right corner"),
    "left": ("on the left", "on the left side"),
    "centre": ("in the centre", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "along the bottom"),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}

# (sentence, the yes/no question rewards.claims.claim_to_question makes of it).
# Fields: {a} article of the colour word, {colour}, {shape} (a surface form), {place} (a
# phrase from PLACE_PHRASES). The first letter of a sentence is capitalised after filling.
SENTENCE_TEMPLATES = (
    ("There is {a} {colour} {shape} {place}.", "Is there {a} {colour} {shape} {place}?"),
    ("{a} {colour} {shape} is {place}.", "Is {a} {colour} {shape} {place}?"),
    ("The {colour} {shape} is {place}.", "Is the {colour} {shape} {place}?"),
    ("{place}, there is {a} {colour} {shape}.", "Is it true that {place}, there is {a} {colour} {shape}?"),
    ("I can see {a} {colour} {shape} {place}.", "Can I see {a} {colour} {shape} {place}?"),
    ("{place} is {a} {colour} {shape}.", "Is it true that {place} is {a} {colour} {shape}?"),
    ("The image shows {a} {colour} {shape} {place}.", "Is it true that the image shows {a} {colour} {shape} {place}?"),
)

# Requests for a detailed description (in the spirit of CSR's / LLaVA's description prompts).
DESCRIPTION_INSTRUCTIONS = (
    "Describe this image in detail.",
    "What do you see in this picture?",
    "Describe the image.",
    "What is in this image?",
    "Give a detailed description of the image.",
    "Describe everything you see in the picture.",
    "What objects are in this image, and where are they?",
    "Tell me what is in the picture.",
    "Provide a description of this image.",
    "Explain what the image shows.",
    "List the shapes in this image and their places.",
)

POPE_TEMPLATE = "Is there {a} {shape} in the image?"  # POPE's question, verbatim in form
ATTRIBUTE_TEMPLATE = "Is there {a} {colour} {shape} in the image?"
YES_NO_SUFFIX = " Please answer yes or no."  # RLAIF-V's labeler suffix
YES, NO = "Yes", "No"

MC_TEMPLATES = {
    "colour": "What colour is the {shape}?",
    "shape": "What shape is {place}?",
    "place": "Where is the {colour} {shape}?",
}
MC_SUFFIX = " Answer with the option's letter from the given choices directly."  # LLaVA-1.5's
LETTERS = "ABCD"

SYNONYM_RATE = 0.3  # how often a description names a shape by a synonym
POPE_KINDS = ("random", "popular", "adversarial")


def article(word: str) -> str:
    """"a" or "an" for the word that follows ("an orange", "a red")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _shape_surface(shape: str, rng, synonym_rate: float = SYNONYM_RATE) -> str:
    synonyms = SHAPE_SYNONYMS[shape]
    if synonyms and rng.random() < synonym_rate:
        return rng.choice(synonyms)
    return shape


def fill_template(template_index: int, colour: str, shape_word: str, place_phrase: str) -> tuple:
    """(sentence, question) of one SENTENCE_TEMPLATES entry filled in."""
    sentence, question = SENTENCE_TEMPLATES[template_index]
    fields = {"a": article(colour), "colour": colour, "shape": shape_word, "place": place_phrase}
    return _capitalise(sentence.format(**fields)), _capitalise(question.format(**fields))


def object_sentence(colour: str, shape: str, cell: int, rng, template_index: int | None = None) -> tuple:
    """A random phrasing of "this object is at this cell": (sentence, its yes/no question).
    ``template_index``: that SENTENCE_TEMPLATES entry instead of a random one."""
    if template_index is None:
        template_index = rng.randrange(len(SENTENCE_TEMPLATES))
    shape_word = _shape_surface(shape, rng)
    place_phrase = rng.choice(PLACE_PHRASES[PLACES[cell]])
    return fill_template(template_index, colour, shape_word, place_phrase)


# ----------------------------------------------------------------------------------------
# Descriptions and captions
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Description:
    """A description and what it says.

    text: the sentences joined by single spaces. sentences: one per described object.
    shapes: the shape each sentence is about. eligible: whether the image could get a noise
    sentence (some present shape's partner is absent). noisy: whether it got one.
    hallucinated: shapes named by the noise sentence (absent from the image), () when clean.
    """

    text: str
    sentences: tuple
    shapes: tuple
    eligible: bool
    noisy: bool
    hallucinated: tuple


def hallucination_candidates(scene: Scene) -> tuple:
    """Absent shapes that are prior partners of present shapes (sorted): what noise may name."""
    present = set(scene.shapes)
    partners = {p for shape in present for p in scene.config.partners(shape)}
    return tuple(sorted(partners - present))


def _describe(scene: Scene, rng, noisy, one_template: bool = False) -> Description:
    config = scene.config
    noise_draw = rng.random()  # drawn always, so `noisy=` does not shift the phrasing stream
    template = rng.randrange(len(SENTENCE_TEMPLATES)) if one_template else None
    candidates = hallucination_candidates(scene)
    empty_cells = [c for c in range(GRID * GRID) if c not in {o.cell for o in scene.objects}]
    free_colours = [c for c in config.colour_names if c not in {o.colour for o in scene.objects}]
    eligible = bool(candidates and empty_cells and free_colours)
    if noisy is None:
        noisy = eligible and noise_draw < config.noise_share
    elif noisy and not eligible:
        raise ValueError(
            f"describe: scene {scene.seed} cannot get a noise sentence: no present shape has an absent "
            f"partner, or there is no empty cell or unused colour (shapes {scene.shapes})"
        )
    entries = [(o.cell, o.shape, object_sentence(o.colour, o.shape, o.cell, rng, template)[0]) for o in scene.objects]
    hallucinated = ()
    if noisy:
        shape = rng.choice(candidates)
        cell = rng.choice(empty_cells)
        sentence = object_sentence(rng.choice(free_colours), shape, cell, rng, template)[0]
        hallucinated = (shape,)
        if config.noise_position == "end":
            entries.append((GRID * GRID, shape, sentence))
        else:
            entries.append((cell, shape, sentence))
            entries.sort(key=lambda entry: entry[0])
    sentences = tuple(sentence for _, _, sentence in entries)
    return Description(
        text=" ".join(sentences),
        sentences=sentences,
        shapes=tuple(shape for _, shape, _ in entries),
        eligible=eligible,
        noisy=bool(noisy),
        hallucinated=hallucinated,
    )


def describe(scene: Scene, variant: int = 0, *, noisy: bool | None = None) -> Description:
    """The SFT description number `variant` of a scene.

    noisy=None: noise with probability config.noise_share when the image is eligible (the SFT
    data); False: always clean; True: always one noise sentence (ValueError if the image is
    not eligible).
    """
    return _describe(scene, world_rng(scene.seed, "describe", variant), noisy,
                     one_template=scene.config.description_templates == "per_description")


def captions(scene: Scene, count: int = 5) -> list:
    """`count` clean descriptions in different phrasings: the image's ground-truth captions.

    These are the facts of Fact-RLHF's fact-augmented reward prompt and the texts a CLIP
    model is trained on; they never carry noise.
    """
    return [_describe(scene, world_rng(scene.seed, "caption", k), False).text for k in range(count)]


def description_instruction(scene: Scene, variant: int = 0) -> str:
    """One of DESCRIPTION_INSTRUCTIONS, chosen by the seed and variant."""
    return world_rng(scene.seed, "instruction", variant).choice(DESCRIPTION_INSTRUCTIONS)


# ----------------------------------------------------------------------------------------
# Yes/no questions
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class YesNoQuestion:
    """question, answer ("Yes"/"No"), kind, and what is asked: shape, colour, place (or None).

    kind: "pope-random", "pope-popular", "pope-adversarial", "existence", "attribute" or
    "claim".
    """

    question: str
    answer: str
    kind: str
    shape: str
    colour: str | None = None
    place: str | None = None


def _pope_question(shape: str) -> str:
    return POPE_TEMPLATE.format(a=article(shape), shape=shape)


def pope_negatives(scene: Scene, kind: str, count: int, rng=None) -> list:
    """`count` absent shapes chosen the POPE way (Li et al. 2023, Sec. 4.1).

    random: uniformly among the absent shapes. popular: the absent shapes most frequent in
    the training split's ground truth. adversarial: the absent prior partners of the present
    shapes first, then the absent shapes that co-occur most with the present ones in the
    training split. Ranking ties break by name. Returns fewer than `count` when fewer are
    absent.
    """
    config = scene.config
    present = set(scene.shapes)
    absent = [s for s in config.shapes if s not in present]
    if kind == "random":
        rng = rng or world_rng(scene.seed, "pope-random")
        return rng.sample(absent, min(count, len(absent)))
    frequency, co_occurrence = shape_statistics(config)
    if kind == "popular":
        ranked = sorted(absent, key=lambda s: (-frequency[s], s))
    elif kind == "adversarial":
        partners = {p for s in present for p in config.partners(s)}
        ranked = sorted(
            absent, key=lambda s: (s not in partners, -sum(co_occurrence[(p, s)] for p in present), s)
        )
    else:
        raise ValueError(f"pope_negatives: kind must be one of {POPE_KINDS}, got {kind!r}")
    return ranked[:count]


def pope_questions(scene: Scene, kind: str, max_per_image: int = 3) -> list:
    """POPE's questions for one image: k present and k absent shapes, k = min(#present,
    #absent, max_per_image), as YesNoQuestion(kind="pope-" + kind), positives first.

    Balanced by construction, like POPE's 3 + 3 per image.
    """
    if kind not in POPE_KINDS:
        raise ValueError(f"pope_questions: kind must be one of {POPE_KINDS}, got {kind!r}")
    rng = world_rng(scene.seed, "pope-" + kind)
    present = list(scene.shapes)
    absent_count = len(scene.config.shapes) - len(present)
    k = min(len(present), absent_count, max_per_image)
    positives = rng.sample(present, k)
    negatives = pope_negatives(scene, kind, k, rng)
    return [YesNoQuestion(_pope_question(s), YES, "pope-" + kind, s) for s in positives] + [
        YesNoQuestion(_pope_question(s), NO, "pope-" + kind, s) for s in negatives
    ]


def _absent_shape(scene: Scene, rng) -> str:
    """An absent shape: a prior partner half of the time when there is one (the hard case)."""
    candidates = hallucination_candidates(scene)
    if candidates and rng.random() < 0.5:
        return rng.choice(candidates)
    return rng.choice([s for s in scene.config.shapes if s not in scene.shapes])


def yes_no_question(scene: Scene, rng, *, kind: str | None = None, truth: bool | None = None,
                    suffix_rate: float = 0.5, false_by: str | None = None) -> YesNoQuestion:
    """One yes/no question about the scene, its answer fixed by the ground truth.

    kind "existence": "Is there a {shape} in the image?" (the POPE form);
    "attribute": "Is there a {colour} {shape} in the image?"; "claim": the question form of a
    description sentence (SENTENCE_TEMPLATES), with colour and place. A false question names
    an absent shape (a prior partner half of the time), or for attribute / claim questions a
    present shape in a wrong colour, or (claim) at a wrong place. With probability
    suffix_rate, " Please answer yes or no." is appended (RLAIF-V's labeler prompt). false_by
    ("colour", "absent" or "place") fixes which of those a false attribute / claim question does.
    """
    config = scene.config
    kind = kind or rng.choice(("existence", "attribute", "claim"))
    truth = rng.random() < 0.5 if truth is None else truth
    has_absent = len(scene.shapes) < len(config.shapes)
    if kind == "existence" and not truth and not has_absent:
        raise ValueError(f"yes_no_question: scene {scene.seed} has every shape; no false existence question")
    colour = place = None
    if kind == "existence":
        shape = rng.choice(scene.shapes) if truth else _absent_shape(scene, rng)
        shape_word = _shape_surface(shape, rng)
        question = POPE_TEMPLATE.format(a=article(shape_word), shape=shape_word)
    elif kind in ("attribute", "claim"):
        obj = rng.choice(scene.objects)
        shape, colour, cell = obj.shape, obj.colour, obj.cell
        if not truth:
            ways = ["colour"] + (["absent"] if has_absent else []) + (["place"] if kind == "claim" else [])
            if false_by is not None and false_by not in ways:
                raise ValueError(f"yes_no_question: a false {kind} question about scene {scene.seed} cannot be "
                                 f"false by {false_by!r}; possible: {', '.join(ways)}")
            way = false_by or rng.choice(ways)
            if way == "colour":
                colour = rng.choice([c for c in config.colour_names if c != obj.colour])
            elif way == "place":
                cell = rng.choice([c for c in range(GRID * GRID) if c != obj.cell])
            else:
                shape = _absent_shape(scene, rng)
                colour = rng.choice(config.colour_names)
                cell = rng.randrange(GRID * GRID)
        shape_word = _shape_surface(shape, rng)
        if kind == "attribute":
            question = ATTRIBUTE_TEMPLATE.format(a=article(colour), colour=colour, shape=shape_word)
        else:
            place = PLACES[cell]
            phrase = rng.choice(PLACE_PHRASES[place])
            question = fill_template(rng.randrange(len(SENTENCE_TEMPLATES)), colour, shape_word, phrase)[1]
    else:
        raise ValueError(f"yes_no_question: kind must be 'existence', 'attribute' or 'claim', got {kind!r}")
    if rng.random() < suffix_rate:
        question += YES_NO_SUFFIX
    return YesNoQuestion(question, YES if truth else NO, kind, shape, colour, place)


def yes_no_questions(scene: Scene, variant: int = 0, count: int = 4, *, suffix_rate: float = 0.5) -> list:
    """`count` yes/no questions (kinds mixed, answers about half "Yes") for SFT data."""
    rng = world_rng(scene.seed, "yes-no", variant)
    return [yes_no_question(scene, rng, suffix_rate=suffix_rate) for _ in range(count)]


# ----------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceQuestion:
    """question (with its options and LLaVA's answer-format instruction), options (in letter
    order), answer (the correct letter), kind ("colour", "shape" or "place"), and the object
    asked about (its shape)."""

    question: str
    options: tuple
    answer: str
    kind: str
    shape: str


def multiple_choice_question(scene: Scene, rng, *, kind: str | None = None, obj=None) -> ChoiceQuestion:
    """A four-option question about one object of the scene.

    colour: "What colour is the triangle? A. red B. blue C. green D. yellow"; shape: "What
    shape is at the top left? ..."; place: "Where is the red circle? A. top left ...". The
    right option and three other values are shuffled; the answer is the right letter.
    """
    config = scene.config
    obj = obj or rng.choice(scene.objects)
    kind = kind or rng.choice(tuple(MC_TEMPLATES))
    if kind == "colour":
        head = MC_TEMPLATES["colour"].format(shape=_shape_surface(obj.shape, rng))
        right, pool = obj.colour, config.colour_names
    elif kind == "shape":
        head = MC_TEMPLATES["shape"].format(place=rng.choice(PLACE_PHRASES[obj.place]))
        right, pool = obj.shape, config.shapes
    elif kind == "place":
        head = MC_TEMPLATES["place"].format(colour=obj.colour, shape=_shape_surface(obj.shape, rng))
        right, pool = obj.place, PLACES
    else:
        raise ValueError(f"multiple_choice_question: kind must be one of {tuple(MC_TEMPLATES)}, got {kind!r}")
    wrong = [value for value in pool if value != right]
    if len(wrong) < len(LETTERS) - 1:
        raise ValueError(f"multiple_choice_question: need {len(LETTERS) - 1} wrong {kind} options, the world has {len(wrong)}")
    options = rng.sample(wrong, len(LETTERS) - 1) + [right]
    rng.shuffle(options)
    listed = " ".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
    return ChoiceQuestion(f"{head} {listed}{MC_SUFFIX}", tuple(options), LETTERS[options.index(right)], kind, obj.shape)


def multiple_choice_questions(scene: Scene, variant: int = 0) -> list:
    """One multiple-choice question per object (kind chosen at random)."""
    rng = world_rng(scene.seed, "multiple-choice", variant)
    return [multiple_choice_question(scene, rng, obj=obj) for obj in scene.objects]


def short_answer_question(scene: Scene, rng, *, kind: str | None = None, obj=None) -> ChoiceQuestion:
    """The multiple-choice question's head asked open-ended, answered with the value itself:
    "What colour is the triangle?" -> "red"; "What shape is at the top left?" -> "circle";
    "Where is the red circle?" -> "top left" (``options`` is empty).

    The answer is the thing looked up in the image, so learning to answer gives the model a
    direct signal for finding the object a question names; a yes/no answer gives none until the
    lookup already works (its value does not carry the answer).
    """
    obj = obj or rng.choice(scene.objects)
    kind = kind or rng.choice(tuple(MC_TEMPLATES))
    if kind == "colour":
        question, answer = MC_TEMPLATES["colour"].format(shape=_shape_surface(obj.shape, rng)), obj.colour
    elif kind == "shape":
        question, answer = MC_TEMPLATES["shape"].format(place=rng.choice(PLACE_PHRASES[obj.place])), obj.shape
    elif kind == "place":
        question = MC_TEMPLATES["place"].format(colour=obj.colour, shape=_shape_surface(obj.shape, rng))
        answer = obj.place
    else:
        raise ValueError(f"short_answer_question: kind must be one of {tuple(MC_TEMPLATES)}, got {kind!r}")
    return ChoiceQuestion(question, (), answer, kind, obj.shape)


# ----------------------------------------------------------------------------------------
# SFT examples and the tokenizer's corpus
# ----------------------------------------------------------------------------------------


def sft_examples(scene: Scene, variant: int = 0) -> list:
    """Single-turn SFT examples for one image: a description (noisy at the configured rate),
    two yes/no questions and one multiple-choice question.

    Each is a dict {"kind", "question", "answer"} ("description" examples also carry
    "noisy" and "hallucinated"); the question has no "<image>" (the chat template adds it).
    """
    description = describe(scene, variant)
    examples = [{
        "kind": "description",
        "question": description_instruction(scene, variant),
        "answer": description.text,
        "noisy": description.noisy,
        "hallucinated": description.hallucinated,
    }]
    for q in yes_no_questions(scene, variant, count=2):
        examples.append({"kind": "yes-no", "question": q.question, "answer": q.answer})
    rng = world_rng(scene.seed, "sft-choice", variant)
    q = multiple_choice_question(scene, rng)
    examples.append({"kind": "multiple-choice", "question": q.question, "answer": q.answer})
    return examples


def corpus_pieces(config) -> list:
    """Every fixed string and every value that world text is built from.

    World text is these pieces put together with spaces and punctuation, so a word-level
    vocabulary over them covers all of it (tests/test_world.py checks this on generated text).
    """
    pieces = list(DESCRIPTION_INSTRUCTIONS)
    for sentence, question in SENTENCE_TEMPLATES:
        pieces += [sentence.replace("{", " ").replace("}", " "), question.replace("{", " ").replace("}", " ")]
    pieces += [POPE_TEMPLATE, ATTRIBUTE_TEMPLATE, YES_NO_SUFFIX, YES, NO, MC_SUFFIX, "a an", " ".join(LETTERS)]
    pieces += list(MC_TEMPLATES.values())
    pieces += [phrase for phrases in PLACE_PHRASES.values() for phrase in phrases] + list(PLACES)
    pieces += list(config.colour_names)
    for shape in config.shapes:
        pieces += [shape, *SHAPE_SYNONYMS[shape]]
    return pieces
