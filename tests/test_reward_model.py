"""Fact-RLHF reward model: the head reads the last real token, save/load, value model, inputs, batched scoring."""

import pytest
import torch

from lvlm.config import preset
from lvlm.llava import LlavaForConditionalGeneration
from lvlm.tokenizer import SYSTEM, Tokenizer
from lvlm.world.scene import sample_scene
from lvlm.world.text import captions, describe, description_instruction
from lvlm.world.tokenizer import build_world_tokenizer
from rewards.fact_prompt import PROMPT_TEXTS, fact_prompt
from rewards.reward_model import (HEAD_FILE, META_FILE, RewardModel, load_reward_model, reward_inputs,
                                  save_reward_model, score_batch, value_model_from)
from tiny_tokenizer import tiny_tokenizer

IMAGE = 3  # tiny-llava's image token
IMAGE_TOKENS = 4  # tiny-llava: 28 px images in 14 px patches


@pytest.fixture(scope="module")
def reward_model():
    torch.manual_seed(0)
    return RewardModel(LlavaForConditionalGeneration(preset("tiny-llava"))).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))


ROW_A = [1, 5, 6] + [IMAGE] * IMAGE_TOKENS + [7, 8, 9]  # 10 tokens
ROW_B = [1] + [IMAGE] * IMAGE_TOKENS + [10, 11]  # 7 tokens


def by_hand(rm, row, pixel_values):
    """w . h + b with h the final-normed hidden state of the row's last token, the row run alone."""
    with torch.no_grad():
        h = rm.backbone.hidden_states(torch.tensor([row]), pixel_values)[0, -1]
        return float((h * rm.score_head.weight[0]).sum() + rm.score_head.bias[0])


def test_head_init():
    torch.manual_seed(0)
    rm = RewardModel(LlavaForConditionalGeneration(preset("tiny-llava")))
    assert rm.score_head.weight.shape == (1, 64) and rm.score_head.bias.tolist() == [0.0]
    assert 0.05 < float(rm.score_head.weight.detach().std()) < 0.2  # std 1/sqrt(65) = 0.124


def test_head_reads_the_last_real_token(reward_model, images):
    lengths = torch.tensor([10, 7])
    expected = torch.tensor([by_hand(reward_model, ROW_A, images[:1]), by_hand(reward_model, ROW_B, images[1:])])
    for pad in (0, 99):  # what the padding holds changes nothing
        ids = torch.tensor([ROW_A, ROW_B + [pad] * 3])
        with torch.no_grad():
            got = reward_model(ids, images, lengths)
            per_token = reward_model.token_scores(ids, images)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(per_token[[0, 1], lengths - 1], got)
        assert got.dtype == torch.float32
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 10\]"):
        reward_model(torch.tensor([ROW_A, ROW_A]), torch.cat([images[:1], images[:1]]), torch.tensor([10, 11]))


def test_save_load_round_trip(reward_model, images, tmp_path):
    save_reward_model(reward_model, tmp_path / "rm")
    assert (tmp_path / "rm" / HEAD_FILE).is_file() and (tmp_path / "rm" / META_FILE).is_file()
    loaded = load_reward_model(tmp_path / "rm")
    original, reloaded = reward_model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    ids = torch.tensor([ROW_A, ROW_B + [0] * 3])
    with torch.no_grad():
        assert torch.equal(loaded(ids, images, torch.tensor([10, 7])), reward_model(ids, images, torch.tensor([10, 7])))
    with pytest.raises(FileNotFoundError, match="not a saved reward model"):
        load_reward_model(tmp_path / "nowhere")


