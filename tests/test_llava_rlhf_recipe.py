"""LLaVA-RLHF recipe: a micro run end to end (world and real-file paths), and the PPO update itself."""

import copy
import json

import pytest
import torch

from lvlm.llava import LlavaForConditionalGeneration
from recipes._ppo import PPODivergedError, Rollout, make_rollout, pack_sequences, ppo_update, rewards_and_advantages
from recipes._run import METRIC_KEYS
from rewards.reward_model import RewardModel, value_model_from
from tests.tiny_tokenizer import tiny_llava_config, tiny_tokenizer

# ---------------------------------------------------------------------------------------------
# the PPO update on a tiny model
# ---------------------------------------------------------------------------------------------

IMAGE_TOKENS = 4  # tiny-llava: 28 px images in 14 px patches


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny_models():
    tok = tiny_tokenizer()
    cfg = tiny_llava_config(tok)
    torch.manual_seed(0)
    policy = LlavaForConditionalGeneration(cfg)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    value_model = value_model_from(RewardModel(copy.deepcopy(policy)))
    return tok, policy, reference, value_model


def _prompt(tok):
    ids = [tok.bos_id, tok.token_id("Describe")] + [tok.image_token_id] * IMAGE_TOKENS + [tok.token_id("image")]
    return torch.tensor(ids)


def _first_token_prob(model, prompt, pixels, token):
    with torch.no_grad():
        return model(prompt[None], pixels)[0, -1].softmax(-1)[token].item()


