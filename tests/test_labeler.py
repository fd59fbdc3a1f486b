"""RLAIF-V labeler: verdicts from hand-set first-token logits; the batched forward against one prompt at a time."""

import math

import pytest
import torch

from lvlm.config import preset
from lvlm.llava import LlavaForConditionalGeneration
from lvlm.tokenizer import Tokenizer, encode_prompt
from rewards.claims import labeler_prompt
from rewards.labeler import (answer_token_id, claim_accepted, label_questions, question_logits, rejected_per_response,
                             response_score, yes_no_probabilities)
from tiny_tokenizer import make_tiny_llama_style_tokenizer, tiny_tokenizer

YES, YES_CAP, NO, NO_CAP = 0, 1, 2, 3  # token ids of "yes", "Yes", "no", "No"; id 4 is anything else


def test_probabilities_and_verdicts_from_log_probs():
    probs = torch.tensor(
        [
            [0.10, 0.20, 0.30, 0.15, 0.25],  # p_yes 0.30 < p_no 0.45 -> reject
            [0.40, 0.10, 0.20, 0.10, 0.20],  # p_yes 0.50 > p_no 0.30 -> accept
        ]
    )
    p_yes, p_no = yes_no_probabilities(torch.log(probs), [YES, YES_CAP], [NO, NO_CAP])
    assert p_yes.tolist() == pytest.approx([0.30, 0.50], abs=1e-6)
    assert p_no.tolist() == pytest.approx([0.45, 0.30], abs=1e-6)
    assert claim_accepted(p_yes, p_no).tolist() == [False, True]


def test_softmax_is_over_the_full_vocabulary():
    logits = torch.tensor([[1.0, 0.0, 0.0, 3.0]])  # V = 4
    p_yes, p_no = yes_no_probabilities(logits, [0], [1])
    z = math.e + 1 + 1 + math.e**3
    assert p_yes.item() == pytest.approx(math.e / z, rel=1e-6)  # not e / (e + 1)
    assert p_no.item() == pytest.approx(1 / z, rel=1e-6)


def test_exact_tie_rejects():
    logits = torch.zeros(1, 4)
    p_yes, p_no = yes_no_probabilities(logits, [0], [1])
    assert p_yes.item() == p_no.item() == 0.25
    assert claim_accepted(p_yes, p_no).tolist() == [False]


def test_bf16_logits_give_float32():
    p_yes, _ = yes_no_probabilities(torch.zeros(2, 8, dtype=torch.bfloat16), [0], [1])
    assert p_yes.dtype == torch.float32


def test_repeated_id_counts_once():
    logits = torch.zeros(1, 4)
    p_yes, _ = yes_no_probabilities(logits, [0, 0], [1])
    assert p_yes.item() == pytest.approx(0.25)


def test_bad_inputs():
    with pytest.raises(ValueError, match="both yes_ids and no_ids"):
        yes_no_probabilities(torch.zeros(1, 4), [0, 1], [1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        yes_no_probabilities(torch.zeros(1, 4), [4], [1])
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        yes_no_probabilities(torch.zeros(4), [0], [1])
    with pytest.raises(ValueError, match="empty"):
        yes_no_probabilities(torch.zeros(1, 4), [], [1])


def test_rejected_counts_and_score():
    accepted = torch.tensor([True, False, False, True, False])
    response_ids = torch.tensor([0, 0, 2, 2, 2])
    n_rejected = rejected_per_response(accepted, response_ids, 3)
    assert n_rejected.tolist() == [1, 0, 2]
    assert response_score(n_rejected).tolist() == [-1, 0, -2]
    assert response_score(3) == -3


# -- the batched labeler forward ------------------------------------------------------------

IMAGE_TOKENS = 4  # tiny-llava: 28 px images in 14 px patches


@pytest.fixture(scope="module")
def labeler():
    config = preset("tiny-llava")
    config.image_token_index = tiny_tokenizer().image_token_id  # the tokenizer's <image> (4)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def one_at_a_time(model, tok, pixel_values, questions):
    """Reference: each full prompt alone through model(...), the logits at its last position, [Q, V]."""
    rows = []
    for q in questions:
        ids = encode_prompt(tok, q, num_images=0 if pixel_values is None else 1,
                            image_tokens_per_image=IMAGE_TOKENS)["input_ids"]
        with torch.no_grad():
            rows.append(model(ids[None], pixel_values)[0, -1])
    return torch.stack(rows)


QUESTIONS = [labeler_prompt(q) for q in (
    "Is there a red circle?", "Is the blue square at the top left?", "Is there a red circle?",  # a repeat
    "Is it green?", "How many stars are there in this picture?")]


@pytest.mark.parametrize("max_rows", [64, 2])  # all rows at once; and chunks that reuse the shared head
def test_forked_batch_equals_prompts_alone(labeler, max_rows):
    tok = tiny_tokenizer()
    pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    reference = one_at_a_time(labeler, tok, pixel_values, QUESTIONS)
    got = question_logits(labeler, tok, pixel_values, QUESTIONS, image_tokens_per_image=IMAGE_TOKENS,
                          max_rows=max_rows)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)

    p_yes, p_no, accepted = label_questions(labeler, tok, pixel_values, QUESTIONS, image_tokens_per_image=IMAGE_TOKENS,
                                            max_rows=max_rows)
    probs = torch.softmax(reference.double(), dim=-1)
    ref_yes = probs[:, [tok.token_id("yes"), tok.token_id("Yes")]].sum(-1)
    ref_no = probs[:, [tok.token_id("no"), tok.token_id("No")]].sum(-1)
    torch.testing.assert_close(p_yes.double(), ref_yes, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(p_no.double(), ref_no, atol=1e-6, rtol=1e-4)
    assert accepted.tolist() == (ref_yes > ref_no).tolist()


def test_text_only_and_single_question(labeler):
    tok = tiny_tokenizer()
    for questions in (QUESTIONS[:2], QUESTIONS[3:4]):
        got = question_logits(labeler, tok, None, questions, image_tokens_per_image=IMAGE_TOKENS)
        torch.testing.assert_close(got, one_at_a_time(labeler, tok, None, questions), atol=1e-5, rtol=0)
    empty = label_questions(labeler, tok, None, [], image_tokens_per_image=IMAGE_TOKENS)
    assert [tuple(t.shape) for t in empty] == [(0,), (0,), (0,)]


def test_answer_token_ids(tmp_path):
    tok = tiny_tokenizer()
    assert answer_token_id(tok, "Yes") == tok.token_id("Yes")
    assert answer_token_id(tok, "no") == tok.token_id("no")
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        answer_token_id(tok, "Maybe")
    sp = Tokenizer.from_file(make_tiny_llama_style_tokenizer(tmp_path))
    assert answer_token_id(sp, "No") == sp.token_id("\u2581No")  # the word-start form, not the bare "No"
    assert sp.token_id("\u2581No") != sp.token_id("No")
    with pytest.raises(ValueError, match="bare word-start token"):
        answer_token_id(sp, "yes")  # this small BPE spells " yes" as "\u2581" "y" "es"


def test_label_questions_bad_image(labeler):
    with pytest.raises(ValueError, match=r"one image \[1, 3, H, W\]"):
        label_questions(labeler, tiny_tokenizer(), torch.zeros(2, 3, 28, 28), QUESTIONS,
                        image_tokens_per_image=IMAGE_TOKENS)
