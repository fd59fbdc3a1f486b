"""RLAIF-V divide and conquer, rule-based: claim splitting and claim -> yes/no question."""

import pytest

from rewards.claims import (
    QUESTION_PROMPT,
    SPLIT_PROMPT,
    claim_to_question,
    claims_to_questions_with_model,
    claims_to_questions_with_model_batch,
    labeler_prompt,
    parse_dash_lines,
    question_prompt,
    repeated_claims,
    split_claims,
    split_claims_with_model,
    split_claims_with_model_batch,
    split_prompt,
    yes_no_answer,
)


def test_split_claims_abbreviations_and_decimals():
    text = "Dr. Smith bought 3.5 kg of apples, e.g. red ones, in the U.S. He left."
    assert split_claims(text) == ["Dr. Smith bought 3.5 kg of apples, e.g. red ones, in the U.S.", "He left."]


def test_split_claims_initials_etc_titles():
    text = "J. R. Smith has pens, cups, etc. and more. Mr. Lee vs. Ms. Kim? Yes."
    assert split_claims(text) == ["J. R. Smith has pens, cups, etc. and more.", "Mr. Lee vs. Ms. Kim?", "Yes."]


def test_split_claims_list_items_and_short_fragments():
    text = "Objects:\n1. A red circle.\n2) A blue box. It is big!\n- Green disk\n* ok\n\n"
    assert split_claims(text) == ["Objects:", "A red circle.", "A blue box.", "It is big!", "Green disk"]


def test_split_claims_lower_case_sentences():
    # Word-level tokenizers may lower-case everything; sentences must still split.
    assert split_claims("the cat sits. the dog runs.") == ["the cat sits.", "the dog runs."]


@pytest.mark.parametrize(
    "claim, question",
    [
        ("There is a red circle on the left.", "Is there a red circle on the left?"),
        ("There are two boxes.", "Are there two boxes?"),
        ("There is no cat.", "Is there no cat?"),
        ("The box is red.", "Is the box red?"),
        ("The boxes are red.", "Are the boxes red?"),
        ("A man is riding a horse.", "Is a man riding a horse?"),
        ("The dog has a ball.", "Does the dog have a ball?"),
        ("Birds have wings.", "Do birds have wings?"),
        ("The cup has been broken.", "Has the cup been broken?"),
        ("It can fly.", "Can it fly?"),
        ("The dog does not have a ball.", "Does the dog not have a ball?"),
        ("Red circles appear twice.", "Is it true that red circles appear twice?"),
        ("I see a cat.", "Is it true that I see a cat?"),
        ("NASA built the rocket.", "Is it true that NASA built the rocket?"),
        ("Looking closely, the cat is black.", "Is it true that looking closely, the cat is black?"),
        ("Is it red?", "Is it red?"),
    ],
)
def test_claim_to_question(claim, question):
    assert claim_to_question(claim) == question


def test_claim_to_question_empty():
    with pytest.raises(ValueError, match="no words"):
        claim_to_question(" . ")


@pytest.mark.parametrize(
    "question, answer, expected",
    [
        ("Is there a red circle in the image?", "Yes.", True),
        ("Is there a red circle in the image? Please answer yes or no.", "no", False),
        ("Are there two boxes?", "No, there is one.", False),
        ("Does the star have a blue colour?", " YES", True),
        ("Can you see a cross?", "Yes", True),
        ("Is there a cat?", "There is a cat.", None),  # not a short answer: split like a description
        ("Is there a cat?", "Yesterday there was.", None),  # whole words only
        ("Describe the image.", "Yes.", None),  # not a yes/no question
        ("What colour is the star?", "No idea.", None),  # a question, but not yes/no
        ("Is the star red", "Yes.", None),  # no question mark
    ],
)
def test_yes_no_answer(question, answer, expected):
    assert yes_no_answer(question, answer) is expected


def test_labeler_prompt_exact_suffix():
    assert labeler_prompt("Is there a dog?") == "Is there a dog? Please answer yes or no."


