"""Tests of recipes/world_models.py: the micro chain, the cache (reuse, keys, atomic builds), determinism,
CLIP's end-of-text pooling, the tokenizer's coverage of the Fact-RLHF prompt, and the NegCLIP loss."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as RawTokenizer

from lvlm.checkpoint import load_clip, load_lvlm
from lvlm.tokenizer import Tokenizer
from lvlm.world import captions, sample_scene
from recipes import world_models as wm

MICRO = wm.WORLD_PRESETS["micro"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, wm.ensure_world_models(MICRO, cache_dir=cache, verbose=False)


def test_micro_chain_gives_loadable_checkpoints(micro):
    cache, models = micro
    assert models.root == cache / f"world-{wm.cache_key(MICRO)}"
    clip = load_clip(models.clip)
    assert clip.config.text_config.eos_token_id == wm.CLIP_EOS_ID != 2
    for directory in (models.sft, models.labeler, models.aligned):
        model = load_lvlm(directory)
        assert model.config.image_tokens_per_image == (MICRO.world.canvas_size // MICRO.patch_size) ** 2
        assert model.config.vision_feature_layer == -2
        assert Tokenizer.from_file(directory).image_token_id == model.config.image_token_index
    assert Tokenizer.from_file(models.tokenizer).vocab_size == clip.config.text_config.vocab_size
    reward_clip = load_clip(models.reward_clip)  # CSR's R_I: a second CLIP, trained with the sign term
    assert models.reward_clip == models.root / "reward_clip"
    assert reward_clip.config == clip.config
    assert not torch.equal(reward_clip.text_projection.weight, clip.text_projection.weight)
    report = models.report()
    for key in ("clip_present_over_absent", "reward_clip_present_over_absent", "reward_clip_present_scored",
                "reward_clip_present_scored_several",
                "reward_clip_absent_zeroed", "reward_clip_swapped_shape_zeroed", "clip_present_over_swapped_shape",
                "reward_clip_present_over_swapped_place", "reward_clip_swapped_place_zeroed"):
        assert 0.0 <= report[key] <= 1.0, key
    assert set(report["sft"]) >= {"chair_s", "recall", "pope_acc", "mc_acc"}
    by_kind = report["labeler_accuracy"]["by_kind"]
    assert {"attribute/none", "claim/none", "claim/place"} <= set(by_kind)
    assert all(0.0 <= v <= 1.0 for v in by_kind.values())
    assert {"place/one", "place/several", "colour/several", "several/no binding"} <= set(report["sft_short_answers"])
    assert not (models.root / "train").exists()  # training checkpoints are not kept in the cache


@pytest.mark.parametrize("from_clip", [True, False])
def test_the_reward_clip_starts_from_the_first_clip_when_asked(tmp_path, from_clip):
    """Adam moves a weight by about lr per step. The first CLIP trains long enough to move away from
    the seed's init; the reward CLIP's few steps then leave it near where it started: the first CLIP
    (``reward_clip_from_clip``), or the same fresh init the first CLIP started from."""
    config = dataclasses.replace(MICRO, clip_steps=40, reward_clip_steps=2, reward_clip_from_clip=from_clip)
    models = wm.ensure_world_models(config, cache_dir=tmp_path, verbose=False)
    first = load_clip(models.clip).state_dict()
    reward = load_clip(models.reward_clip).state_dict()
    moved = max((reward[k].float() - first[k].float()).abs().max().item() for k in first)
    near = 4 * config.reward_clip_steps * config.reward_clip_lr
    assert (0 < moved <= near) if from_clip else moved > 2 * near


def test_reward_clip_config_turns_on_the_sign_term_only():
    c = wm.WORLD_PRESETS["default"]
    r = wm.reward_clip_config(c)
    assert (r.clip_steps, r.clip_sign_weight, r.clip_sign_positive_share, r.clip_colour_negatives) == (
        c.reward_clip_steps, c.reward_clip_sign_weight, c.reward_clip_sign_positive_share, c.reward_clip_colour_negatives)
    assert c.clip_sign_weight == 0.0 < r.clip_sign_weight
    assert wm.clip_config(r, 100) == wm.clip_config(c, 100)  # the same architecture


def test_without_reward_clip_steps_csr_scores_with_the_first_clip(tmp_path):
    root = tmp_path / "world-x"
    (root / "clip").mkdir(parents=True)
    assert wm._paths(root).reward_clip == root / "clip"
    (root / "reward_clip").mkdir()
    assert wm._paths(root).reward_clip == root / "reward_clip"


def test_the_llava_vision_tower_starts_as_clips(micro):
    _, models = micro
    clip, aligned = load_clip(models.clip), load_lvlm(models.aligned)
    for key, value in clip.vision_model.state_dict().items():  # frozen in stage 1 (align_train_vision=False)
        assert torch.equal(value, aligned.vision_tower.vision_model.state_dict()[key]), key


def test_cache_is_reused(micro, monkeypatch):
    cache, models = micro

    def no_training(*args, **kwargs):
        raise AssertionError("the cached models were rebuilt")

    monkeypatch.setattr(wm, "build_world_models", no_training)
    assert wm.ensure_world_models(MICRO, cache_dir=cache) == models


def test_build_trains_with_the_configured_threads(micro):
    # the weights depend on the thread count, so the build fixes it (build_threads) and reports it
    _, models = micro
    assert models.report()["threads"] == MICRO.build_threads == 1
    assert wm.cache_key(MICRO) != wm.cache_key(dataclasses.replace(MICRO, build_threads=2))


@pytest.mark.parametrize("avx512_bf16, amx, bf16, warned", [
    (False, False, True, True), (True, False, True, False), (False, True, True, False), (False, False, False, False)])
def test_bf16_cost_note_warns_only_for_bf16_autocast_without_bf16_instructions(
        monkeypatch, avx512_bf16, amx, bf16, warned):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    config = dataclasses.replace(wm.WORLD_PRESETS["default"], lvlm_bf16=bf16)
    note = wm.bf16_cost_note(config)
    assert (note is not None) == warned
    if warned:
        assert "--preset float32" in note and not wm.WORLD_PRESETS["float32"].lvlm_bf16


@pytest.mark.parametrize("cuda, avx512_bf16, amx, picked", [
    (False, False, False, "float32"), (False, True, False, "float32"), (False, False, True, "float32"),
    (True, False, False, "default"), (True, True, True, "default")])
def test_auto_world_preset_picks_float32_on_any_cpu(monkeypatch, cuda, avx512_bf16, amx, picked):
    from recipes.csr import CSRConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert wm.resolve_world_preset("auto") == picked
    assert wm.world_preset("auto") is wm.WORLD_PRESETS[picked]
    assert wm.world_preset("micro") is MICRO and wm.resolve_world_preset("micro") == "micro"
    # a recipe's run records the world models' directory (``open_run``), named by the cache key of the preset
    # "auto" picked, so a rerun on a machine where it picks another is told it differs
    assert CSRConfig().world_preset == "auto"
    assert wm.cache_key(wm.world_preset("auto")) == wm.cache_key(wm.WORLD_PRESETS[picked])
    assert wm.cache_key(wm.WORLD_PRESETS["float32"]) != wm.cache_key(wm.WORLD_PRESETS["default"])
    with pytest.raises(ValueError, match="known presets are auto, default"):
        wm.world_preset("fast")


def test_cache_key_follows_the_config():
    assert wm.cache_key(MICRO) == wm.cache_key(dataclasses.replace(MICRO))
    assert wm.cache_key(MICRO) != wm.cache_key(dataclasses.replace(MICRO, seed=1))
    assert wm.cache_key(MICRO) != wm.cache_key(
        dataclasses.replace(MICRO, world=dataclasses.replace(MICRO.world, noise_share=0.3)))
    assert wm.cache_key(MICRO) != wm.cache_key(wm.WORLD_PRESETS["default"])
    assert wm.cache_key(MICRO) != wm.cache_key(dataclasses.replace(MICRO, clip_contrast_pairs=8))
    assert wm.cache_key(MICRO) != wm.cache_key(dataclasses.replace(MICRO, reward_clip_single_object_share=0.2))


def test_the_reward_clip_takes_its_own_share_of_one_object_scenes():
    assert wm.reward_clip_config(MICRO).clip_single_object_share == MICRO.clip_single_object_share
    own = wm.reward_clip_config(dataclasses.replace(MICRO, reward_clip_single_object_share=0.2))
    assert own.clip_single_object_share == 0.2
    assert own.clip_sign_weight == MICRO.reward_clip_sign_weight and own.clip_steps == MICRO.reward_clip_steps
    # the first CLIP keeps its own share: ClipPairs draws its one-object scenes from the config it is given
    pairs = [wm.ClipPairs(config, None, 400, wm.WorldPixels(config.world)) for config in (MICRO, own)]
    singles = [sum(p.scene(seed)[0] for seed in range(400)) for p in pairs]
    assert 150 < singles[0] < 250 and 40 < singles[1] < 120


def test_fields_added_later_keep_the_cached_models_keys_at_their_neutral_value(monkeypatch):
    """A config at the ``_KEY_NEUTRAL`` values hashes as the same config did before those fields existed."""
    now, added, asdict = wm.cache_key(MICRO), set(wm._KEY_NEUTRAL), dataclasses.asdict
    monkeypatch.setattr(wm.dataclasses, "asdict", lambda c: {k: v for k, v in asdict(c).items() if k not in added})
    monkeypatch.setattr(wm, "_KEY_NEUTRAL", {})
    assert wm.cache_key(MICRO) == now


def test_builds_are_deterministic_and_atomic(micro, tmp_path, monkeypatch):
    _, models = micro
    # A build that dies in its last stage leaves no directory that looks complete ...
    real_stage = wm._lvlm_stage

    def dying_stage(c, name, *args, **kwargs):
        if name == "labeler":
            raise KeyboardInterrupt("killed")
        return real_stage(c, name, *args, **kwargs)

    monkeypatch.setattr(wm, "_lvlm_stage", dying_stage)
    with pytest.raises(KeyboardInterrupt):
        wm.ensure_world_models(MICRO, cache_dir=tmp_path, verbose=False)
    root = tmp_path / models.root.name
    assert not root.exists() and root.with_name(root.name + ".partial").is_dir()
    # ... and the rerun finishes it, with weights identical to an uninterrupted build.
    monkeypatch.setattr(wm, "_lvlm_stage", real_stage)
    again = wm.ensure_world_models(MICRO, cache_dir=tmp_path, verbose=False)
    assert (again.root / "complete").is_file() and not root.with_name(root.name + ".partial").exists()
    for name in ("clip", "aligned", "sft", "labeler"):
        first = load_file(getattr(models, name) / "model.safetensors")
        second = load_file(getattr(again, name) / "model.safetensors")
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), name
    # the report names each model by its weights' fingerprint: the same for the same weights, and six different ones
    fingerprints = wm.model_fingerprints(models.root)
    assert again.report()["fingerprints"] == fingerprints == models.report()["fingerprints"]
    assert list(fingerprints) == list(wm.STAGE_NAMES) and len(set(fingerprints.values())) == 6


def test_a_build_under_torchrun_trains_as_one_process_does(tmp_path):
    """torchrun x2 (Gloo): every stage runs data-parallel, CLIP's batch split over the ranks (each
    contrasts its half). Each LVLM stage then takes the step one process takes on the whole batch
    (per-example mean losses), up to rounding: rebuilt in this process from the same CLIPs, the LVLMs
    come out the same."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "recipes" / "world_models.py"), "--preset", "micro", "--cache_dir", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    two = tmp_path / "two" / f"world-{wm.cache_key(MICRO)}"
    assert json.loads((two / "report.json").read_text())["ranks"] == 2
    sft, aligned = (load_file(two / name / "model.safetensors") for name in ("sft", "aligned"))
    assert not all(torch.equal(sft[k], aligned[k]) for k in sft)  # the stages did train
    stages = ["clip", "reward_clip", "grounded", "aligned", "sft", "labeler"]
    for i, name in enumerate(stages[2:], start=2):
        one = tmp_path / f"one-{name}"  # every earlier stage as the two processes trained it
        for earlier in stages[:i]:
            shutil.copytree(two / earlier, one / earlier)
        wm.build_world_models(MICRO, one, verbose=False)
        two_processes = load_file(two / name / "model.safetensors")
        one_process = load_file(one / name / "model.safetensors")
        # Adam's first steps move a weight by about lr x sign(gradient) however small the gradient, so the
        # few weights whose gradient is near 0 can go either way with the rounding; all the others agree.
        assert share_close(one_process, two_processes) >= 0.99, name
    # CLIP: one process contrasting micro-batches of half the batch (``clip_contrast_pairs``) takes the two
    # ranks' step; contrasting the whole batch at once, as one process does by default, does not.
    halves = tmp_path / "one-clip-halves"
    wm.build_world_models(dataclasses.replace(MICRO, clip_contrast_pairs=MICRO.clip_batch // 2), halves, verbose=False)
    whole = tmp_path / "one-clip-whole"
    wm.build_world_models(MICRO, whole, verbose=False)
    two_processes = load_file(two / "clip" / "model.safetensors")
    assert share_close(load_file(halves / "clip" / "model.safetensors"), two_processes) >= 0.99
    assert share_close(load_file(whole / "clip" / "model.safetensors"), two_processes) < 0.9


@pytest.mark.parametrize("preset", ["float32", "micro"])
def test_every_stage_splits_its_batch_over_any_number_of_ranks(preset, monkeypatch, tmp_path):
    """1 or 2 ranks keep each stage's batch and micro-batch (the cached models' settings); 3 to 6 ranks get
    a batch the training loop accepts (32 over 3 ranks used to fail at the first LVLM stage)."""
    c = wm.world_preset(preset)
    stages = {"clip": (c.clip_batch, c.clip_contrast_pairs or c.clip_batch), "grounded": (c.ground_batch, None),
              "aligned": (c.align_batch, None), "sft": (c.sft_batch, None), "labeler": (c.labeler_batch, None)}
    for world in range(1, 7):
        monkeypatch.setattr(wm, "get_world_size", lambda: world)
        for name, (batch, micro) in stages.items():
            t = wm._train_config(c, tmp_path, steps=1, batch=batch, lr=1e-3, verbose=False, micro_batch=micro)
            assert t.global_batch_size % (t.micro_batch_size * world) == 0, (name, world)
            if world <= 2:
                expected_micro = micro // world if micro else min(c.micro_batch, batch // world)
                assert (t.global_batch_size, t.micro_batch_size) == (batch, expected_micro), (name, world)


def share_close(a: dict, b: dict) -> float:
    """The share of the weights of state dict ``b`` that ``a`` matches (rtol 1e-4, atol 1e-5)."""
    close = sum(int(torch.isclose(a[k], v, rtol=1e-4, atol=1e-5).sum()) for k, v in b.items())
    return close / sum(v.numel() for v in b.values())


def test_clip_texts_end_with_the_clip_end_token_and_pool_there(micro):
    _, models = micro
    raw = RawTokenizer.from_file(str(models.clip / "tokenizer.json"))
    clip = load_clip(models.clip)
    texts = ["The red circle is at the top left.", "a blue box"]
    ids = wm.encode_clip_texts(raw, texts)
    rows = [raw.encode(t).ids for t in texts]
    for row, text in zip(rows, texts):
        assert row[0] == 1 and row[-1] == wm.CLIP_EOS_ID  # "<s> ... <pad>"
        assert len(row) == len(text.replace(".", " .").split()) + 2
    assert ids[1, len(rows[1]):].eq(wm.CLIP_EOS_ID).all()  # padded with the end token
    pooled_at = clip.text_model.end_of_text_index(ids)
    assert pooled_at.tolist() == [len(rows[0]) - 1, len(rows[1]) - 1]
    # what follows the end token does not change the text features (the tower is causal)
    noisy = ids.clone()
    noisy[1, len(rows[1]):] = 7
    with torch.no_grad():
        assert torch.allclose(clip.encode_text(ids)[1], clip.encode_text(noisy)[1], atol=1e-6)


def test_world_tokenizer_covers_the_fact_rlhf_prompt(micro):
    from rewards.fact_prompt import fact_prompt
    from lvlm.tokenizer import SYSTEM

    _, models = micro
    tokenizer = Tokenizer.from_file(models.tokenizer)
    scene = sample_scene(5)
    text = fact_prompt(SYSTEM, "Describe the image.", captions(scene, 1)[0], captions(scene, 3), seed=0)
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert ids.count(tokenizer.eos_id) == 1 and ids.count(tokenizer.image_token_id) == 1


def test_clip_loss_matches_a_hand_computation():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.nn.Parameter(logits)
            self.logit_scale = torch.nn.Parameter(torch.tensor(0.0))

        def forward(self, input_ids, pixel_values, length_groups=1):
            return self.logits

    # 2 images; texts: their 2 paired texts, then 1 hard negative
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.5, -1.0]])
    loss, metrics = wm.clip_loss(Fixed(logits), {"input_ids": None, "pixel_values": None})

    def ce(row, target):
        return -(row[target] - math.log(sum(math.exp(x) for x in row)))

    image_to_text = (ce([2.0, 0.0, 1.0], 0) + ce([0.5, 1.5, -1.0], 1)) / 2
    text_to_image = (ce([2.0, 0.5], 0) + ce([0.0, 1.5], 1)) / 2  # columns of the paired texts only
    assert loss.item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-6)
    assert metrics["accuracy"].item() == 1.0

    # the sign term: the hard negative (column 2) was made from image 1, whose logit for it is -1.0
    def softplus(x):
        return math.log1p(math.exp(x))

    batch = {"input_ids": None, "pixel_values": None, "negative_owner": torch.tensor([1])}
    signed, metrics = wm.clip_loss(Fixed(logits), batch, sign_weight=0.5)
    positives = (softplus(-2.0) + softplus(-1.5)) / 2  # -log sigmoid(logit) of each image's own text
    negatives = softplus(-1.0)  # -log(1 - sigmoid(logit)) of the hard negative
    assert signed.item() == pytest.approx(loss.item() + 0.5 * 0.5 * (positives + negatives), rel=1e-6)
    assert metrics["negatives_below_0"].item() == 1.0
    # a fixed scale for the sign term: logits are exp(0) * cos here, so sign_scale 3 triples them
    scaled, _ = wm.clip_loss(Fixed(logits), batch, sign_weight=0.5, sign_scale=3.0)
    positives = (softplus(-6.0) + softplus(-4.5)) / 2
    assert scaled.item() == pytest.approx(loss.item() + 0.5 * 0.5 * (positives + softplus(-3.0)), rel=1e-6)


