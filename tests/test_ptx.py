"""The ptx term (InstructGPT's PPO-ptx, recipes/_ptx.py) in DPO and PPO, and the world's replay data."""

import copy
from collections import Counter

import pytest
import torch

from lvlm.llava import LlavaForConditionalGeneration
from recipes._dpo import PreferencePairs, add_reference_logps, collate_pairs, dpo_loss_fn
from recipes._ppo import make_rollout, ppo_update, rewards_and_advantages
from recipes._ptx import iteration_records, ptx_loss, replay_batch, replay_dataset, replay_indices
from recipes.sft import sft_loss
from rewards.reward_model import RewardModel, value_model_from
from tests.tiny_tokenizer import tiny_llava_config, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _load_image(seed):
    from PIL import Image
    return Image.new("RGB", (28, 28), (seed * 20 % 256, 100, 50))


def _tiny():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config(tok))
    replay_records = [{"turns": [("Is there a red circle ?", "Yes"), ("What colour is the star ?", "blue")],
                       "image": i, "where": f"replay {i}"} for i in range(3)]
    return tok, model, replay_dataset(replay_records, tok, model, _load_image)


def test_replay_indices_wrap_and_depend_only_on_the_position():
    assert replay_indices(0, 3, 5) == [0, 1, 2]
    assert replay_indices(1, 3, 5) == [3, 4, 0]
    assert replay_indices(7, 1, 5) == [2]
    with pytest.raises(ValueError, match="non-empty"):
        replay_indices(0, 2, 0)
    assert iteration_records(list("abcde"), 2, 1) == ["a", "b"]
    assert iteration_records(list("abcde"), 2, 3) == ["e", "a"]  # iteration 3 wraps around


def test_dpo_with_replay_adds_exactly_ptx_coef_times_the_sft_loss():
    tok, model, replay = _tiny()
    records = [{"key": f"{i:08d}", "question": "Describe the image .", "image": i,
                "chosen": "There is a red circle .", "rejected": "There is a blue star on the left ."}
               for i in range(4)]
    size, per_image = model.config.vision_config.image_size, model.config.image_tokens_per_image
    plain = PreferencePairs(records, tok, load_image=_load_image, image_size=size, image_tokens_per_image=per_image)
    add_reference_logps(model, plain, batch_size=2)
    with_replay = PreferencePairs(plain.records, tok, load_image=_load_image, image_size=size,
                                  image_tokens_per_image=per_image, replay=replay)
    model.eval()
    batch = collate_pairs([with_replay[i] for i in range(4)], pad_id=tok.pad_id)
    assert batch["input_ids"].shape[0] == 12 and batch["replay_rows"] == 4 and batch["pixel_values"].shape[0] == 12
    dpo, _ = dpo_loss_fn(beta=0.1)(model, collate_pairs([plain[i] for i in range(4)], pad_id=tok.pad_id))
    coef = 0.7
    mixed, metrics = dpo_loss_fn(beta=0.1, ptx_coef=coef)(model, batch)
    # pair i replays conversation i mod 3: rows 0, 1, 2, 0
    nll, _ = sft_loss(model, replay_batch(replay, [0, 1, 2, 0], pad_id=tok.pad_id))
    assert dpo.item() == pytest.approx(0.6931472, abs=1e-5)  # the policy is its own reference: log 2
    assert mixed.item() == pytest.approx(dpo.item() + coef * nll.item(), abs=1e-5)
    assert metrics["ptx_nll"].item() == pytest.approx(nll.item(), abs=1e-5)
    with pytest.raises(ValueError, match="replay"):  # replay rows without the coefficient, and the reverse
        dpo_loss_fn(beta=0.1)(model, batch)
    with pytest.raises(ValueError, match="replay"):
        collate_pairs([with_replay[0], plain[1]], pad_id=tok.pad_id)