def test_parse_dash_lines():
    text = "### Facts:\n- A cat.\n-   B dog  \n\nnot a fact\n- \n  - indented item\n"
    assert parse_dash_lines(text) == ["A cat.", "B dog", "indented item"]


def test_model_prompts():
    assert question_prompt(["a b.", "c d."]) == QUESTION_PROMPT + "\n- a b.\n\n- c d.\n"
    assert QUESTION_PROMPT.endswith("### Statements:")
    assert "### Facts:\n- {first fact}\n- {second fact}\n- ...\n\n" in SPLIT_PROMPT
    assert SPLIT_PROMPT.endswith("### Question and answer:\n")
    rendered = split_prompt("Describe it.", "A cat.")
    assert rendered == SPLIT_PROMPT + "Question: Describe it.\nAnswer: A cat."
    long_answer = " ".join(["word"] * 400)
    assert len(split_prompt("Q?", long_answer).split(" ")) == 300
    assert split_prompt("Q?", "A.", instructions="Go:\n") == "Go:\nQuestion: Q?\nAnswer: A."
    assert question_prompt(["x y."], instructions="Do:") == "Do:\n- x y.\n"


class ScriptedGenerator:
    """A stand-in for a text generator: records the prompts, answers from a fixed script."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        out, self.replies = self.replies[: len(prompts)], self.replies[len(prompts) :]
        return out


def test_split_claims_with_model():
    reply = "### Facts:\n- There is a red circle.\n- ok\n- The circle is at the top.\nThat is all."
    gen = ScriptedGenerator([reply])
    claims = split_claims_with_model(gen, "Describe it.", "A red circle sits at the top.")
    assert claims == ["There is a red circle.", "The circle is at the top."]  # "ok" is under 4 chars
    assert gen.calls == [[SPLIT_PROMPT + "Question: Describe it.\nAnswer: A red circle sits at the top."]]


def test_split_claims_with_model_batch_one_call():
    gen = ScriptedGenerator(["- A b c.", "nothing", "- D e f.\n- G h i."])
    got = split_claims_with_model_batch(gen, ["q1", "q2", "q3"], ["a1", "a2", "a3"])
    assert got == [["A b c."], [], ["D e f.", "G h i."]]
    assert len(gen.calls) == 1 and len(gen.calls[0]) == 3
    assert gen.calls[0][1] == split_prompt("q2", "a2")
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        split_claims_with_model_batch(gen, ["q1", "q2"], ["a1"])
    with pytest.raises(ValueError, match="returned 0 texts for 1 prompts"):
        split_claims_with_model(ScriptedGenerator([]), "q", "a")


def test_claims_to_questions_with_model():
    gen = ScriptedGenerator(["### Questions:\n- Is there a red circle?\n- Is the circle not blue?"])
    got = claims_to_questions_with_model(gen, ["There is a red circle.", "The circle is not blue."])
    assert got == ["Is there a red circle?", "Is the circle not blue?"]
    assert gen.calls == [[QUESTION_PROMPT + "\n- There is a red circle.\n\n- The circle is not blue.\n"]]
    gen = ScriptedGenerator(["- Q1?", "- Q2?\n- Q3?"])
    assert claims_to_questions_with_model_batch(gen, [["c1"], [], ["c2", "c3"]]) == [["Q1?"], [], ["Q2?", "Q3?"]]
    assert len(gen.calls[0]) == 2  # the empty claim list is not sent to the model
    assert claims_to_questions_with_model(ScriptedGenerator([]), []) == []


def test_repeated_claims_only_restate_earlier_objects():
    names = {"circle": "circle", "disk": "circle", "star": "star", "box": "box"}

    def objects_of(claim):
        return [names[w] for w in claim.lower().rstrip(".").split() if w in names]

    claims = ["A red circle is on the left.", "The red disk is at the left.",  # the circle again
              "The image is bright.",  # names nothing: not a repeat
              "A star and a circle are at the top.",  # a new object beside an old one: not a repeat
              "The star is at the top.", "A blue box is below."]
    assert repeated_claims(claims, objects_of) == [False, True, False, False, True, False]
    assert repeated_claims([], objects_of) == []