def texts_of(examples: list) -> list:
    return [e["text"] for e in examples] + [t for e in examples for t in e["negatives"]]


def test_clip_pairs_collate_puts_the_negatives_after_the_paired_texts_padded_with_the_end_token():
    c = dataclasses.replace(wm.WORLD_PRESETS["micro"], clip_colour_negatives=1)
    raw = RawTokenizer.from_str(wm.clip_tokenizer_json(c))
    pairs = wm.ClipPairs(c, raw, 24, wm.WorldPixels(c.world))
    examples = [pairs[k] for k in range(0, 24, 3)]
    assert len({len(e["negatives"]) for e in examples}) > 1  # examples with different numbers of negatives
    batch = pairs.collate(examples)
    texts = texts_of(examples)
    rows = [raw.encode(t).ids for t in texts]  # one text at a time: unpadded
    rows = [[i for i in row if i != wm.CLIP_EOS_ID] + [wm.CLIP_EOS_ID] for row in rows]
    longest = max(len(row) for row in rows)
    assert batch["input_ids"].tolist() == [row + [wm.CLIP_EOS_ID] * (longest - len(row)) for row in rows]
    assert torch.equal(batch["input_ids"], wm.encode_clip_texts(raw, texts))
    assert torch.equal(pairs.collate(examples[::-1])["input_ids"], wm.encode_clip_texts(raw, texts_of(examples[::-1])))
    assert batch["negative_owner"].tolist() == [i for i, e in enumerate(examples) for _ in e["negatives"]]
    assert torch.equal(batch["pixel_values"], torch.stack([e["pixel_values"] for e in examples]))
    single, scene = pairs.scene(wm._train_scene(c, 0)[0])
    assert pairs.scene(scene.seed)[1] is scene  # kept after the first use
    assert (len(scene.objects) == 1) >= single


