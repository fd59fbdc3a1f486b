"""Tests for lvlm/tokenizer.py: the vicuna_v1 template, BOS handling, image expansion, the
assistant mask, errors, and batch padding. Tokenizers are built locally (tests/tiny_tokenizer.py)."""

import json

import pytest
import torch

from lvlm.tokenizer import (
    SYSTEM,
    Tokenizer,
    encode_conversation,
    encode_conversations,
    encode_prompt,
    pad_batch,
    render_conversation,
    render_prompt,
)
from tiny_tokenizer import make_tiny_llama_style_tokenizer, make_tiny_tokenizer, tiny_tokenizer

# Written out by hand from LLaVA's conv_vicuna_v1 (independent of the module's constants).
SYSTEM_LITERAL = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
TWO_TURNS = [
    ("What is in the image?", "There is a red circle at the top left."),
    ("Is there a blue square?", "No, there is no blue square."),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    return Tokenizer.from_file(make_tiny_llama_style_tokenizer(tmp_path_factory.mktemp("llama_style")))


# ---------------------------------------------------------------------------------------- template


def test_system_prompt_is_exact():
    assert SYSTEM == SYSTEM_LITERAL


def test_one_turn_prompt_exact():
    assert render_prompt("What is in the image?") == (
        SYSTEM_LITERAL + " USER: <image>\nWhat is in the image? ASSISTANT:"
    )
    assert render_prompt("Describe it.", image=False) == SYSTEM_LITERAL + " USER: Describe it. ASSISTANT:"


def test_two_turns_exact_and_spans():
    text, spans = render_conversation(TWO_TURNS)
    assert text == (
        SYSTEM_LITERAL
        + " USER: <image>\nWhat is in the image? ASSISTANT: There is a red circle at the top left.</s>"
        + "USER: Is there a blue square? ASSISTANT: No, there is no blue square.</s>"
    )
    assert [text[a:b] for a, b in spans] == [
        "There is a red circle at the top left.</s>",
        "No, there is no blue square.</s>",
    ]


def test_open_last_turn_is_a_prompt():
    text, spans = render_conversation([TWO_TURNS[0], ("And the colour?", None)])
    assert text.endswith("top left.</s>USER: And the colour? ASSISTANT:")
    assert len(spans) == 1


def test_image_marker_moved_to_front_of_first_question():
    # LLaVA data often has "<image>" at either end of the question; it always ends up as "<image>\n" first.
    for question in ["What is this?\n<image>", "<image>\nWhat is this?", "What is this? <image>"]:
        assert render_prompt(question) == SYSTEM_LITERAL + " USER: <image>\nWhat is this? ASSISTANT:"


def test_empty_answer_renders_as_immediate_stop():
    text, spans = render_conversation([("Hi?", "")], image=False)
    assert text == SYSTEM_LITERAL + " USER: Hi? ASSISTANT:</s>"
    assert text[spans[0][0] : spans[0][1]] == "</s>"


def test_none_answer_before_last_turn_is_an_error():
    with pytest.raises(ValueError, match="answer of turn 0 is None"):
        render_conversation([("a?", None), ("b?", "c")])


# ---------------------------------------------------------------------------------------- tokenizer


def test_special_ids(tok):
    # tiny_tokenizer puts <unk>, <s>, </s>, <pad>, <image> at ids 0..4.
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id) == (1, 2, 3, 4)
    assert tok.stop_ids == [2]
    assert tok.token_id("USER") == tok.raw.token_to_id("USER")
    with pytest.raises(ValueError, match="'zebra' is not in the tokenizer at"):
        tok.token_id("zebra")


def test_bos_explicit_and_never_doubled(tok):
    words = ["red", "circle", "."]
    word_ids = [tok.token_id(w) for w in words]
    assert tok.encode("red circle.", add_bos=False) == word_ids  # the post-processor's <s> is not applied
    assert tok.encode("red circle.") == [1] + word_ids
    assert tok.encode("<s> red circle.") == [1] + word_ids  # already there: no second BOS
    assert tok.decode([1] + word_ids, skip_special_tokens=True) == "red circle."


