"""The fact-augmented reward-model prompt of Fact-RLHF (LLaVA-RLHF).

LLaVA-RLHF (Sun et al., arXiv 2309.14525, Sec. 2.3, "Factually Augmented RLHF") scores a
response by appending an evaluation turn to the conversation and reading the reward model's
scalar head at the final token. In the fact-augmented version the evaluation turn also lists
ground-truth captions of the image (5 COCO captions, or A-OKVQA rationales), in shuffled
order, so the reward model can check the response against them.

The evaluation text below is our own wording. It keeps the released prompt's structure and
the fragments our spec quotes (ANCHORS section 3): the opening request "USER: Please evaluate
the quality of your last response.", the four numbered criteria "1. Accurate:" (ending
"inconsistent with the image."), "2. Helpful", "3. Language Natural" and "4. Concise", the
facts header and its "  - {caption}" lines, and the closing "ASSISTANT: Following your
definitions, the quality score of my last response is". The sentences in between are ours,
in plain ASCII. Our reward model (`rewards/reward_model.py`) is trained with this text; it is
not meant to drive a reward model released by LLaVA-RLHF, which saw slightly different tokens.

Assembly, as released: the conversation renders as
`{system} USER: <image>\\n{question} ASSISTANT: {response}</s>`, then the evaluation text is
appended after one space. "</s>" stands for the end-of-sequence token: tokenize it as the
special token, not as characters (`rewards.reward_model.reward_inputs` does).
"""

from __future__ import annotations

import random
from typing import Sequence

__all__ = [
    "PROMPT_TEXTS",
    "FACTS_HEADER",
    "EVALUATION_HEAD",
    "EVALUATION_TAIL",
    "facts_block",
    "evaluation_turn",
    "fact_prompt",
]

IMAGE_TOKEN = "<image>"
END_OF_TURN = "</s>"

EVALUATION_HEAD = (
    "USER: Please evaluate the quality of your last response. Judge it against each of the "
    "four criteria below.\n\n"
    "1. Accurate: Every statement in the response should match what the image really shows; "
    "the response should claim nothing that the image does not show or that is "
    "inconsistent with the image."
)

EVALUATION_TAIL = (
    "2. Helpful: The response should do what the user asked for, and base its answer on what "
    "can be seen in the image.\n"
    "3. Language Natural: The response should read fluently, without repeated phrases or "
    "clumsy sentences.\n"
    "4. Concise: The response should give the information that is needed briefly and "
    "clearly, without filler.\n\n"
    "The best response meets all four criteria. "
    "ASSISTANT: Following your definitions, the quality score of my last response is"
)

FACTS_HEADER = (
    "Specifically, the AI's response should be fully supported by the combination of the "
    "following captions:\n"
)


# Every fixed text of the prompt: what a tokenizer's vocabulary must cover (the synthetic
# world's word-level tokenizer is built with these as extra texts).
PROMPT_TEXTS = (EVALUATION_HEAD, FACTS_HEADER, EVALUATION_TAIL)


def facts_block(captions: Sequence[str], *, seed: int | None = None) -> str:
    """FACTS_HEADER followed by one line "  - {caption}\\n" per caption.

    Captions are shuffled with `random.Random(seed)` (a copy; the input is not modified);
    with seed=None they keep their order. (The release shuffles with the global RNG on
    every call.)
    """
    captions = list(captions)
    if seed is not None:
        random.Random(seed).shuffle(captions)
    return FACTS_HEADER + "".join(f"  - {caption}\n" for caption in captions)


def evaluation_turn(captions: Sequence[str] = (), *, seed: int | None = None, use_facts: bool = True) -> str:
    """The evaluation turn appended after the response (no leading space).

    With facts: EVALUATION_HEAD + " " + facts_block(captions) + "\\n" + EVALUATION_TAIL
    (the facts block ends with a newline, so a blank line precedes "2. Helpful").
    Without ("standard RLHF"): EVALUATION_HEAD + "\\n" + EVALUATION_TAIL.
    """
    if not use_facts:
        return EVALUATION_HEAD + "\n" + EVALUATION_TAIL
    if len(captions) == 0:
        raise ValueError("evaluation_turn: use_facts=True needs at least one caption (or pass use_facts=False)")
    return EVALUATION_HEAD + " " + facts_block(captions, seed=seed) + "\n" + EVALUATION_TAIL


def fact_prompt(
    system: str,
    question: str,
    response: str,
    captions: Sequence[str],
    *,
    seed: int | None = None,
    use_facts: bool = True,
) -> str:
    """The full reward-model input text of Fact-RLHF (LLaVA-RLHF's assembly, our evaluation wording).

    `{system} USER: <image>\\n{question} ASSISTANT: {response}</s> ` + `evaluation_turn(...)`

    system: the conversation's system prompt (vicuna_v1 for LLaVA-1.5); question: the user
    turn without the image token (any "<image>" in it is removed and the token is put
    first, as LLaVA's preprocessing does); response: the policy's answer; captions: the
    image's ground-truth captions, shuffled by `random.Random(seed)` (kept in order when
    seed is None); use_facts=False leaves the captions out (plain RLHF reward prompt).
    The reward is read at the last token of the result ("is").
    """
    question = question.replace(IMAGE_TOKEN, "").strip()
    conversation = f"{system} USER: {IMAGE_TOKEN}\n{question} ASSISTANT: {response}{END_OF_TURN}"
    return conversation + " " + evaluation_turn(captions, seed=seed, use_facts=use_facts)