def test_clip_colour_negatives_name_a_colour_the_image_lacks():
    scene = sample_scene(11)
    present = {(o.colour, o.shape) for o in scene.objects}
    for variant in range(12):
        text, negatives = wm.clip_texts(scene, variant, colour_negatives=2)
        assert len(negatives) == 2
        def words(t):  # lower case, without articles (they follow the colour: "a red", "an orange")
            return [w for w in t.lower().rstrip(".").split() if w not in ("a", "an")]

        (own,) = [c for c in scene.config.colour_names if c in words(text)]
        for negative in negatives:
            (colour,) = [c for c in scene.config.colour_names if c in words(negative)]
            assert colour not in {c for c, _ in present}
            assert [own if w == colour else w for w in words(negative)] == words(text)  # only the colour differs


def test_clip_hard_negatives_differ_only_in_an_absent_shape():
    import re

    from lvlm.world import find_mentions

    surface = r"\b(plus sign|circle|disk|dot|square|box|block|triangle|star|cross|diamond|rhombus)\b"
    scene = sample_scene(11)
    for variant in range(12):
        text, negatives = wm.clip_texts(scene, variant, hard_negatives=5)
        assert len(negatives) == len(scene.config.shapes) - len(scene.objects)
        (shape,) = find_mentions(text)
        assert shape in scene.shapes
        for negative in negatives:
            (other,) = find_mentions(negative)
            assert other not in scene.shapes
            assert re.sub(surface, "X", text) == re.sub(surface, "X", negative)  # the same words otherwise