def test_from_directory_and_config_names(tmp_path):
    make_tiny_tokenizer(tmp_path)
    assert Tokenizer.from_file(tmp_path).eos_id == 2
    # tokenizer_config.json beside it can rename the special tokens (here: pad = "<unk>").
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "<unk>"}}))
    assert Tokenizer.from_file(tmp_path).pad_id == 0


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in directory"):
        Tokenizer.from_file(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match="cannot read tokenizer.json at .*tokenizer.json"):
        Tokenizer.from_file(bad)


# ---------------------------------------------------------------------------------------- encoding


def test_image_expansion_exact_ids(tok):
    n = 7
    out = encode_prompt(tok, "What is in the image?", image_tokens_per_image=n)
    # Independent reference: the word-level tokenizer tokenises pieces the same as the whole.
    before = tok.encode(SYSTEM_LITERAL + " USER:", add_bos=True)
    after = tok.encode("What is in the image? ASSISTANT:", add_bos=False)
    assert out["input_ids"].tolist() == before + [4] * n + after
    assert out["input_ids"].dtype == torch.long


def test_assistant_mask_covers_exactly_the_answers(tok):
    out = encode_conversation(tok, TWO_TURNS, num_images=1, image_tokens_per_image=5)
    ids, mask = out["input_ids"], out["assistant_mask"]
    assert mask.dtype == torch.bool and ids.shape == mask.shape
    expected = []
    for _, answer in TWO_TURNS:
        expected += tok.encode(answer + "</s>", add_bos=False)
    assert ids[mask].tolist() == expected
    # the word-level decoder joins with spaces and removes the space before punctuation
    first_len = len(tok.encode(TWO_TURNS[0][1] + "</s>", add_bos=False))
    assert tok.decode(ids[mask][:first_len]) == "There is a red circle at the top left. </s>"
    # position by position: word-level tokenisation of the pieces equals that of the whole text
    pieces = [
        (tok.encode(SYSTEM_LITERAL + " USER:") + [4] * 5 + tok.encode("What is in the image? ASSISTANT:", add_bos=False), False),
        (tok.encode(TWO_TURNS[0][1] + "</s>", add_bos=False), True),
        (tok.encode("USER: " + TWO_TURNS[1][0] + " ASSISTANT:", add_bos=False), False),
        (tok.encode(TWO_TURNS[1][1] + "</s>", add_bos=False), True),
    ]
    assert ids.tolist() == [i for piece, _ in pieces for i in piece]
    assert mask.tolist() == [flag for piece, flag in pieces for _ in piece]
    assert not mask[ids == 4].any()


def test_assistant_mask_subword_tokenizer(llama_tok):
    # With "▁" word starts the token "▁There" also covers the space before the answer; it belongs
    # to the answer, ":" before it does not.
    out = encode_conversation(llama_tok, TWO_TURNS, num_images=1, image_tokens_per_image=3)
    ids, mask = out["input_ids"], out["assistant_mask"]
    masked = ids[mask].tolist()
    eos = llama_tok.eos_id
    cut = masked.index(eos) + 1
    assert llama_tok.decode(masked[:cut]) == TWO_TURNS[0][1] + "</s>"
    assert llama_tok.decode(masked[cut:]) == TWO_TURNS[1][1] + "</s>"
    # prompt-only encoding is a prefix of the conversation's ids
    prompt = encode_prompt(llama_tok, TWO_TURNS[0][0], image_tokens_per_image=3)["input_ids"]
    assert ids[: len(prompt)].tolist() == prompt.tolist()
    assert not mask[: len(prompt)].any() and mask[len(prompt)]


def test_no_image(tok):
    out = encode_conversation(tok, [("What is red?", "A circle.")], num_images=0, image_tokens_per_image=9)
    assert 4 not in out["input_ids"].tolist()
    assert "<image>" not in out["text"]


def test_two_images(tok):
    turns = [("What is in the image?", "A circle."), ("<image>\nAnd in this image?", "A square.")]
    out = encode_conversation(tok, turns, num_images=2, image_tokens_per_image=6)
    ids = out["input_ids"].tolist()
    assert ids.count(4) == 12
    first = ids.index(4)
    assert ids[first : first + 6] == [4] * 6


