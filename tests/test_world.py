"""Tests of the synthetic world (lvlm/world): pictures, text and tokenizer against the ground truth.

The checks recompute what they need independently (place phrases, synonyms, partner pairs,
frequency counts are written out here by hand or counted here), rather than reusing the
module's own tables, so a wrong table in the module fails a test.
"""

import math
import re

import numpy as np
import pytest

from lvlm.world import (
    DEFAULT_CONFIG,
    PLACES,
    WorldConfig,
    captions,
    describe,
    description_instruction,
    find_mentions,
    hallucination_counts,
    multiple_choice_questions,
    object_synonyms,
    oracle_prefers,
    pope_questions,
    render_shape,
    sample_scene,
    scenes,
    sft_examples,
    short_answer_question,
    split_of_seed,
    split_seeds,
    synonym_file_text,
    world_rng,
    yes_no_question,
    yes_no_questions,
)
from lvlm.world.text import SENTENCE_TEMPLATES, fill_template

# ---- independent expectations, written out by hand ---------------------------------------

PARTNERS = {"circle": "triangle", "triangle": "circle", "square": "star", "star": "square",
            "cross": "diamond", "diamond": "cross"}  # fmt: skip
SURFACE = {"circle": "circle", "disk": "circle", "dot": "circle", "square": "square", "box": "square",
           "block": "square", "triangle": "triangle", "star": "star", "cross": "cross",
           "plus sign": "cross", "diamond": "diamond", "rhombus": "diamond"}  # fmt: skip
# Acceptable place phrases per cell (reading order).
PLACE_PATTERNS = [
    r"(at the top left|in the top left corner)", r"(at the top|along the top)",
    r"(at the top right|in the top right corner)", r"(on the left|on the left side)",
    r"(in the centre|in the middle)", r"(on the right|on the right side)",
    r"(at the bottom left|in the bottom left corner)", r"(at the bottom|along the bottom)",
    r"(at the bottom right|in the bottom right corner)",
]  # fmt: skip
SHAPE_WORD = r"(circle|disk|dot|square|box|block|triangle|star|cross|plus sign|diamond|rhombus)"
COLOUR_WORD = r"(red|green|blue|yellow|purple|orange)"


def sentence_parts(sentence):
    """(colour, canonical shape, cell) read from one world sentence by regular expressions."""
    lowered = sentence.lower()
    colour_shape = re.search(rf"\b{COLOUR_WORD} {SHAPE_WORD}\b", lowered)
    assert colour_shape, f"no colour + shape in {sentence!r}"
    cells = [c for c, pattern in enumerate(PLACE_PATTERNS) if re.search(rf"\b{pattern}(?=[ ,.?])", lowered)]
    # "at the top left" also matches the pattern of "at the top": keep the longest match.
    best = max(cells, key=lambda c: max(len(m.group(0)) for m in re.finditer(PLACE_PATTERNS[c], lowered)))
    return colour_shape.group(1), SURFACE[colour_shape.group(2)], best


def test_sentence_parts_helper_reads_places():
    assert sentence_parts("There is a red box at the top.") == ("red", "square", 1)
    assert sentence_parts("At the top left, there is a blue disk.") == ("blue", "circle", 0)
    assert sentence_parts("I can see an orange plus sign on the right side.") == ("orange", "cross", 5)


def image_array(scene):
    return np.asarray(scene.image(), dtype=np.int64)


# ---- scenes and pictures -------------------------------------------------------------------