@pytest.mark.parametrize("swap", ["shape", "place"])
def test_true_and_swapped_texts_differ_in_one_false_detail(swap):
    import re

    from lvlm.world import PLACES, find_mentions
    from lvlm.world.text import PLACE_PHRASES

    phrases = sorted((p for ps in PLACE_PHRASES.values() for p in ps), key=len, reverse=True)
    place_of = {p: PLACES.index(name) for name, ps in PLACE_PHRASES.items() for p in ps}

    def place(text):  # the cell a text names (the longest phrase found), or None
        found = [p for p in phrases if p in text.lower()]
        return place_of[found[0]] if found else None

    for seed in range(20):
        scene = sample_scene(seed)
        text, swapped = wm._true_and_swapped(scene, swap)
        (shape,) = find_mentions(text)
        (other,) = find_mentions(swapped)
        if swap == "shape":
            assert shape in scene.shapes and other not in scene.shapes and place(text) == place(swapped)
        else:
            cells = {o.cell for o in scene.objects}
            assert other == shape and place(text) in cells and place(swapped) not in cells
            assert re.sub(r"\s+", " ", swapped) != text


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_sft_mixture_has_the_set_share_of_question_only_conversations(share):
    from lvlm.world.text import DESCRIPTION_INSTRUCTIONS

    c = dataclasses.replace(wm.WORLD_PRESETS["default"], sft_steps=25, sft_batch=32, sft_qa_share=share)
    records = wm.world_sft_records(c)
    assert len(records) == 800
    question_only = 0
    for record in records:
        described = [q for q, _ in record["turns"] if q in DESCRIPTION_INSTRUCTIONS]
        yes_no = [a for _, a in record["turns"] if a in ("Yes", "No")]
        if described:
            assert len(described) == 1 and len(yes_no) == c.sft_yes_no
            assert len(record["turns"]) == 1 + c.sft_yes_no + c.sft_choice + c.sft_short_answers
        else:
            question_only += 1
            assert len(yes_no) == len(record["turns"]) == c.sft_qa_yes_no
    assert question_only / len(records) == pytest.approx(share, abs=0.05)


