"""The Fact-RLHF reward-model prompt: exact render, the spec's quoted fragments, seeded shuffle."""

import random

import pytest

from rewards.fact_prompt import fact_prompt

SYSTEM = "A chat between a curious user and an artificial intelligence assistant."

# Typed out in full (not built from the module's constants), so any drift in the strings fails.
# The evaluation sentences are our own wording; the fragments ANCHORS section 3 quotes are
# checked separately below.
EXPECTED_WITH_FACTS = (
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\n"
    "What is in the image? ASSISTANT: A cat on a mat.</s> "
    "USER: Please evaluate the quality of your last response. Judge it against each of the four "
    "criteria below.\n"
    "\n"
    "1. Accurate: Every statement in the response should match what the image really shows; the "
    "response should claim nothing that the image does not show or that is inconsistent with the "
    "image. Specifically, the AI's response should be fully supported by the combination of the "
    "following captions:\n"
    "  - A cat sleeps.\n"
    "  - A mat on the floor.\n"
    "\n"
    "2. Helpful: The response should do what the user asked for, and base its answer on what can "
    "be seen in the image.\n"
    "3. Language Natural: The response should read fluently, without repeated phrases or clumsy "
    "sentences.\n"
    "4. Concise: The response should give the information that is needed briefly and clearly, "
    "without filler.\n"
    "\n"
    "The best response meets all four criteria. ASSISTANT: "
    "Following your definitions, the quality score of my last response is"
)

EXPECTED_WITHOUT_FACTS = (
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\n"
    "What is in the image? ASSISTANT: A cat on a mat.</s> "
    "USER: Please evaluate the quality of your last response. Judge it against each of the four "
    "criteria below.\n"
    "\n"
    "1. Accurate: Every statement in the response should match what the image really shows; the "
    "response should claim nothing that the image does not show or that is inconsistent with the "
    "image.\n"
    "2. Helpful: The response should do what the user asked for, and base its answer on what can "
    "be seen in the image.\n"
    "3. Language Natural: The response should read fluently, without repeated phrases or clumsy "
    "sentences.\n"
    "4. Concise: The response should give the information that is needed briefly and clearly, "
    "without filler.\n"
    "\n"
    "The best response meets all four criteria. ASSISTANT: "
    "Following your definitions, the quality score of my last response is"
)

CAPTIONS = ["A cat sleeps.", "A mat on the floor."]


def test_renders_exactly_with_facts():
    assert fact_prompt(SYSTEM, "What is in the image?", "A cat on a mat.", CAPTIONS) == EXPECTED_WITH_FACTS


def test_renders_exactly_without_facts():
    got = fact_prompt(SYSTEM, "What is in the image?", "A cat on a mat.", CAPTIONS, use_facts=False)
    assert got == EXPECTED_WITHOUT_FACTS
    assert fact_prompt(SYSTEM, "What is in the image?", "A cat on a mat.", [], use_facts=False) == got


def test_image_token_moved_to_front():
    got = fact_prompt(SYSTEM, "What is in the image?\n<image>", "A cat on a mat.", CAPTIONS)
    assert got == EXPECTED_WITH_FACTS


def test_seeded_shuffle():
    captions = [f"caption {i}" for i in range(6)]
    for seed in (0, 1, 2):
        expected = list(captions)
        random.Random(seed).shuffle(expected)
        text = fact_prompt(SYSTEM, "Q", "R", captions, seed=seed)
        lines = [line[len("  - "):] for line in text.split("\n") if line.startswith("  - ")]
        assert lines == expected
    assert captions == [f"caption {i}" for i in range(6)]  # input not modified


def test_facts_need_captions():
    with pytest.raises(ValueError, match="at least one caption"):
        fact_prompt(SYSTEM, "Q", "R", [])


def test_spec_fragments_and_order():
    """The fragments ANCHORS section 3 quotes appear verbatim and in the released order."""
    text = fact_prompt(SYSTEM, "What is in the image?", "A cat on a mat.", CAPTIONS)
    fragments = [
        "A cat on a mat.</s> USER: Please evaluate the quality of your last response.",
        "1. Accurate:",
        "inconsistent with the image. Specifically, the AI's response should be fully supported by the "
        "combination of the following captions:\n  - A cat sleeps.\n  - A mat on the floor.\n",
        "2. Helpful",
        "3. Language Natural",
        "4. Concise",
        "ASSISTANT: Following your definitions, the quality score of my last response is",
    ]
    at = 0
    for fragment in fragments:
        found = text.find(fragment, at)
        assert found >= 0, fragment
        at = found + len(fragment)
    assert text.endswith(fragments[-1])
    assert text.isascii()