def test_encode_conversations_gives_what_one_call_each_gives(tok, llama_tok):
    conversations = [(TWO_TURNS, 1), ([("What is red?", "A circle.")], 0),
                     ([("What is in the image?", "A circle."), ("<image>\nAnd in this image?", "A square.")], 2),
                     ([("Is it red?", None)], 1)]
    for tokenizer in (tok, llama_tok):
        together = encode_conversations(tokenizer, conversations, image_tokens_per_image=3)
        assert len(together) == len(conversations)
        for (turns, num_images), batched in zip(conversations, together):
            alone = encode_conversation(tokenizer, turns, num_images=num_images, image_tokens_per_image=3)
            assert torch.equal(batched["input_ids"], alone["input_ids"])
            assert torch.equal(batched["assistant_mask"], alone["assistant_mask"])
            assert (batched["text"], batched["answer_spans"]) == (alone["text"], alone["answer_spans"])


def test_encode_conversations_names_the_bad_conversation(tok):
    good, bad = (TWO_TURNS, 1), ([("What?", "A.")], 2)
    with pytest.raises(ValueError, match=r"^conversation 1: encode_conversation: .* num_images=2"):
        encode_conversations(tok, [good, bad], image_tokens_per_image=4)
    with pytest.raises(ValueError, match=r"^data.json record 7: .* more than max_length=5"):
        encode_conversations(tok, [good], image_tokens_per_image=4, max_length=5, names=["data.json record 7"])


def test_marker_count_errors(tok):
    with pytest.raises(ValueError, match=r"has 1 '<image>' marker\(s\) but num_images=2"):
        encode_conversation(tok, [("What?", "A.")], num_images=2, image_tokens_per_image=4)
    with pytest.raises(ValueError, match=r"has 2 '<image>' marker\(s\) but num_images=1"):
        encode_conversation(tok, [("What?", "A."), ("<image> this?", "B.")], num_images=1, image_tokens_per_image=4)
    with pytest.raises(ValueError, match=r"has 1 '<image>' marker\(s\) but num_images=0"):
        encode_prompt(tok, "<image> What?", num_images=0, image_tokens_per_image=4)


def test_max_length_error(tok):
    length = len(encode_prompt(tok, "What?", image_tokens_per_image=10)["input_ids"])
    assert len(encode_prompt(tok, "What?", image_tokens_per_image=10, max_length=length)["input_ids"]) == length
    with pytest.raises(ValueError, match=f"is {length} tokens long .* more than max_length={length - 1}"):
        encode_prompt(tok, "What?", image_tokens_per_image=10, max_length=length - 1)


def test_missing_image_token_error():
    tok = tiny_tokenizer(with_image_token=False)
    with pytest.raises(ValueError, match="tokenizer.json at .* has no '<image>' token"):
        encode_prompt(tok, "What?", image_tokens_per_image=4)
    # without images it works
    assert encode_prompt(tok, "What?", num_images=0, image_tokens_per_image=4)["input_ids"][0] == 1


def test_transformers_parity(llama_tok):
    """Hugging Face's LLaVA processor expands <image> in the text, then tokenises; same ids."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=llama_tok.path)
    n = 5
    out = encode_conversation(llama_tok, TWO_TURNS, num_images=1, image_tokens_per_image=n)
    expanded_text = out["text"].replace("<image>", "<image>" * n)
    assert hf(expanded_text, add_special_tokens=True)["input_ids"] == out["input_ids"].tolist()


# ---------------------------------------------------------------------------------------- batching


def test_pad_batch_right_and_left():
    ids, lengths = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1]
    ids, lengths = pad_batch([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and ids.dtype == torch.long
    masks, _ = pad_batch([torch.tensor([True, False]), torch.tensor([True])], pad_id=False)
    assert masks.dtype == torch.bool and masks.tolist() == [[True, False], [True, False]]
    with pytest.raises(ValueError, match="side must be"):
        pad_batch([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="no sequences"):
        pad_batch([], 0)