def test_reading_conversations_are_text_only_and_answered_by_their_caption():
    """Fact-RLHF's reader data (``world_reading_records``): a caption listed as the reward prompt lists its
    facts, no image, and yes/no questions whose "Yes" answers name only what the caption names."""
    from lvlm.world import find_mentions
    from rewards import FACTS_HEADER

    c = wm.WORLD_PRESETS["default"]
    records = wm.world_reading_records(c, 120)
    assert len(records) == 120 and len({r["turns"][0][0] for r in records}) == 120
    vocabulary = RawTokenizer.from_str(wm.world_tokenizer_json(c))
    absent_asked = 0
    for record in records:
        first = record["turns"][0][0]
        assert record["image"] is None and len(record["turns"]) == 4 and first.startswith(FACTS_HEADER + "  - ")
        assert 0 not in vocabulary.encode(first).ids, f"a word of {first!r} is not in the world's vocabulary"
        caption, question = first[len(FACTS_HEADER) + 4:].split("\n")
        scene = sample_scene(int(record["where"].split()[2]), c.world)
        assert scene.split == "train" and caption in captions(scene, 3)  # a caption of the scene asked about
        named = set(find_mentions(caption))
        assert named == set(scene.shapes)
        for q, answer in [(question, record["turns"][0][1])] + record["turns"][1:]:
            assert answer in ("Yes", "No") and "<image>" not in q
            if answer == "Yes":
                assert set(find_mentions(q)) <= named, (caption, q)
            absent_asked += not set(find_mentions(q)) <= named
    assert absent_asked > 0  # some questions name a shape the caption does not (answered "No")