def _ppo_setup(tok, model):
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    value_model = value_model_from(RewardModel(copy.deepcopy(model)))
    model.vision_tower.requires_grad_(False)
    value_model.backbone.vision_tower.requires_grad_(False)
    value_model.backbone.language_model.lm_head.requires_grad_(False)
    prompt = torch.tensor([tok.bos_id, tok.token_id("Describe")] + [tok.image_token_id] * 4 + [tok.token_id("image")])
    responses = [[tok.token_id("red"), tok.eos_id], [tok.token_id("blue"), tok.eos_id]] * 4
    rollout = make_rollout(model, reference, value_model, [prompt] * 8, torch.zeros(8, 3, 28, 28), responses,
                           torch.tensor([1.0, 0.0] * 4), pad_id=tok.pad_id, micro_batch=8)
    rewards_and_advantages(rollout)
    return value_model, rollout


def test_ppo_ptx_term_is_the_replay_nll_and_pulls_the_policy_to_the_replayed_answers():
    tok, model, replay = _tiny()
    initial = copy.deepcopy(model).eval()
    value_model, rollout = _ppo_setup(tok, model)
    calls = []

    def replay_at(step):
        calls.append(step)
        return replay_batch(replay, replay_indices(step, 2, len(replay)), pad_id=tok.pad_id)

    with torch.no_grad():
        expected, _ = ptx_loss(model.eval(), replay_at(0))
    calls.clear()
    policy_params = [p for p in model.parameters() if p.requires_grad]
    value_params = [p for p in value_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(policy_params + value_params, lr=1e-3)
    _, stats = ppo_update(model, value_model, optimizer, rollout, policy_params=policy_params,
                          value_params=value_params, epochs=1, minibatches=1, micro_batch=8,
                          lr_at_step=lambda s: 1e-3, ptx_coef=1.0, replay_batch=replay_at)
    assert calls == [0] and stats["ptx_nll"] == pytest.approx(expected.item(), abs=1e-5)
    # a large coefficient over a few steps: the replayed answers' NLL falls
    step = 1
    for _ in range(3):
        step, stats = ppo_update(model, value_model, optimizer, rollout, policy_params=policy_params,
                                 value_params=value_params, epochs=1, minibatches=2, micro_batch=8,
                                 lr_at_step=lambda s: 3e-3, step=step, ptx_coef=50.0, replay_batch=replay_at)
    assert calls[1:] == list(range(1, 7))
    with torch.no_grad():
        after, _ = ptx_loss(model.eval(), replay_batch(replay, [0, 1, 2], pad_id=tok.pad_id))
        before, _ = ptx_loss(initial, replay_batch(replay, [0, 1, 2], pad_id=tok.pad_id))
    assert after.item() < before.item() - 0.5, (before.item(), after.item())
    with pytest.raises(ValueError, match="replay_batch"):
        ppo_update(model, value_model, optimizer, rollout, policy_params=policy_params, value_params=value_params,
                   lr_at_step=lambda s: 1e-3, ptx_coef=1.0)


def test_world_replay_records_are_the_sft_conversations_without_their_descriptions():
    from lvlm.world import DESCRIPTION_INSTRUCTIONS
    from recipes.world_models import WORLD_PRESETS, world_replay_records, world_sft_records

    c = WORLD_PRESETS["micro"]
    sft = world_sft_records(c)
    replay = world_replay_records(c, len(sft) + 2)  # wraps around after the last SFT example
    assert [r["image"] for r in replay] == [r["image"] for r in sft] + [sft[0]["image"], sft[1]["image"]]
    with_description = 0
    for full, short in zip(sft, replay):
        questions = [q for q, _ in full["turns"]]
        kept = [turn for turn in full["turns"] if turn[0] not in DESCRIPTION_INSTRUCTIONS]
        with_description += len(kept) < len(full["turns"])
        assert Counter(short["turns"]) == Counter(kept), questions
        assert not any(q in DESCRIPTION_INSTRUCTIONS for q, _ in short["turns"])
    assert with_description > 0  # some SFT examples had a description, and lost it
    with pytest.raises(ValueError, match="n >= 1"):
        world_replay_records(c, 0)
