"""Tests of recipes/sft.py: the loss against a hand computation, batching, LLaVA conversation files, the CLI."""

import json
import math

import pytest
import torch

from lvlm.checkpoint import load_lvlm, save_lvlm
from lvlm.llava import LlavaForConditionalGeneration
from lvlm.tokenizer import Tokenizer
from lvlm.world import sample_scene
from lvlm.world.tokenizer import build_world_tokenizer
from recipes import sft
from recipes.world_models import WORLD_PRESETS, init_llava_weights, lvlm_config


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are a parameter (so the loss has a gradient), whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, pixel_values=None, *, logits_at=None, share_prefix=False):
        return self.logits if logits_at is None else self.logits[logits_at]


def test_sft_loss_is_the_per_example_mean_of_assistant_token_nll():
    torch.manual_seed(0)
    V = 5
    ids = torch.tensor([[1, 2, 3, 4, 0], [1, 3, 3, 2, 4]])
    # row 0 trains on tokens at positions 2 and 3; row 1 only on position 4
    mask = torch.tensor([[False, False, True, True, False], [False, False, False, False, True]])
    logits = torch.randn(2, 5, V)
    loss, metrics = sft.sft_loss(FixedLogits(logits), {"input_ids": ids, "assistant_mask": mask})

    def nll(b, t):  # logits at t - 1 predict token t
        row = logits[b, t - 1].tolist()
        return -(row[ids[b, t]] - math.log(sum(math.exp(x) for x in row)))

    expected = ((nll(0, 2) + nll(0, 3)) / 2 + nll(1, 4)) / 2  # per example, then over examples
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["tokens"].item() == 3
    loss.backward()  # differentiable


def test_sft_loss_ignores_padding_and_prompt_tokens():
    V = 4
    ids = torch.tensor([[1, 2, 3, 0, 0]])
    mask = torch.tensor([[False, False, True, False, False]])
    logits = torch.zeros(1, 5, V)
    logits[0, 1, 3] = 10.0  # the one scored prediction is confident and right
    logits[0, 2:, :] = torch.tensor([100.0, -100.0, -100.0, -100.0])  # garbage after the answer: ignored
    loss, _ = sft.sft_loss(FixedLogits(logits), {"input_ids": ids, "assistant_mask": mask})
    expected = -(10.0 - math.log(math.exp(10.0) + 3))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_sft_loss_on_a_real_model_matches_the_full_logits_computation():
    """sft_loss asks the model for the scored positions' logits only (``logits_at``); the loss and its
    gradient must equal those of the plain computation on the full [B, T, V] logits."""
    from optim.logprobs import sequence_logprobs

    config = lvlm_config(WORLD_PRESETS["micro"], vocab_size=48)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    init_llava_weights(model)
    n_img = config.image_tokens_per_image
    ids = torch.randint(5, 40, (3, n_img + 12))  # (the image token is 4)
    ids[:, 1:1 + n_img] = config.image_token_index
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, -5:], mask[1, -2:], mask[2, n_img + 3:n_img + 6] = True, True, True
    pixels = torch.randn(3, 3, config.vision_config.image_size, config.vision_config.image_size)
    batch = {"input_ids": ids, "assistant_mask": mask, "pixel_values": pixels}

    loss, metrics = sft.sft_loss(model, batch)
    grad = torch.autograd.grad(loss, model.language_model.lm_head.weight)[0]
    logits = model(ids, pixels)[:, :-1]  # [B, T - 1, V]
    reference = -sequence_logprobs(logits, ids[:, 1:], mask[:, 1:], average=True).mean()
    reference_grad = torch.autograd.grad(reference, model.language_model.lm_head.weight)[0]
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-6)
    hits = ((logits.argmax(-1) == ids[:, 1:]) & mask[:, 1:]).sum()
    assert metrics["tokens"].item() == 10
    assert metrics["token_accuracy"].item() == pytest.approx(hits.item() / 10)


def _example(ids, mask, n_images):
    return {"input_ids": torch.tensor(ids), "assistant_mask": torch.tensor(mask),
            "pixel_values": None if n_images == 0 else torch.full((n_images, 3, 2, 2), float(len(ids)))}