def test_scene_ground_truth_is_well_formed():
    sizes = set()
    for scene in scenes("train", limit=300):
        n = len(scene.objects)
        assert 1 <= n <= 4
        assert len({o.shape for o in scene.objects}) == n
        assert len({o.colour for o in scene.objects}) == n
        assert [o.cell for o in scene.objects] == sorted({o.cell for o in scene.objects})
        for o in scene.objects:
            left, top, right, bottom = o.bbox
            row, col = divmod(o.cell, 3)
            edges = [0, 21, 43, 64]  # round(i * 64 / 3)
            assert edges[col] + 1 <= left and right <= edges[col + 1] - 1, (scene.seed, o)
            assert edges[row] + 1 <= top and bottom <= edges[row + 1] - 1, (scene.seed, o)
            assert right - left == bottom - top
            sizes.add(right - left)
            assert o.place == PLACES[o.cell]
    # object_size (0.65, 0.85) of the 21-px cell: 13.65 -> 14 and 17.85 -> 18 pixels.
    assert sizes == set(range(14, 19))


def test_renderer_draws_what_the_ground_truth_says():
    background = np.array(DEFAULT_CONFIG.background)
    rgb = dict(DEFAULT_CONFIG.colours)
    for scene in scenes("train", limit=80):
        pixels = image_array(scene)
        assert pixels.shape == (64, 64, 3)
        inside_some_box = np.zeros((64, 64), dtype=bool)
        for o in scene.objects:
            left, top, right, bottom = o.bbox
            x, y = o.centre
            assert tuple(pixels[y, x]) == rgb[o.colour], (scene.seed, o)
            is_colour = (pixels == np.array(rgb[o.colour])).all(axis=-1)
            box = np.zeros_like(is_colour)
            box[top:bottom, left:right] = True
            assert not (is_colour & ~box).any(), f"seed {scene.seed}: {o.colour} pixels outside the box of {o}"
            # The shape spans its box: exactly, or within a pixel at the star's lower right.
            ys, xs = np.nonzero(is_colour)
            slack = 1 if o.shape == "star" else 0
            assert (xs.min(), ys.min()) == (left, top), (scene.seed, o)
            assert right - slack <= xs.max() + 1 <= right and bottom - slack <= ys.max() + 1 <= bottom, (scene.seed, o)
            # Every shape covers a good part of its box (the star, the thinnest, about 40%).
            assert is_colour[box].mean() > 0.3, (scene.seed, o, is_colour[box].mean())
            inside_some_box |= box
        outside = pixels[~inside_some_box]
        assert (outside == background).all(), f"seed {scene.seed}: non-background pixels outside the boxes"
        for cell in set(range(9)) - {o.cell for o in scene.objects}:
            row, col = divmod(cell, 3)
            edges = [0, 21, 43, 64]
            block = pixels[edges[row] : edges[row + 1], edges[col] : edges[col + 1]]
            assert (block == background).all(), f"seed {scene.seed}: empty cell {cell} is not blank"