def test_value_model_starts_at_zero_with_a_copied_backbone(reward_model, images):
    value_model = value_model_from(reward_model)
    assert not value_model.score_head.weight.any() and not value_model.score_head.bias.any()
    ids = torch.tensor([ROW_A, ROW_B + [0] * 3])
    with torch.no_grad():
        assert value_model.token_scores(ids, images).abs().max() == 0
        assert value_model(ids, images, torch.tensor([10, 7])).tolist() == [0.0, 0.0]
    rm_params = dict(reward_model.backbone.named_parameters())
    for name, p in value_model.backbone.named_parameters():
        assert torch.equal(p, rm_params[name]), name
        assert p.data_ptr() != rm_params[name].data_ptr(), name  # a copy, not shared storage
    assert reward_model.score_head.weight.abs().sum() > 0  # the reward model's head is untouched


def test_reward_inputs_on_the_world_tokenizer(tmp_path):
    scene = sample_scene(3)
    question, response, facts = description_instruction(scene), describe(scene).text, captions(scene)
    path = build_world_tokenizer(tmp_path, extra_texts=PROMPT_TEXTS)
    tok = Tokenizer.from_file(path)
    ids = reward_inputs(tok, question, response, facts, image_tokens_per_image=576, seed=0)
    ids = ids.tolist()
    assert tok.unk_id not in ids  # every word of the prompt is known
    assert ids[0] == tok.bos_id
    assert ids.count(tok.image_token_id) == 576
    at = ids.index(tok.image_token_id)
    assert ids[at : at + 576] == [tok.image_token_id] * 576  # one block
    assert ids.count(tok.eos_id) == 1  # "</s>" became the end token, once, right after the response
    end = ids.index(tok.eos_id)
    assert tok.decode(ids[:end]).endswith(response)
    assert ids[end + 1 : end + 4] == tok.encode("USER: Please", add_bos=False)
    assert ids[-1] == tok.token_id("is")
    text = fact_prompt(SYSTEM, question, response, facts, seed=0)
    expected = tok.encode(text)  # the same text tokenised, image marker then expanded
    assert ids == expected[:at] + [tok.image_token_id] * 576 + expected[at + 1 :]

    without = reward_inputs(tok, question, response, facts, image_tokens_per_image=576, use_facts=False)
    assert len(without) < len(ids) and tok.unk_id not in without.tolist()
    with pytest.raises(ValueError, match="more than max_length=100"):
        reward_inputs(tok, question, response, facts, image_tokens_per_image=576, max_length=100)
    plain = Tokenizer.from_file(build_world_tokenizer(tmp_path / "plain"))  # without the prompt's words
    assert plain.unk_id in reward_inputs(plain, question, response, facts, image_tokens_per_image=1).tolist()
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        reward_inputs(tok, question, "Look: <image>", facts, image_tokens_per_image=576)


def test_score_batch_equals_one_item_at_a_time(images):
    tok = tiny_tokenizer()
    config = preset("tiny-llava")
    config.image_token_index = tok.image_token_id
    torch.manual_seed(2)
    rm = RewardModel(LlavaForConditionalGeneration(config)).eval()
    items = [
        {"question": "What is in the image?", "response": "A red circle.", "captions": ["a red circle", "red"]},
        ("Describe it.", "There is a blue square at the top left and a green star.", ["a blue square", "a star"]),
        {"question": "Is there a star?", "response": "No.", "captions": ["one white triangle"]},
    ]
    pixel_values = torch.cat([images, images[:1]])
    got = score_batch(rm, tok, items, pixel_values, image_tokens_per_image=IMAGE_TOKENS, seed=10, batch_size=2)
    expected = []
    for i, item in enumerate(items):
        q, r, c = (item["question"], item["response"], item["captions"]) if isinstance(item, dict) else item
        ids = reward_inputs(tok, q, r, c, image_tokens_per_image=IMAGE_TOKENS, seed=10 + i)
        with torch.no_grad():
            expected.append(float(rm(ids[None], pixel_values[i : i + 1], torch.tensor([len(ids)]))[0]))
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"pixel_values must be \[3, 3, H, W\]"):
        score_batch(rm, tok, items, images, image_tokens_per_image=IMAGE_TOKENS)