def test_collate_pads_and_stacks_only_the_images_present():
    image = 9
    rows = [_example([1, image, image, 5], [False, False, False, True], 1),
            _example([1, 6, 7], [False, True, True], 0),  # text-only row: no image, no image tokens
            _example([1, image, image, 8, 8, 8], [False, False, False, True, True, True], 1)]
    batch = sft.collate_sft(rows, pad_id=0, image_token_id=image, image_tokens_per_image=2)
    assert batch["input_ids"].tolist() == [[1, 9, 9, 5, 0, 0], [1, 6, 7, 0, 0, 0], [1, 9, 9, 8, 8, 8]]
    assert batch["assistant_mask"].dtype == torch.bool
    assert batch["assistant_mask"].tolist()[1] == [False, True, True, False, False, False]
    assert batch["pixel_values"].shape == (2, 3, 2, 2)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [4.0, 6.0]  # row order kept, text-only row skipped
    text_only = sft.collate_sft([rows[1]], pad_id=0)
    assert text_only["pixel_values"] is None


def test_collate_rejects_image_token_count_mismatch():
    bad = _example([1, 9, 5], [False, False, True], 1)  # one image token, image needs two
    with pytest.raises(ValueError, match="example 0 has 1 image-token positions"):
        sft.collate_sft([bad], pad_id=0, image_token_id=9, image_tokens_per_image=2)


# ---- LLaVA conversation files --------------------------------------------------------------


def _conversation(image, question="<image>\nWhat is in the picture?", answer="A red circle."):
    record = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


def test_load_llava_conversations_reads_turns_and_image_paths(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    records = [_conversation("a.png"), _conversation(None, question="Say hi.", answer="Hi."),
               {"id": "m", "image": "a.png", "conversations": [
                   {"from": "human", "value": "What colour? <image>"}, {"from": "gpt", "value": "Red."},
                   {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "Top left."}]}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    loaded = sft.load_llava_conversations(path, tmp_path)
    assert [r["image"] for r in loaded] == [str(tmp_path / "a.png"), None, str(tmp_path / "a.png")]
    assert loaded[2]["turns"] == [("What colour? <image>", "Red."), ("Where?", "Top left.")]
    assert loaded[1]["turns"] == [("Say hi.", "Hi.")]


def test_load_llava_conversations_reports_every_bad_record(tmp_path):
    records = [
        _conversation(None),  # a marker without an image
        {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "?"}]},  # wrong order
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]},  # no answer
        {"image": "a.png"},  # no conversations
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError) as error:
        sft.load_llava_conversations(path, tmp_path)
    message = str(error.value)
    assert "4 malformed record(s)" in message
    for index in range(4):
        assert f"record {index}" in message