def test_question_error_names_what_makes_a_question_false():
    from lvlm.world import scenes, world_rng, yes_no_question
    seen = set()
    for scene in scenes("test", MICRO.world, limit=20):
        rng = world_rng(scene.seed, "test-question-error")
        for kind in ("attribute", "claim"):
            for truth in (True, False, False, False, False):
                q = yes_no_question(scene, rng, kind=kind, truth=truth)
                error = wm.question_error(scene, q)
                seen.add((kind, error))
                objects = {(o.shape, o.colour, wm.PLACES[o.cell]) for o in scene.objects}
                colours = {o.shape: o.colour for o in scene.objects}
                if error == "none":
                    assert q.answer == "Yes"
                elif error == "absent":
                    assert q.shape not in scene.shapes
                elif error == "colour":
                    assert colours[q.shape] != q.colour
                else:
                    assert kind == "claim" and colours[q.shape] == q.colour
                    assert (q.shape, q.colour, q.place) not in objects
    assert {("attribute", "colour"), ("claim", "place"), ("claim", "absent"), ("claim", "none")} <= seen
    assert ("attribute", "place") not in seen  # an attribute question names no place


def test_labeler_place_claims_name_a_present_object_in_its_colour():
    from lvlm.world import find_mentions
    config = dataclasses.replace(MICRO, labeler_questions=4, labeler_place_claims=4, labeler_steps=5)
    answers = []
    for record in wm.world_labeler_records(config):
        scene = sample_scene(record["image"], config.world)
        colour_of = {o.shape: o.colour for o in scene.objects}
        assert len(record["turns"]) == 4
        for question, answer in record["turns"]:
            (shape,) = find_mentions(question)
            assert shape in colour_of and colour_of[shape] in question.split()  # true, or false by place only
            answers.append(answer)
    assert 0.3 < answers.count("Yes") / len(answers) < 0.7
    with pytest.raises(ValueError, match="labeler_place_claims"):
        wm.world_labeler_records(dataclasses.replace(config, labeler_place_claims=5))