def test_shapes_are_distinguishable_at_the_smallest_size():
    masks = {}
    for shape in DEFAULT_CONFIG.shapes + ("heart",):
        image = np.asarray(render_shape(shape, 14))
        masks[shape] = (image == 0).all(axis=-1)
        assert masks[shape][7, 7] or masks[shape][6, 6], f"{shape}: centre not filled"
    names = sorted(masks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.85, f"{a} and {b} overlap too much at 14 px (IoU {iou:.2f})"


def test_colours_are_well_separated():
    colours = dict(DEFAULT_CONFIG.colours)
    assert len(colours) >= 6 and len(DEFAULT_CONFIG.shapes) >= 6
    points = list(colours.values()) + [DEFAULT_CONFIG.background]
    for i, p in enumerate(points):
        for q in points[i + 1 :]:
            assert math.dist(p, q) > 80, (p, q)


def test_determinism_and_variety():
    from lvlm.world.scene import _sample_scene

    for seed in (0, 5, 1_000_003):
        a, b = sample_scene(seed), sample_scene(seed)
        assert a is b  # the kept scene, handed out again
        assert a == _sample_scene.__wrapped__(seed, DEFAULT_CONFIG)  # and the same as one drawn afresh
        assert a.image().tobytes() == b.image().tobytes()
        assert describe(a, 3) == describe(b, 3)
        assert captions(a) == captions(b)
        assert yes_no_questions(a, 1) == yes_no_questions(b, 1)
        assert multiple_choice_questions(a) == multiple_choice_questions(b)
        assert pope_questions(a, "random") == pope_questions(b, "random")
        assert sft_examples(a, 2) == sft_examples(b, 2)
    images = {sample_scene(seed).image().tobytes() for seed in range(60)}
    assert len(images) == 60
    assert len({describe(sample_scene(s)).text for s in range(60)}) > 50
    assert len({description_instruction(sample_scene(s)) for s in range(200)}) >= 10


def test_splits_are_disjoint_seed_ranges():
    ranges = {split: set(split_seeds(split)) for split in ("train", "validation", "test")}
    assert len(ranges["train"]) == 20000 and len(ranges["validation"]) == 1000 and len(ranges["test"]) == 1000
    assert not ranges["train"] & ranges["validation"]
    assert not ranges["train"] & ranges["test"]
    assert not ranges["validation"] & ranges["test"]
    for split in ("train", "validation", "test"):
        for scene in scenes(split, limit=5):
            assert scene.split == split and split_of_seed(scene.seed) == split
    assert split_of_seed(999_999) is None
    with pytest.raises(ValueError, match="overlap"):
        WorldConfig(n_train=2_000_000)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="hexagon"):
        WorldConfig(shapes=("circle", "hexagon"), shape_weights=(1, 1), prior_pairs=())
    with pytest.raises(ValueError, match="max_objects"):
        WorldConfig(max_objects=7)
    with pytest.raises(ValueError, match="prior pair"):
        WorldConfig(prior_pairs=(("circle", "circle"),))
    with pytest.raises(ValueError, match="noise_share"):
        WorldConfig(noise_share=1.5)


def test_the_prior_makes_partners_co_occur():
    count, together = {}, {}
    for scene in scenes("train", limit=3000):
        for a in scene.shapes:
            count[a] = count.get(a, 0) + 1
            for b in scene.shapes:
                if a != b:
                    together[a, b] = together.get((a, b), 0) + 1
    for shape, partner in PARTNERS.items():
        others = [together.get((shape, b), 0) for b in PARTNERS if b not in (shape, partner)]
        assert together[shape, partner] > 1.2 * max(others), shape


# ---- descriptions and the prior's noise ----------------------------------------------------


def test_clean_descriptions_and_captions_follow_the_ground_truth():
    used_words = set()
    for scene in scenes("train", limit=200):
        for text in [describe(scene, 0, noisy=False).text] + captions(scene, 3):
            sentences = re.findall(r"[^.]+\.", text)
            assert " ".join(s.strip() for s in sentences) == text
            assert len(sentences) == len(scene.objects)
            for sentence, o in zip(sentences, scene.objects):  # reading order
                assert sentence_parts(sentence) == (o.colour, o.shape, o.cell), (scene.seed, sentence, o)
            assert find_mentions(text) == list(scene.shapes)
            used_words.update(re.findall(SHAPE_WORD, text.lower()))
    # Shapes are sometimes named by their synonyms, and every synonym gets used.
    assert used_words == set(SURFACE)


def test_noise_rate_matches_its_setting_and_names_absent_partners():
    n_eligible = n_noisy = 0
    for seed in range(1500):
        scene = sample_scene(seed)
        absent_partners = {PARTNERS[s] for s in scene.shapes} - set(scene.shapes)
        for variant in range(2):
            d = describe(scene, variant)
            assert d.eligible == bool(absent_partners)
            sentences = re.findall(r"[^.]+\.", d.text)
            if not d.noisy:
                assert d.hallucinated == ()
                assert len(sentences) == len(scene.objects)
                assert set(find_mentions(d.text)) <= set(scene.shapes)
                n_eligible += d.eligible
                continue
            n_eligible += 1
            n_noisy += 1
            assert len(sentences) == len(scene.objects) + 1
            colour, shape, cell = sentence_parts(sentences[-1])  # noise_position="end"
            assert shape in absent_partners and d.hallucinated == (shape,)
            assert cell not in {o.cell for o in scene.objects}
            assert colour not in {o.colour for o in scene.objects}
            assert find_mentions(" ".join(sentences[:-1])) == list(scene.shapes)
    p = DEFAULT_CONFIG.noise_share
    tolerance = 4 * math.sqrt(p * (1 - p) / n_eligible)
    assert n_eligible > 1500
    assert abs(n_noisy / n_eligible - p) < tolerance, (n_noisy, n_eligible)


