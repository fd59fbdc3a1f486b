"""The Fact-RLHF reward-model prompt renders exactly as the LLaVA-RLHF release."""

import random

import pytest

from rewards.fact_prompt import fact_prompt

SYSTEM = "A chat between a curious user and an artificial intelligence assistant."

# Typed out in full (not built from the module's constants), so any drift in the strings fails.
EXPECTED_WITH_FACTS = (
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\n"
    "What is in the image? ASSISTANT: A cat on a mat.</s> "
    "USER: Please evaluate the quality of your last response. There are several dimensions you "
    "should consider in your evaluation:\n"
    "\n"
    "1. Accurate: The AI should provide factual and accurate information from the image, and "
    "refrain from making statements that are not supported by the image or inconsistent with the "
    "image. Specifically, the AI's response should be fully supported by the combination of the "
    "following captions:\n"
    "  - A cat sleeps.\n"
    "  - A mat on the floor.\n"
    "\n"
    "2. Helpful: The AI’s response should precisely serve the user's needs and interests, while "
    "grounding the response in the image.\n"
    "3. Language Natural: The AI should employ language that flows smoothly and is free from "
    "repetitive or awkward constructs.\n"
    "4. Concise: The AI should efficiently address the task or answer the question, communicating "
    "the necessary information with brevity and clarity.\n"
    "\n"
    "A good response should be accurate, helpful, language natural, and concise. ASSISTANT: "
    "Following your definitions, the quality score of my last response is"
)

EXPECTED_WITHOUT_FACTS = (
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\n"
    "What is in the image? ASSISTANT: A cat on a mat.</s> "
    "USER: Please evaluate the quality of your last response. There are several dimensions you "
    "should consider in your evaluation:\n"
    "\n"
    "1. Accurate: The AI should provide factual and accurate information from the image, and "
    "refrain from making statements that are not supported by the image or inconsistent with the "
    "image.\n"
    "2. Helpful: The AI’s response should precisely serve the user's needs and interests, while "
    "grounding the response in the image.\n"
    "3. Language Natural: The AI should employ language that flows smoothly and is free from "
    "repetitive or awkward constructs.\n"
    "4. Concise: The AI should efficiently address the task or answer the question, communicating "
    "the necessary information with brevity and clarity.\n"
    "\n"
    "A good response should be accurate, helpful, language natural, and concise. ASSISTANT: "
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