def test_answer_scores_are_the_answer_tokens_log_probabilities(micro):
    """Each candidate's score equals log P of its tokens (and "</s>") read one prefix at a time."""
    _, models = micro
    model, tokenizer = load_lvlm(models.sft).eval(), Tokenizer.from_file(models.tokenizer)
    scene = sample_scene(2_000_003, MICRO.world)
    pixels = wm.WorldPixels(MICRO.world)(scene.seed)
    question, answers = "Where is the red circle?", ["top left", "centre"]
    scores = wm.answer_scores(model, tokenizer, question, answers, pixels)
    for answer, score in zip(answers, scores):
        encoded = wm.encode_conversation(tokenizer, [(question, answer)], num_images=1,
                                         image_tokens_per_image=model.config.image_tokens_per_image)
        ids, mask = encoded["input_ids"], encoded["assistant_mask"]
        expected = 0.0
        for t in mask.nonzero()[:, 0].tolist():  # each answer token, from the logits of its prefix alone
            with torch.no_grad():
                logits = model(ids[None, :t], pixels[None])[0, -1]
            expected += logits.float().log_softmax(-1)[ids[t]].item()
        assert score.item() == pytest.approx(expected, abs=1e-4)
    assert mask.sum() == len(tokenizer.encode("centre", add_bos=False)) + 1  # the answer and its "</s>"