def test_noise_share_extremes_and_reading_order():
    never = WorldConfig(noise_share=0.0)
    always = WorldConfig(noise_share=1.0, noise_position="reading_order")
    moved = 0
    for seed in range(300):
        assert not describe(sample_scene(seed, never)).noisy
        scene = sample_scene(seed, always)
        d = describe(scene)
        assert d.noisy == d.eligible
        if d.noisy:
            parts = [sentence_parts(s) for s in re.findall(r"[^.]+\.", d.text)]
            assert [cell for _, _, cell in parts] == sorted(cell for _, _, cell in parts)
            noise_index = [shape for _, shape, _ in parts].index(d.hallucinated[0])
            assert d.hallucinated[0] not in scene.shapes
            moved += noise_index != len(parts) - 1
    assert moved > 0  # some noise sentences are not the last one
    clean_scene = next(s for s in scenes("train", limit=500) if not describe(s).eligible)
    with pytest.raises(ValueError, match="cannot get a noise sentence"):
        describe(clean_scene, noisy=True)


def template_of(sentence):
    """The index of the SENTENCE_TEMPLATES phrasing a world sentence is in (the one whose pattern matches)."""
    place = "(" + "|".join(PLACE_PATTERNS) + ")"
    fields = {"a": "(a|an)", "colour": COLOUR_WORD, "shape": SHAPE_WORD, "place": place}
    matches = [i for i, (template, _) in enumerate(SENTENCE_TEMPLATES)
               if re.fullmatch(re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(**fields),
                               sentence, flags=re.IGNORECASE)]
    assert len(matches) == 1, (sentence, matches)
    return matches[0]


def test_per_description_templates_phrase_every_sentence_alike():
    one = WorldConfig(noise_share=1.0, description_templates="per_description")
    mixed_descriptions = used = 0
    for seed in range(300):
        scene = sample_scene(seed, one)
        d = describe(scene, seed % 3)
        templates = {template_of(s) for s in d.sentences}
        assert len(templates) == 1, d.text  # the noise sentence too
        used |= 1 << templates.pop()
        several = sample_scene(seed)
        if len(several.objects) > 1:
            mixed_descriptions += len({template_of(s) for s in describe(several, 0).sentences}) > 1
        assert describe(scene, 0, noisy=False).shapes == tuple(o.shape for o in scene.objects)
    assert used == (1 << len(SENTENCE_TEMPLATES)) - 1  # every phrasing gets chosen
    assert mixed_descriptions > 50  # per_sentence (the default) mixes them
    with pytest.raises(ValueError, match="description_templates"):
        WorldConfig(description_templates="per_word")


# ---- questions ----------------------------------------------------------------------------


def test_yes_no_answers_follow_the_ground_truth():
    kinds = set()
    answers = []
    for scene in scenes("validation", limit=300):
        colour_of = {o.shape: o.colour for o in scene.objects}
        cell_of = {o.shape: o.cell for o in scene.objects}
        for q in yes_no_questions(scene, 0, count=6):
            kinds.add(q.kind)
            text = q.question.removesuffix(" Please answer yes or no.")
            existence = re.fullmatch(rf"Is there an? {SHAPE_WORD} in the image\?", text)
            attribute = re.fullmatch(rf"Is there an? {COLOUR_WORD} {SHAPE_WORD} in the image\?", text)
            if q.kind == "existence":
                truth = SURFACE[existence.group(1)] in colour_of
            elif q.kind == "attribute":
                shape = SURFACE[attribute.group(2)]
                truth = colour_of.get(shape) == attribute.group(1)
            else:
                colour, shape, cell = sentence_parts(text)
                truth = colour_of.get(shape) == colour and cell_of.get(shape) == cell
            assert q.answer == ("Yes" if truth else "No"), (scene.seed, q)
            answers.append(truth)
    assert kinds == {"existence", "attribute", "claim"}
    assert 0.4 < sum(answers) / len(answers) < 0.6


