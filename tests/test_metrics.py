"""Hallucination metrics: CHAIR, POPE and multiple-choice accuracy on hand-worked examples."""

import pytest

from rewards.metrics import (
    attribute_object_table,
    build_vocabulary,
    chair,
    find_objects,
    load_synonyms,
    multiple_choice_accuracy,
    parse_choice,
    parse_yes_no,
    parse_yes_no_pope,
    plural_forms,
    pope,
)


@pytest.fixture
def shapes_vocab():
    # The synthetic world's kind of objects: colour + shape, with shape synonyms.
    table = attribute_object_table(["red", "blue", "green"], {"circle": ["disk"], "square": ["box"]})
    return build_vocabulary(table)


@pytest.fixture
def coco_vocab():
    table = {
        "teddy bear": ["teddybear"],
        "bear": [],
        "hot dog": [],
        "dog": ["puppy"],
        "person": ["man", "woman", "people"],
        "mouse": [],
        "toilet": ["toilet seat"],
        "chair": ["seat"],
    }
    return build_vocabulary(table)


def test_plural_forms():
    assert plural_forms("box") == ["boxes"]
    assert plural_forms("circle") == ["circles"]
    assert plural_forms("mouse") == ["mice"]
    assert plural_forms("puppy") == ["puppies"]
    assert plural_forms("toy") == ["toys"]
    assert plural_forms("teddy bear") == ["teddy bears"]
    assert plural_forms("Wine-Glass") == ["wine glasses"]
    assert plural_forms("sheep") == ["sheep"]
    assert plural_forms("knife") == ["knives"]


def test_attribute_object_table():
    table = attribute_object_table(["red"], {"circle": ["disk", "disc"]})
    assert table == {"red circle": ["red disk", "red disc"]}


def test_find_objects_synonyms_plurals_and_order(shapes_vocab):
    text = "A red disk and two blue boxes. The red circle again, near a green square!"
    assert find_objects(text, shapes_vocab) == ["red circle", "blue square", "red circle", "green square"]
    # A bare shape without colour is not an object of this vocabulary.
    assert find_objects("a circle", shapes_vocab) == []


def test_find_objects_longest_match_first(coco_vocab):
    text = "A teddy bear next to a bear, two hot-dogs, puppies and mice. People watch a toilet seat."
    assert find_objects(text, coco_vocab) == ["teddy bear", "bear", "hot dog", "dog", "mouse", "person", "toilet"]


def test_vocabulary_conflict_is_an_error():
    with pytest.raises(ValueError, match="two objects"):
        build_vocabulary({"dog": ["pet"], "cat": ["pet"]})


def test_load_synonyms(tmp_path):
    path = tmp_path / "synonyms.txt"
    path.write_text("# COCO-style synonym file\n\nperson, girl, boy, man\nteddy bear, teddybear\n\nhot dog\n")
    table = load_synonyms(str(path))
    assert table == {"person": ["girl", "boy", "man"], "teddy bear": ["teddybear"], "hot dog": []}
    vocab = build_vocabulary(table)
    assert find_objects("Two boys hold teddy bears and a hot dog.", vocab) == ["person", "teddy bear", "hot dog"]


def test_load_synonyms_duplicate_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("dog, puppy\ndog, hound\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        load_synonyms(str(path))


def test_chair_hand_worked(shapes_vocab):
    responses = [
        "A red disk and a blue box.",  # 2 mentions, both true
        "A red circle, a green square and another green box.",  # 3 mentions, green square (x2) false
        "Nothing to see here.",  # no objects at all
        "Two blue circles.",  # 1 mention, true
    ]
    truths = [
        {"red circle", "blue square"},
        {"red circle"},
        {"blue circle"},
        ["blue disk", "red square"],  # synonyms are accepted as truth names
    ]
    # CHAIR_s: only response 2 hallucinates -> 1/4.
    # CHAIR_i: mentions 2 + 3 + 0 + 1 = 6, hallucinated 2 (green square twice) -> 1/3.
    # Recall: truth objects 2 + 1 + 1 + 2 = 6, covered 2 + 1 + 0 + 1 = 4 -> 2/3.
    result = chair(responses, truths, shapes_vocab)
    assert result["chair_s"] == pytest.approx(1 / 4)
    assert result["chair_i"] == pytest.approx(1 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert (result["n_mentions"], result["n_hallucinated_mentions"]) == (6, 2)
    assert (result["n_truth_objects"], result["n_covered_objects"]) == (6, 4)
    assert result["n_hallucinated_responses"] == 1
    assert result["per_response"][1]["hallucinated"] == ["green square", "green square"]

    # Counting each object once per response: mentions 2 + 2 + 0 + 1 = 5, hallucinated 1.
    dedup = chair(responses, truths, shapes_vocab, dedup_mentions=True)
    assert dedup["chair_i"] == pytest.approx(1 / 5)
    assert dedup["chair_s"] == pytest.approx(1 / 4)


def test_chair_errors(shapes_vocab):
    with pytest.raises(ValueError, match="2 responses but 1"):
        chair(["a", "b"], [set()], shapes_vocab)
    with pytest.raises(ValueError, match="response 0"):
        chair(["a red disk"], [{"purple triangle"}], shapes_vocab)


def test_parse_yes_no():
    assert parse_yes_no("Yes, there is a dog.") is True
    assert parse_yes_no("No, there is a cat but no dog.") is False
    assert parse_yes_no("I think yes.") is True
    assert parse_yes_no("Yesterday it rained.") is None
    assert parse_yes_no("I cannot tell.") is None


def test_parse_yes_no_pope_mirrors_released_script():
    assert parse_yes_no_pope("I don't know") is True  # no "no"/"not": counted as yes
    assert parse_yes_no_pope("There is not a cat") is False
    assert parse_yes_no_pope("No, none.") is False
    assert parse_yes_no_pope("Yes. No.") is True  # only the first sentence is read


def test_pope_small_table():
    predictions = ["Yes, there is.", "No, there is not.", "yes", "I don't know", "No.", True]
    labels = ["yes", "no", "no", "yes", "yes", True]
    # read as:  T  F  T  None->F  F  T ; labels T F F T T T
    # TP = 2 (0, 5), FP = 1 (2), TN = 1 (1), FN = 2 (3, 4)
    m = pope(predictions, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n_unparsed"]) == (2, 1, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(4 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2)
    assert m["yes_ratio"] == pytest.approx(3 / 6)

    m = pope(predictions, labels, unparsed_as=True)  # answer 3 now a true positive
    assert (m["tp"], m["fn"]) == (3, 1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["yes_ratio"] == pytest.approx(4 / 6)


def test_pope_errors():
    with pytest.raises(ValueError, match="neither yes nor no"):
        pope(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="1 predictions but 2 labels"):
        pope(["yes"], ["yes", "no"])


def test_parse_choice():
    assert parse_choice("B. The red circle.") == "B"
    assert parse_choice(" C) blue") == "C"
    assert parse_choice("(D) green") == "D"
    assert parse_choice("A") == "A"
    assert parse_choice("A red circle is on the left.") is None  # the article, not option A
    assert parse_choice("I think the correct option is C.") == "C"
    assert parse_choice("The answer is: (A)") == "A"
    assert parse_choice("the answer is a circle") is None


def test_multiple_choice_accuracy():
    result = multiple_choice_accuracy(["A. x", "The answer is B", "C", "no idea"], ["A", "C", "c", "D"])
    assert result == {"accuracy": 0.5, "n_correct": 2, "n": 4, "n_unparsed": 1}