@pytest.mark.parametrize("oracle", ["right", "first"])
def test_short_answer_accuracy_counts_by_kind_and_object_count(micro, monkeypatch, oracle):
    """With scores that always favour the right answer every rate is 1; with scores that always favour the
    first candidate, each rate is the share of questions whose answer is that candidate (recounted here)."""
    from lvlm.world import PLACES, scenes, short_answer_question, world_rng

    _, models = micro
    asked = []

    def fake_scores(model, tokenizer, question, answers, pixels):
        asked.append((question, tuple(answers)))
        scores = torch.zeros(len(answers))
        scores[0] = 1.0
        return scores

    if oracle == "first":
        monkeypatch.setattr(wm, "answer_scores", fake_scores)
    else:
        truths = []  # the right answers in the order they are asked (the same question can recur)
        for scene in scenes("test", MICRO.world, limit=6):
            rng = world_rng(scene.seed, "short-answer-accuracy")
            truths += [short_answer_question(scene, rng, kind=kind).answer for kind in ("colour", "shape", "place")]
        truths = iter(truths)

        def oracle_scores(model, tokenizer, question, answers, pixels):
            right = next(truths)
            return torch.tensor([float(a == right) for a in answers])

        monkeypatch.setattr(wm, "answer_scores", oracle_scores)
    result = wm.short_answer_accuracy(None, None, MICRO.world, 6)
    expected, no_binding = {}, []
    for scene in scenes("test", MICRO.world, limit=6):
        rng = world_rng(scene.seed, "short-answer-accuracy")
        count = "one" if len(scene.objects) == 1 else "several"
        for kind, first in (("colour", MICRO.world.colour_names[0]), ("shape", MICRO.world.shapes[0]), ("place", PLACES[0])):
            q = short_answer_question(scene, rng, kind=kind)
            expected.setdefault(f"{kind}/{count}", []).append(1.0 if oracle == "right" else float(q.answer == first))
        if count == "several":
            no_binding.append(1 / len(scene.objects))
    assert {k: v for k, v in result.items() if k != "several/no binding"} == {
        k: pytest.approx(sum(v) / len(v)) for k, v in expected.items()}
    assert result["several/no binding"] == pytest.approx(sum(no_binding) / len(no_binding))
    if oracle == "first":
        assert len(asked) == 18 and {a for _, a in asked} == {MICRO.world.colour_names, MICRO.world.shapes, PLACES}


def test_step_and_batch_counts_that_would_fail_at_their_stage_are_refused_before_the_first(tmp_path):
    bad = dataclasses.replace(MICRO, sft_steps=0, labeler_batch=0, reward_clip_steps=-1)
    with pytest.raises(ValueError, match=r"sft_steps 0, labeler_batch 0, reward_clip_steps -1: steps, batches"):
        wm.build_world_models(bad, tmp_path / "bad", verbose=False)
    assert not (tmp_path / "bad").exists()  # refused before CLIP trained
    wm.check_config(dataclasses.replace(MICRO, ground_steps=0, reward_clip_steps=0))  # 0 skips those two stages