def test_a_claim_false_by_place_names_a_present_object_in_its_colour_elsewhere():
    for scene in scenes("validation", limit=100):
        colour_of = {o.shape: o.colour for o in scene.objects}
        cell_of = {o.shape: o.cell for o in scene.objects}
        rng = world_rng(scene.seed, "test-false-by-place")
        q = yes_no_question(scene, rng, kind="claim", truth=False, false_by="place")
        colour, shape, cell = sentence_parts(q.question.removesuffix(" Please answer yes or no."))
        assert q.answer == "No" and colour_of[shape] == colour and cell_of[shape] != cell
    with pytest.raises(ValueError, match="cannot be false by 'place'"):
        yes_no_question(scene, rng, kind="attribute", truth=False, false_by="place")


@pytest.mark.parametrize("kind", ["random", "popular", "adversarial"])
def test_pope_negatives_are_absent_and_ranked_by_kind(kind):
    frequency = {}
    for scene in scenes("train", limit=DEFAULT_CONFIG.statistics_scenes):
        for s in scene.shapes:
            frequency[s] = frequency.get(s, 0) + 1
    n_with_partner = 0
    for scene in scenes("test", limit=200):
        questions = pope_questions(scene, kind)
        yes = [q for q in questions if q.answer == "Yes"]
        no = [q for q in questions if q.answer == "No"]
        assert len(yes) == len(no) == min(len(scene.shapes), 6 - len(scene.shapes), 3)
        for q in questions:
            assert q.question == f"Is there a {q.shape} in the image?"
        assert all(q.shape in scene.shapes for q in yes)
        negatives = [q.shape for q in no]
        absent = [s for s in DEFAULT_CONFIG.shapes if s not in scene.shapes]
        assert set(negatives) <= set(absent) and len(set(negatives)) == len(negatives)
        if kind == "popular":
            assert negatives == sorted(absent, key=lambda s: -frequency[s])[: len(negatives)]
        if kind == "adversarial":
            absent_partners = {PARTNERS[s] for s in scene.shapes} - set(scene.shapes)
            m = min(len(absent_partners), len(negatives))
            assert set(negatives[:m]) <= absent_partners, (scene.shapes, negatives)
            n_with_partner += m > 0
    if kind == "adversarial":
        assert n_with_partner > 100


def _asked_value(scene, q):
    """What a colour / shape / place question (multiple-choice or short-answer) asks about, read from its
    text and looked up in the scene's ground truth."""
    obj = scene.object_with_shape(q.shape)
    if q.kind == "colour":
        shape = SURFACE[re.match(rf"What colour is the {SHAPE_WORD}\?", q.question).group(1)]
        return scene.object_with_shape(shape).colour
    if q.kind == "shape":
        cell = sentence_parts(f"a red circle {q.question.split('?')[0][len('What shape is '):]}.")[2]
        return next(o.shape for o in scene.objects if o.cell == cell)
    colour, shape = re.match(rf"Where is the {COLOUR_WORD} {SHAPE_WORD}\?", q.question).groups()
    assert (colour, SURFACE[shape]) == (obj.colour, obj.shape)
    return obj.place