def test_load_llava_conversations_missing_image_fails_before_training(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(_conversation("missing.jpg")) + "\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        sft.load_llava_conversations(path, tmp_path)


# ---- datasets and the script, on a tiny model ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A micro world LLaVA (random weights) saved with the world tokenizer beside it."""
    directory = tmp_path_factory.mktemp("tiny_llava")
    build_world_tokenizer(directory)
    tokenizer = Tokenizer.from_file(directory)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(lvlm_config(WORLD_PRESETS["micro"], tokenizer.vocab_size))
    init_llava_weights(model)
    save_lvlm(model, directory)
    return directory


def test_conversation_dataset_encodes_answers_and_images(tiny_checkpoint, tmp_path):
    tokenizer = Tokenizer.from_file(tiny_checkpoint)
    image_path = tmp_path / "scene.png"
    sample_scene(3).image().save(image_path)
    records = [{"turns": [("Describe the image.", "There is a red circle.")], "image": str(image_path), "where": "r0"},
               {"turns": [("Is it true?", "Yes")], "image": None, "where": "r1"}]
    dataset = sft.ConversationDataset(records, tokenizer, image_size=64, image_tokens_per_image=64)
    with_image, text_only = dataset[0], dataset[1]
    assert with_image["pixel_values"].shape == (1, 3, 64, 64)
    assert int((with_image["input_ids"] == tokenizer.image_token_id).sum()) == 64
    answer = tokenizer.decode(with_image["input_ids"][with_image["assistant_mask"]].tolist())
    assert answer == "There is a red circle.</s>"
    assert text_only["pixel_values"] is None
    assert tokenizer.decode(text_only["input_ids"][text_only["assistant_mask"]].tolist()) == "Yes</s>"


def test_conversation_dataset_loss_on_text_marks_every_token_after_the_image(tiny_checkpoint, tmp_path):
    tokenizer = Tokenizer.from_file(tiny_checkpoint)
    image_path = tmp_path / "scene.png"
    sample_scene(3).image().save(image_path)
    turns = [("Where is the red circle?", "top left"), ("What colour is the star?", "blue")]
    records = [{"turns": turns, "image": str(image_path), "where": "r0"}, {"turns": turns, "image": None, "where": "r1"}]
    kw = dict(image_size=64, image_tokens_per_image=64)
    answers_only = sft.ConversationDataset(records, tokenizer, **kw)[0]
    with_image, text_only = (sft.ConversationDataset(records, tokenizer, loss_on="text", **kw)[i] for i in (0, 1))
    ids, mask = with_image["input_ids"], with_image["assistant_mask"]
    last_image = int((ids == tokenizer.image_token_id).nonzero()[-1])
    assert not mask[: last_image + 1].any() and mask[last_image + 1:].all()  # no system prompt, no image token
    text = tokenizer.decode(ids[mask].tolist())
    assert text.count("Where is the red circle?") == 1 and text.endswith("blue</s>") and "USER" in text
    assert (mask >= answers_only["assistant_mask"]).all()  # the answers are still scored
    assert text_only["assistant_mask"][1:].all() and not text_only["assistant_mask"][0]  # all but "<s>"
    with pytest.raises(ValueError, match="loss_on"):
        sft.ConversationDataset(records, tokenizer, loss_on="questions", **kw)


def test_conversation_dataset_keep_encoded_gives_the_same_examples(tiny_checkpoint, tmp_path):
    tokenizer = Tokenizer.from_file(tiny_checkpoint)
    image_path = tmp_path / "scene.png"
    sample_scene(3).image().save(image_path)
    records = [{"turns": [("Describe the image.", "There is a red circle."), ("Is it red?", "Yes")],
                "image": str(image_path), "where": "r0"},
               {"turns": [("Is it true?", "No")], "image": None, "where": "r1"}]
    kw = dict(image_size=64, image_tokens_per_image=64, loss_on="text")
    plain, kept = sft.ConversationDataset(records, tokenizer, **kw), sft.ConversationDataset(
        records, tokenizer, keep_encoded=True, **kw)
    for i in range(2):
        a, b = plain[i], kept[i]
        assert a.keys() == b.keys()
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["assistant_mask"], b["assistant_mask"])
        assert (a["pixel_values"] is None) == (b["pixel_values"] is None)
    assert kept[0]["pixel_values"] is not None and "pixel_values" not in kept.encoded[0]  # images stay unkept
    by_one = [e for chunk in kept._encoded_chunks(size=1) for e in chunk]  # batch calls of one: the same, in order
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(by_one, kept.encoded)) and len(by_one) == 2
    for dataset in (plain, kept):  # the token counts group_by_length sorts by
        assert [dataset.length(i) for i in range(2)] == [len(plain[i]["input_ids"]) for i in range(2)]
    with pytest.raises(ValueError, match="check"):
        sft.ConversationDataset(records, tokenizer, check=False, **kw).length(0)
    with pytest.raises(ValueError, match="keep_encoded"):
        sft.ConversationDataset(records, tokenizer, keep_encoded=True, check=False, **kw)


def test_conversation_dataset_checks_records_up_front(tiny_checkpoint):
    tokenizer = Tokenizer.from_file(tiny_checkpoint)
    records = [{"turns": [("Q <image> <image>", "A")], "image": "x.png", "where": "data.json record 5"}]
    with pytest.raises(ValueError, match="data.json record 5"):
        sft.ConversationDataset(records, tokenizer, image_size=64, image_tokens_per_image=64)
    good = {"turns": [("Is it red?", "Yes")], "image": None, "where": "data.json record 0"}
    for bad in ({"image": None, "where": "data.json record 1"},  # no turns
                {"turns": [("Is it red?",)], "image": None, "where": "data.json record 1"}):  # a turn without answer
        with pytest.raises(ValueError, match="data.json record 1"):
            sft.ConversationDataset([good, bad], tokenizer, image_size=64, image_tokens_per_image=64)


def test_cli_trains_a_real_layout_checkpoint_on_llava_json(tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for seed in range(4):
        scene = sample_scene(seed)
        scene.image().save(images / f"{seed}.png")
        records.append(_conversation(f"{seed}.png", answer=scene.captions(1)[0]))
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    before = load_lvlm(tiny_checkpoint)
    sft.main(["--model", str(tiny_checkpoint), "--data", str(data), "--images", str(images), "--out", str(out),
              "--max_steps", "2", "--global_batch_size", "2", "--micro_batch_size", "1", "--lr", "1e-2"])
    after = load_lvlm(out)  # the Hugging Face layout, loadable
    assert (out / "tokenizer.json").is_file()
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert any(k.startswith("language_model.") for k in changed)
    assert any(k.startswith("multi_modal_projector.") for k in changed)
    assert not any(k.startswith("vision_tower.") for k in changed)  # frozen by default, as in LLaVA-1.5


def test_images_without_model_and_data_is_refused_not_ignored(refusal):
    from recipes.sft import main

    assert "--images goes with --model and --data" in refusal(main, ["--images", "somewhere"])