def test_ppo_raises_the_rewarded_token_and_the_kl_penalty_is_in_the_rewards():
    tok, policy, reference, value_model = _tiny_models()
    prompt, pixels = _prompt(tok), torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    target, eos = tok.token_id("red"), tok.eos_id
    others = [tok.token_id(w) for w in ("blue", "green", "circle", "square", "star", "top", "left", "the")]
    # A fixed reward: +1 for a response that starts with the target word, 0 otherwise. Half the rows say it.
    responses = [[target, eos]] * 8 + [[w, eos] for w in others]
    scores = torch.tensor([1.0 if r[0] == target else 0.0 for r in responses])
    policy.vision_tower.requires_grad_(False)
    value_model.backbone.vision_tower.requires_grad_(False)
    value_model.backbone.language_model.lm_head.requires_grad_(False)
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    value_params = [p for p in value_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(policy_params + value_params, lr=1e-3)
    before = _first_token_prob(policy, prompt, pixels, target)
    step = 0
    for _ in range(2):
        rollout = make_rollout(policy, reference, value_model, [prompt] * 16, pixels.expand(16, -1, -1, -1),
                               responses, scores, pad_id=tok.pad_id, micro_batch=8)
        rewards_and_advantages(rollout, kl_coef=0.1, kl_kind="k1_clamped", reward_scale=10.0)
        step, stats = ppo_update(policy, value_model, optimizer, rollout, policy_params=policy_params,
                                 value_params=value_params, epochs=2, minibatches=2,
                                 micro_batch=4, lr_at_step=lambda s: 1e-3, step=step)
    after = _first_token_prob(policy, prompt, pixels, target)
    assert step == 8 and all(torch.isfinite(torch.tensor(list(stats.values()))))
    assert after > 2 * before, (before, after)

    # The per-token rewards of a fresh rollout, against an independent computation from full forwards:
    # 10 * (-0.1 * max(logp - logp_ref, 0)) on every response token, plus 10 * score on the last one.
    rollout = make_rollout(policy, reference, value_model, [prompt] * 16, pixels.expand(16, -1, -1, -1),
                           responses, scores, pad_id=tok.pad_id, micro_batch=8)
    rewards_and_advantages(rollout, kl_coef=0.1, kl_kind="k1_clamped", reward_scale=10.0)
    with torch.no_grad():
        for b in (0, 8):
            ids = torch.cat([prompt, torch.tensor(responses[b])])
            P = len(prompt)
            logp = policy(ids[None], pixels)[0].log_softmax(-1)[P - 1:P + 1].gather(1, ids[P:, None])[:, 0]
            ref = reference(ids[None], pixels)[0].log_softmax(-1)[P - 1:P + 1].gather(1, ids[P:, None])[:, 0]
            penalty = -0.1 * (logp - ref).clamp(min=0)
            expected = 10.0 * (penalty + torch.tensor([0.0, float(scores[b])]))
            torch.testing.assert_close(rollout.rewards[b, :2], expected, atol=1e-4, rtol=1e-4)
    # the policy moved towards "red": the first token's KL term is non-zero on the rewarded rows
    assert float(rollout.kl[:8, 0].min()) > 1e-3 and float(rollout.rewards[:8, 0].max()) < 0


def test_a_non_finite_score_stops_with_a_clear_error():
    tok, policy, reference, value_model = _tiny_models()
    prompt, pixels = _prompt(tok), torch.zeros(2, 3, 28, 28)
    rollout = make_rollout(policy, reference, value_model, [prompt] * 2, pixels, [[5, tok.eos_id]] * 2,
                           torch.tensor([1.0, float("nan")]), pad_id=tok.pad_id)
    with pytest.raises(PPODivergedError, match="non-finite rewards"):
        rewards_and_advantages(rollout)


def test_pack_sequences_positions_predict_the_response():
    prompts = [torch.tensor([1, 5, 6]), torch.tensor([1, 7])]
    ids, positions, tokens, mask = pack_sequences(prompts, [[9, 2], [8, 8, 2]], pad_id=0)
    assert ids.tolist() == [[1, 5, 6, 9, 2], [1, 7, 8, 8, 2]]
    assert tokens.tolist() == [[9, 2, 0], [8, 8, 2]] and mask.tolist() == [[True, True, False], [True, True, True]]
    for b in range(2):
        for t in range(int(mask[b].sum())):
            assert ids[b, positions[b, t] + 1] == tokens[b, t]  # hidden state at positions[t] predicts token t
    r = Rollout(ids, None, positions, tokens, mask, torch.zeros(2), *(torch.zeros(2, 3) for _ in range(3)))
    sub = r.select(torch.tensor([0]))
    assert sub.input_ids.tolist() == [[1, 5, 6, 9, 2]] and sub.tokens.tolist() == [[9, 2]]


# ---------------------------------------------------------------------------------------------
# the recipe, micro size
# ---------------------------------------------------------------------------------------------


def _check_summary(out, *, evaluated: bool):
    summary = json.loads((out / "summary.json").read_text())
    assert {"recipe", "baseline", "iterations", "final", "seconds"} <= set(summary)
    assert summary["recipe"] == "llava_rlhf" and len(summary["iterations"]) == 1
    for metrics in [summary["baseline"], summary["final"]] + summary["iterations"]:
        if evaluated:
            assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS)
        else:
            assert metrics == {}
    if evaluated:  # item by item since the SFT model, from the two evaluations' eval_details.json
        assert summary["changes"][0]["pope"]["n"] > 0
    else:
        assert summary["changes"] is None
    accuracy = summary["reward_model"]["held_out"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0 and summary["reward_model"]["held_out"]["pairs"] >= 1
    for path in ("config.json", "reward_model/accuracy.json", "reward_model/score_head.safetensors",
                 "iter1/model/config.json", "iter1/model/tokenizer.json", "iter1/value_model/score_head.safetensors",
                 "iter1/rollouts.rank0.jsonl"):
        assert (out / path).is_file(), path
    rollouts = [json.loads(line) for line in (out / "iter1" / "rollouts.rank0.jsonl").read_text().splitlines()]
    assert rollouts and {"question", "response", "score", "rm", "kl"} <= set(rollouts[0])
    return summary


def test_micro_run_on_the_world_and_rerun(tmp_path):
    from recipes.llava_rlhf import main

    out = tmp_path / "run"
    summary = main(["--preset", "micro", "--threads", "1", "--out", str(out)])
    _check_summary(out, evaluated=True)
    pairs = [json.loads(line) for line in (out / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 12 and all(len(r["responses"]) == 2 for r in pairs)
    # the reward model started from the reader: the SFT model with its decoder (only) trained on text
    from safetensors.torch import load_file

    from recipes.world_models import WORLD_PRESETS, ensure_world_models

    sft = load_file(ensure_world_models(WORLD_PRESETS["micro"], verbose=False).sft / "model.safetensors")
    reader = load_file(out / "reader" / "model.safetensors")
    assert sft.keys() == reader.keys()
    changed = {k for k in sft if not torch.equal(sft[k], reader[k])}
    assert changed and all("language_model" in k for k in changed), sorted(changed)[:5]
    # a rerun finds everything done and gives the same result
    again = main(["--preset", "micro", "--threads", "1", "--out", str(out)])
    assert again["final"] == summary["final"] and again["reward_model"] == summary["reward_model"]
    # another config in the same directory is refused before any work
    with pytest.raises(ValueError, match="different config"):
        main(["--preset", "micro", "--threads", "1", "--out", str(out), "--no-facts"])


def test_micro_run_on_user_files(tmp_path):
    """The real-data path on small data: the micro world's SFT checkpoint, PNGs, a human-preference file
    in LLaVA-RLHF's format, a prompt JSONL and an image_to_caption file."""
    from lvlm.world import captions, sample_scene
    from recipes.llava_rlhf import main
    from recipes.world_models import WORLD_PRESETS, ensure_world_models

    preset_ = WORLD_PRESETS["micro"]
    sft = ensure_world_models(preset_, verbose=False).sft
    images = tmp_path / "images"
    images.mkdir()
    table, preferences, prompts = {}, [], []
    for k in range(6):
        scene = sample_scene(k, preset_.world)
        name = f"img{k}.png"
        scene.image().save(images / name)
        table[name] = captions(scene, 2)
        clean, made_up = table[name][0], table[name][0] + " There is a red star."
        first, second = (clean, made_up) if k % 2 == 0 else (made_up, clean)
        preferences.append({"image": name, "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                                             {"from": "gpt", "value": "x"}],
                            "output_1": {"from": "llava", "value": first}, "output_2": second,
                            "preference": 1 if k % 2 == 0 else 2})
        prompts.append({"image": name, "question": "Describe the image."} if k % 2 else
                       {"image": name, "question": "Is there a star in the image?", "kind": "yes_no", "answer": "no"})
    (tmp_path / "prefs.json").write_text(json.dumps(preferences))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (tmp_path / "captions.json").write_text(json.dumps(table))
    # SFT conversations for the PPO-ptx term (the micro preset's ptx_coef is the world's, > 0)
    (tmp_path / "sft.json").write_text(json.dumps([{"image": f"img{k}.png", "conversations": [
        {"from": "human", "value": "<image>\nIs there a star in the image?"}, {"from": "gpt", "value": "No"}]}
        for k in range(3)]))
    args = ["--preset", "micro", "--threads", "1", "--model", str(sft), "--data", str(tmp_path / "prompts.jsonl"),
            "--images", str(images), "--preferences", str(tmp_path / "prefs.json"), "--captions",
            str(tmp_path / "captions.json"), "--out", str(tmp_path / "run")]
    # the micro preset's reward model reads the world's captions first: not possible on the user's data
    with pytest.raises(ValueError, match="rm_reading_steps trains on the built-in world's captions"):
        main(args[:-2] + ["--out", str(tmp_path / "reading")])
    with pytest.raises(ValueError, match="rm_reading_steps must be >= 0"):
        main(args[:-2] + ["--rm_reading_steps", "-1", "--out", str(tmp_path / "reading")])
    assert not (tmp_path / "reading").exists()
    args = args[:-2] + ["--rm_reading_steps", "0", "--out", str(tmp_path / "run")]
    with pytest.raises(ValueError, match="needs --ptx_data"):
        main(args[:-2] + ["--out", str(tmp_path / "no_ptx_data")])
    with pytest.raises(ValueError, match="oracle_repeats sets the built-in world's oracle"):
        main(args[:-2] + ["--oracle_repeats", "count", "--out", str(tmp_path / "oracle")])
    with pytest.raises(ValueError, match="oracle_repeats must be one of"):
        main(args[:-2] + ["--oracle_repeats", "sometimes", "--out", str(tmp_path / "oracle")])
    assert not (tmp_path / "no_ptx_data").exists() and not (tmp_path / "oracle").exists()
    args = args[:-2] + ["--ptx_data", str(tmp_path / "sft.json"), "--out", str(tmp_path / "run")]
    main(args)
    _check_summary(tmp_path / "run", evaluated=False)

    # bad input is named before any work: a malformed record (file and record), a missing image
    preferences[3]["preference"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(preferences))
    with pytest.raises(ValueError, match=r"bad.json record 3: 'preference' must be 1 or 2"):
        main(args[:-2] + ["--preferences", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad")])
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"image": "nowhere.png", "question": "Describe."}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"prompts.jsonl:1: .*nowhere.png"):
        main(args[:-2] + ["--out", str(tmp_path / "bad2")])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


@pytest.mark.parametrize("flag", ["--preferences", "--captions", "--ptx_data", "--eval_annotations"])
def test_real_data_flags_without_data_are_refused_not_ignored(flag, refusal):
    from recipes.llava_rlhf import parse_config

    assert f"{flag} go with --data (real data)" in refusal(parse_config, ["--preset", "micro", flag, "somewhere"])


@pytest.mark.parametrize("flags, message", [(["--kl_coef", "-1"], "kl_coef must be >= 0"),
                                            (["--rm_epochs", "0"], "rm_epochs 0: each must be >= 1"),
                                            (["--rm_lr", "0", "--ppo_lr", "-1"],
                                             "rm_lr 0.0, ppo_lr -1.0: learning rates must be > 0"),
                                            (["--pairs_per_prompt", "0", "--rollouts_per_iteration", "0"],
                                             "pairs_per_prompt 0, rollouts_per_iteration 0: each must be >= 1")])
def test_settings_that_cannot_run_are_refused_before_any_work(flags, message, tmp_path):
    from recipes.llava_rlhf import main

    with pytest.raises(ValueError, match=message):
        main(["--preset", "micro", "--threads", "1", "--out", str(tmp_path / "run")] + flags)
    assert not (tmp_path / "run").exists()