def test_short_answers_name_the_truth():
    kinds = set()
    for scene in scenes("test", limit=300):
        rng = world_rng(scene.seed, "short-answer-test")
        for _ in range(3):
            q = short_answer_question(scene, rng)
            kinds.add(q.kind)
            assert q.options == () and q.question.endswith("?")
            assert q.answer == _asked_value(scene, q), (scene.seed, q)
    assert kinds == {"colour", "shape", "place"}


def test_multiple_choice_answers_name_the_truth():
    kinds = set()
    for scene in scenes("test", limit=300):
        for q in multiple_choice_questions(scene, 0):
            kinds.add(q.kind)
            assert len(q.options) == 4 and len(set(q.options)) == 4
            listed = re.search(r"\? A\. (.+) B\. (.+) C\. (.+) D\. (.+) Answer with", q.question)
            assert listed and tuple(listed.groups()) == q.options
            picked = q.options["ABCD".index(q.answer)]
            assert picked == _asked_value(scene, q), (scene.seed, q)
    assert kinds == {"colour", "shape", "place"}


def test_claim_questions_are_what_claim_to_question_makes():
    claims = pytest.importorskip("rewards.claims")
    for index in range(len(SENTENCE_TEMPLATES)):
        for colour, shape, place in [("red", "circle", "at the top left"), ("orange", "plus sign", "in the middle"),
                                     ("blue", "box", "on the left side")]:  # fmt: skip
            sentence, question = fill_template(index, colour, shape, place)
            assert claims.claim_to_question(sentence) == question


# ---- vocabulary, oracle, tokenizer ---------------------------------------------------------


def test_vocabulary_feeds_the_metrics():
    metrics = pytest.importorskip("rewards.metrics")
    table = object_synonyms()
    assert {canonical: sorted(syn) for canonical, syn in table.items()} == {
        s: sorted(k for k, v in SURFACE.items() if v == s and k != s) for s in set(SURFACE.values())
    }
    coloured = object_synonyms(with_colour=True)
    assert len(coloured) == 36 and coloured["red square"] == ["red box", "red block"]
    vocab = metrics.build_vocabulary(table)
    assert metrics.load_synonyms.__name__  # the file format: "canonical, synonym, ..."
    lines = synonym_file_text().strip().splitlines()
    assert "square, box, block" in lines and len(lines) == 6
    for seed in range(100):
        text = describe(sample_scene(seed)).text
        assert metrics.find_objects(text, vocab) == find_mentions(text)
    assert find_mentions("Two boxes and three plus signs, a dot.") == ["square", "cross", "circle"]


def test_oracle_prefers_fewer_hallucinations_then_more_coverage():
    truth = ["circle", "square"]
    correct = "There is a red circle at the top left."
    hallucinating = "There is a red circle at the top left. A blue triangle is on the right."
    assert oracle_prefers(correct, hallucinating, truth) == 1
    assert oracle_prefers(hallucinating, correct, truth) == -1
    # Same (zero) hallucinations: covering both objects beats covering one.
    assert oracle_prefers("The red disk is in the middle.", "A red dot. Two boxes.", truth) == -1
    # One hallucination each, same coverage: a tie.
    assert oracle_prefers("A circle and a star.", "A disk and a rhombus.", truth) == 0
    # Fewer hallucinations wins even with less coverage.
    assert oracle_prefers("Nothing here.", "A circle, a box and a star.", truth) == 1
    scene = next(s for s in scenes("train", limit=50) if describe(s).eligible and len(s.objects) > 1)
    assert oracle_prefers(describe(scene, noisy=False).text, describe(scene, noisy=True).text, scene) == 1


