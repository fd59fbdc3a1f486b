"""RLAIF-V's "divide" and "conquer" steps, rule-based: response -> claims -> yes/no questions.

RLAIF-V (Yu et al., arXiv 2405.17220, Sec. 3.2) scores a response by (1) dividing it into
atomic claims, (2) turning every claim into a yes/no question, (3) asking a labeler model each
question (`rewards/labeler.py`) and (4) counting the rejected claims. The released code does
(1) and (2) with a fine-tuned 8B language model; this file gives rule-based versions that need
no model (good enough for plain descriptive text, and exact on the synthetic world's
sentences), plus the model-based versions: prompt texts (our own wording), the output
parser, and functions that run them through a caller-supplied text generator.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

__all__ = [
    "split_claims",
    "claim_to_question",
    "labeler_prompt",
    "yes_no_answer",
    "without_labeler_suffix",
    "repeated_claims",
    "YES_NO_SUFFIX",
    "SPLIT_PROMPT",
    "QUESTION_PROMPT",
    "split_prompt",
    "question_prompt",
    "parse_dash_lines",
    "split_claims_with_model",
    "split_claims_with_model_batch",
    "claims_to_questions_with_model",
    "claims_to_questions_with_model_batch",
]

GenerateFn = Callable[[list[str]], list[str]]  # prompts -> one completion each, in order

MIN_CLAIM_CHARS = 4  # shorter fragments are dropped (CSR drops sentences under 4 characters)

# ----------------------------------------------------------------------------------------
# Divide: split a response into claims
# ----------------------------------------------------------------------------------------

# A list marker at the start of a line: "1. ", "2) ", "(3) ", "- ", "* ", "• ".
_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}[.)]|[-*\u2022])\s+")
# A possible sentence end: ".", "!" or "?" (a run of them), optional closing quotes or
# brackets, then whitespace. "3.5" is never a candidate: no whitespace follows the period.
_SENTENCE_END = re.compile(r"([.!?])[.!?]*[\"'\u201d\u2019)\]]*(\s+)")

# Abbreviations after which a period never ends a sentence.
_NEVER_FINAL = {"dr", "mr", "mrs", "ms", "prof", "st", "vs", "e.g", "i.e", "cf", "approx", "fig"}
# Abbreviations that may end a sentence: split only when the next word is capitalised.
_MAYBE_FINAL = {"etc", "jr", "sr", "inc", "ltd", "co"}


def _period_ends_sentence(text: str, period_at: int, next_char: str) -> bool:
    """Whether the "." at text[period_at] ends a sentence, given the next non-space character."""
    before = text[:period_at].split()
    word = before[-1].lstrip("([{\"'\u201c\u2018") if before else ""
    lowered = word.lower()
    if lowered in _NEVER_FINAL:
        return False
    if len(word) == 1 and word.isalpha() and word.isupper():  # an initial: "J. Smith"
        return False
    if lowered in _MAYBE_FINAL or "." in word:  # "etc.", "U.S.", "a.m.", "Ph.D."
        return not next_char.islower()
    return True


def _split_sentences(chunk: str) -> list[str]:
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(chunk):
        next_char = chunk[match.end() : match.end() + 1]
        if match.group(1) == "." and not _period_ends_sentence(chunk, match.start(1), next_char):
            continue
        pieces.append(chunk[start : match.start(2)])
        start = match.end()
    pieces.append(chunk[start:])
    return pieces


def split_claims(response: str, *, min_chars: int = MIN_CLAIM_CHARS) -> list[str]:
    """Split a response into claims: its sentences and list items, in order.

    Each line is a separate unit; a leading list marker ("1.", "2)", "-", "*", "•") is
    removed. Inside a line, a sentence ends at ".", "!" or "?" followed by whitespace, except
    after titles and Latin abbreviations ("Dr.", "Mr.", "Mrs.", "vs.", "e.g.", "i.e."), after
    initials ("J. Smith"), and after "etc." or dotted abbreviations ("U.S.", "a.m.") when the
    next word starts in lower case. Decimal numbers ("3.5") never split. Claims are stripped
    and those shorter than `min_chars` characters are dropped.

    Rule-based stand-in for RLAIF-V's model-based "divide" step (the released code rewrites
    claims into self-contained sentences with a fine-tuned language model, see
    `SPLIT_PROMPT`); pronouns are not resolved here.
    """
    claims = []
    for line in response.splitlines():
        line = _LIST_MARKER.sub("", line, count=1)
        for sentence in _split_sentences(line):
            sentence = sentence.strip()
            if len(sentence) >= min_chars:
                claims.append(sentence)
    return claims


# ----------------------------------------------------------------------------------------
# Conquer: claim -> yes/no question
# ----------------------------------------------------------------------------------------

YES_NO_SUFFIX = " Please answer yes or no."

_BE = {"is", "are", "was", "were"}
_HAVE = {"has": "Does", "have": "Do", "had": "Did"}
_AUXILIARIES = {"does", "do", "did", "can", "could", "will", "would", "should", "may", "might", "must"}
# Words a noun-phrase subject commonly starts with; the "The X is Y" rule only fires for these.
_SUBJECT_STARTS = {
    "the", "a", "an", "this", "that", "these", "those", "it", "he", "she", "they", "we", "you",
    "his", "her", "its", "their", "our", "my", "your", "some", "several", "many", "few", "both",
    "all", "each", "every", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "another", "other", "no", "most", "only",
}  # fmt: skip
_MAX_SUBJECT_WORDS = 8


def _lower_first(text: str) -> str:
    """Lower-case the first letter unless the first word looks like a name or is "I".

    Kept as written: "I" and its contractions ("I'm"), all-capital words ("TV", "NASA") and
    words with a capital after the first letter ("iPhone", "McDonald"). Other names
    ("John") cannot be told from ordinary words without a lexicon and are lower-cased.
    """
    if not text:
        return text
    first = text.split()[0]
    core = re.sub(r"[^A-Za-z']", "", first)
    if core == "I" or core.startswith("I'"):
        return text
    if len(core) > 1 and (core.isupper() or any(c.isupper() for c in core[1:])):
        return text
    return text[0].lower() + text[1:]


def claim_to_question(claim: str) -> str:
    """Turn a declarative claim into a yes/no question, by rule.

    Shapes handled (the first verb-like word decides; negations are kept):
      "There is a red circle on the left." -> "Is there a red circle on the left?"
      "There are two boxes."               -> "Are there two boxes?"
      "The X is Y." / "The X are Y."       -> "Is the X Y?" / "Are the X Y?"
        (any subject of at most 8 words starting with a determiner, pronoun or number)
      "X has Y." / "X have Y." / "X had Y." -> "Does X have Y?" / "Do X have Y?" / "Did X have Y?"
      "X has been Y." -> "Has X been Y?";  "X can Y." -> "Can X Y?"; "X does not Y." -> "Does X not Y?"
    Anything else: "Is it true that <claim>?" with the final period removed and the first
    letter lower-cased unless it starts with "I" or looks like a name (see `_lower_first`).
    A claim that already ends with "?" is returned unchanged.

    Rule-based stand-in for RLAIF-V's model-based conversion (`QUESTION_PROMPT`).
    """
    text = claim.strip()
    if text.endswith("?"):
        return text
    text = text.rstrip(" .!;:")
    if not text:
        raise ValueError(f"claim_to_question: claim {claim!r} has no words")
    words = text.split()
    lowered = [w.lower() for w in words]

    if len(words) > 2 and lowered[0] == "there" and lowered[1] in _BE:
        return f"{lowered[1].capitalize()} there {' '.join(words[2:])}?"

    for k in range(1, min(len(words) - 1, _MAX_SUBJECT_WORDS + 1)):
        verb = lowered[k]
        if verb not in _BE and verb not in _HAVE and verb not in _AUXILIARIES:
            continue
        subject = " ".join(words[:k])
        rest = " ".join(words[k + 1 :])
        if any(ch in subject for ch in ",;:"):
            break  # an introductory clause, not a subject: use the fallback
        if verb in _BE:
            if lowered[0] in _SUBJECT_STARTS:
                return f"{verb.capitalize()} {_lower_first(subject)} {rest}?"
            break
        if verb in _HAVE:
            if lowered[k + 1] in {"been", "got", "not"}:  # auxiliary "has": move it
                return f"{verb.capitalize()} {_lower_first(subject)} {rest}?"
            return f"{_HAVE[verb]} {_lower_first(subject)} have {rest}?"
        return f"{verb.capitalize()} {_lower_first(subject)} {rest}?"  # can / does / will ...

    return f"Is it true that {_lower_first(text)}?"


# The words a yes/no question starts with ("Is there a dog?", "Does the man wear a hat?").
_YES_NO_OPENERS = _BE | set(_HAVE) | _AUXILIARIES | {"am"}


def yes_no_answer(question: str, answer: str) -> bool | None:
    """A short answer to a yes/no question, read as one claim: True for "yes", False for "no".

    None when `question` is not a yes/no question (it must end with "?", or with "?" and
    YES_NO_SUFFIX, and start with a form of be / have / do or a modal) or when the answer's
    first word is neither "yes" nor "no" (then it is split into claims like any response).
    RLAIF-V's instructions include short-answer VQA data (VQA v2, OKVQA, TextVQA; paper Sec.
    4.1), and its model-based splitter turns "Is there a dog?" + "No." into the claim "There
    is no dog."; by rule, the labeler is asked the question itself and the claim holds when
    its answer is the same as the response's (`rewards.labeler.claim_accepted` on the flipped
    probabilities for a "no").
    """
    text = without_labeler_suffix(question)
    words = text.split()
    if not text.endswith("?") or not words or words[0].lower() not in _YES_NO_OPENERS:
        return None
    first = re.match(r"\s*([A-Za-z]+)", answer)
    word = first.group(1).lower() if first else ""
    return True if word == "yes" else False if word == "no" else None


def repeated_claims(claims: Sequence[str], objects_of: Callable[[str], list[str]]) -> list[bool]:
    """Per claim, whether it only repeats: it names at least one object, and every object it names was
    named by an earlier claim of the same response. ``objects_of``: claim -> the objects it names
    (e.g. ``rewards.metrics.find_objects`` with the world's vocabulary).

    Not in RLAIF-V. A claim that restates one already judged true is judged true again, so a response
    padded with restatements scores as well as one that names more objects, at the same length
    (``rewards.pairs`` balances word counts); ``recipes/rlaif_v.py --reject_repeats`` counts such
    claims as rejected. ["The red circle is on the left.", "A red disk is at the left.", "A blue star
    is at the top."] -> [False, True, False] when "disk" is a synonym of "circle".
    """
    seen: set = set()
    repeated = []
    for claim in claims:
        named = set(objects_of(claim))
        repeated.append(bool(named) and named <= seen)
        seen |= named
    return repeated


def without_labeler_suffix(question: str) -> str:
    """The question stripped, and without a trailing YES_NO_SUFFIX (the inverse of `labeler_prompt`)."""
    return question.strip().removesuffix(YES_NO_SUFFIX.strip()).rstrip()


def labeler_prompt(question: str) -> str:
    """The question as put to the labeler model: `question + " Please answer yes or no."` (RLAIF-V)."""
    return question + YES_NO_SUFFIX


# ----------------------------------------------------------------------------------------
# Model-based divide and conquer: prompt texts and the output parser
# ----------------------------------------------------------------------------------------
# Our own wording of the two instructions the RLAIF-V release gives its splitter and its
# question converter (two fine-tuned Llama-3-8B models). Same structure and intent: a task
# statement, the output format as a "- " list under a "###" header, then the input under a
# second "###" header. They are not the released texts, so a released splitter model may do
# a little worse on them; to drive one with the exact inputs it was trained on, pass your
# own copy of its text as `instructions=`. Wrap the result in the splitter model's own chat
# template.

SPLIT_PROMPT = (
    "Below is a question about an image and an answer to it. List every fact that the "
    "answer states about the image. Write each fact as a sentence that can be understood "
    "on its own: repeat the thing it is about instead of using a pronoun. Leave out "
    "opinions, feelings and other subjective remarks.\n\n"
    "Write the result in exactly this form:\n"
    "### Facts:\n"
    "- {first fact}\n"
    "- {second fact}\n"
    "- ...\n\n"
    "### Question and answer:\n"
)

QUESTION_PROMPT = (
    "Rewrite each statement below as a question that can be answered with yes or no. Handle "
    "the statements one at a time and in order. Keep the tense of each statement and add "
    "nothing to its content.\n"
    "If a statement contains a negation (such as not, no or never), the question must keep "
    "that negation: check every question for it before you write it down.\n\n"
    "Write the result in exactly this form:\n"
    "### Questions:\n"
    "- {first question}\n"
    "- {second question}\n"
    "- ...\n\n"
    "### Statements:"
)


def split_prompt(question: str, answer: str, *, max_words: int = 300, instructions: str = SPLIT_PROMPT) -> str:
    """Splitter input: `instructions` + "Question: {question}\\nAnswer: {answer}".

    As released, the whole text is cut to its first `max_words` space-separated words.
    `instructions` defaults to our `SPLIT_PROMPT`.
    """
    content = instructions + "Question: " + question + "\nAnswer: " + answer
    return " ".join(content.split(" ")[:max_words])


def question_prompt(claims: Iterable[str], *, instructions: str = QUESTION_PROMPT) -> str:
    """Converter input: `instructions` followed by "\\n- {claim}\\n" for each claim.

    `instructions` defaults to our `QUESTION_PROMPT`.
    """
    return instructions + "".join(f"\n- {claim}\n" for claim in claims)


def parse_dash_lines(text: str) -> list[str]:
    """The items of a model's "- " list: the text after "- " on each line that starts so.

    Other lines ("### Facts:", blank lines, chatter) are ignored; items are stripped and
    empty ones dropped.
    """
    items = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("- ") or line == "-":
            item = line[1:].strip()
            if item:
                items.append(item)
    return items


# ----------------------------------------------------------------------------------------
# Model-based divide and conquer: prompt -> generate_fn -> "- " list
# ----------------------------------------------------------------------------------------
# The text generator is the caller's: `generate_fn(prompts: list[str]) -> list[str]`, one
# completion per prompt, in order (e.g. a search-engine call wrapped by a recipe). This
# package imports only `lvlm`, so it never builds a decoder itself.


def _generate(generate_fn: GenerateFn, prompts: list[str], where: str) -> list[str]:
    outputs = list(generate_fn(prompts))
    if len(outputs) != len(prompts):
        raise ValueError(f"{where}: generate_fn returned {len(outputs)} texts for {len(prompts)} prompts")
    for i, out in enumerate(outputs):
        if not isinstance(out, str):
            raise ValueError(f"{where}: generate_fn returned {type(out).__name__} for prompt {i}, expected str")
    return outputs


def split_claims_with_model_batch(
    generate_fn: GenerateFn,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    min_chars: int = MIN_CLAIM_CHARS,
    max_words: int = 300,
    instructions: str = SPLIT_PROMPT,
) -> list[list[str]]:
    """RLAIF-V's model-based "divide" for many (question, answer) pairs in one generate_fn call.

    Each pair becomes `split_prompt(question, answer)`; the model's reply is read with
    `parse_dash_lines`, and items shorter than `min_chars` characters are dropped (the same
    rule as `split_claims`). Returns one list of claims per pair, in input order.
    Source: RLAIF-V (arXiv 2405.17220, Sec. 3.2), the released splitter's input/output format.
    """
    if len(questions) != len(answers):
        raise ValueError(f"split_claims_with_model_batch: {len(questions)} questions but {len(answers)} answers")
    if not questions:
        return []
    prompts = [split_prompt(q, a, max_words=max_words, instructions=instructions) for q, a in zip(questions, answers)]
    outputs = _generate(generate_fn, prompts, "split_claims_with_model_batch")
    return [[c for c in parse_dash_lines(out) if len(c) >= min_chars] for out in outputs]


def split_claims_with_model(generate_fn: GenerateFn, question: str, answer: str, **options) -> list[str]:
    """The claims of one answer by the model-based splitter (see `split_claims_with_model_batch`)."""
    return split_claims_with_model_batch(generate_fn, [question], [answer], **options)[0]


def claims_to_questions_with_model_batch(
    generate_fn: GenerateFn, claim_lists: Sequence[Sequence[str]], *, instructions: str = QUESTION_PROMPT
) -> list[list[str]]:
    """RLAIF-V's model-based claim -> yes/no question conversion, one prompt per claim list.

    All claims of one response go into one `question_prompt` (as released: the converter
    rewrites a whole list at once); the reply is read with `parse_dash_lines`. The model may
    return a different number of questions than it was given claims: the lists are returned
    as they are (RLAIF-V drops a response pair whose judged-claim count does not match, see
    `rewards.pairs`). An empty claim list gives [] without calling the model. The questions
    come without the " Please answer yes or no." suffix (`labeler_prompt` adds it).
    """
    claim_lists = [list(claims) for claims in claim_lists]
    asked = [i for i, claims in enumerate(claim_lists) if claims]
    results: list[list[str]] = [[] for _ in claim_lists]
    if asked:
        prompts = [question_prompt(claim_lists[i], instructions=instructions) for i in asked]
        outputs = _generate(generate_fn, prompts, "claims_to_questions_with_model_batch")
        for i, out in zip(asked, outputs):
            results[i] = parse_dash_lines(out)
    return results


def claims_to_questions_with_model(generate_fn: GenerateFn, claims: Sequence[str], **options) -> list[str]:
    """The yes/no questions for one response's claims (see `claims_to_questions_with_model_batch`)."""
    return claims_to_questions_with_model_batch(generate_fn, [claims], **options)[0]