def test_oracle_can_count_a_repeated_object_as_a_hallucinated_one():
    truth = ["circle", "square"]
    restating = "The red circle is at the left. A red disk is on the left."  # the circle twice
    assert hallucination_counts(restating, truth) == (0, 1)
    assert hallucination_counts(restating, truth, count_repeats=True) == (1, 1)
    assert hallucination_counts("A disk, a star, a box and a star.", truth, count_repeats=True) == (2, 2)
    once = "The red circle is at the left."
    assert oracle_prefers(restating, once, truth) == 0  # as the paper's annotators: no more hallucinated, same help
    assert oracle_prefers(restating, once, truth, repeats="count") == -1
    # As a tie-break, a repeat only decides between responses equal on hallucination and coverage.
    assert oracle_prefers(restating, once, truth, repeats="tie_break") == -1
    assert oracle_prefers(restating + " A star.", once, truth, repeats="tie_break") == -1
    assert oracle_prefers(restating + " A box.", once, truth, repeats="tie_break") == 1  # covers more
    assert oracle_prefers(restating + " A box.", once, truth, repeats="count") == -1  # the repeat a hallucination
    with pytest.raises(ValueError, match="repeats must be one of"):
        oracle_prefers(restating, once, truth, repeats="yes")


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
    from lvlm.world import build_world_tokenizer

    return build_world_tokenizer(tmp_path_factory.mktemp("world_tokenizer"))


def world_texts(limit=150):
    for scene in scenes("train", limit=limit):
        yield describe(scene, 0).text
        yield description_instruction(scene, 0)
        yield from captions(scene, 2)
        for kind in ("random", "popular", "adversarial"):
            yield from (q.question for q in pope_questions(scene, kind))
        yield from (q.question for q in yes_no_questions(scene, 0, count=6))
        yield from (q.question for q in multiple_choice_questions(scene, 0))
        yield from (ex["answer"] for ex in sft_examples(scene, 0))


def test_world_tokenizer_round_trips_world_text_without_unknowns(world_tokenizer):
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_file(world_tokenizer)
    n = 0
    for text in world_texts():
        encoding = raw.encode(text, add_special_tokens=False)
        assert 0 not in encoding.ids, f"<unk> in {text!r}: {encoding.tokens}"
        assert raw.decode(encoding.ids) == text
        for token, (start, end) in zip(encoding.tokens, encoding.offsets):
            assert text[start:end] == token
        n += 1
    assert n > 1000
    from lvlm.tokenizer import SYSTEM

    assert raw.decode(raw.encode(SYSTEM, add_special_tokens=False).ids) == SYSTEM
    assert raw.encode("USER: Is it? ASSISTANT:", add_special_tokens=False).tokens == [
        "USER", ":", "Is", "it", "?", "ASSISTANT", ":"
    ]


def test_world_tokenizer_special_ids_determinism_and_chat_template(world_tokenizer, tmp_path):
    from lvlm.tokenizer import Tokenizer, encode_conversation
    from lvlm.world import WORLD_SPECIAL_TOKENS, build_world_tokenizer

    assert WORLD_SPECIAL_TOKENS == ("<unk>", "<s>", "</s>", "<pad>", "<image>")
    again = build_world_tokenizer(tmp_path / "tokenizer.json")
    assert open(again, "rb").read() == open(world_tokenizer, "rb").read()
    tok = Tokenizer.from_file(world_tokenizer)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id) == (0, 1, 2, 3, 4)
    for word in ("Yes", "yes", "No", "no", "A", "B", "C", "D", "Please", "answer", "or"):
        assert tok.raw.token_to_id(word) is not None, word
    answer = "There is an orange box in the middle."
    encoded = encode_conversation(tok, [("Describe this image in detail.", answer)], num_images=1,
                                  image_tokens_per_image=4)  # fmt: skip
    ids = encoded["input_ids"]
    assert ids[0] == 1 and (ids == 4).sum() == 4 and ids[-1] == 2
    assert tok.decode(ids[encoded["assistant_mask"]]) == answer + "</s>"
    assert 0 not in ids.tolist()
    # Extra texts extend the vocabulary.
    extra = build_world_tokenizer(tmp_path / "extra.json", extra_texts=["Please evaluate the quality."])
    assert Tokenizer.from_file(extra).raw.token_to_id("evaluate") is not None
    assert tok.raw.token_to_id("evaluate") is None
