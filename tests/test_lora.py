"""LoRA (optim/lora.py): wrapping, freezing, merging and the PEFT file layout, on the tiny LLaVA."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lvlm.config import preset
from lvlm.llava import LlavaForConditionalGeneration
from optim.lora import LoRALinear, apply_lora, load_lora, lora_modules, lora_state_dict, merge_lora, save_lora

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(preset("tiny-llava"))


def inputs(model, seed=1):
    """Two rows, the first with one image (4 image-token positions), the second text only."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, c.text_config.vocab_size, (2, 12), generator=g)
    ids[0, 2:2 + c.image_tokens_per_image] = c.image_token_index
    size = c.vision_config.image_size
    return ids, torch.randn(1, 3, size, size, generator=g)


def expected_wrapped(model):
    """The language-model projections, listed independently of the code under test."""
    n = model.config.text_config.num_hidden_layers
    return {f"language_model.model.layers.{i}.{block}.{proj}"
            for i in range(n) for block, projs in PROJECTIONS.items() for proj in projs}


def randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_wraps_exactly_the_language_model_projections_and_freezes_the_rest():
    model = tiny_model()
    apply_lora(model, r=4, alpha=8)
    wrapped = expected_wrapped(model)
    assert set(lora_modules(model)) == wrapped
    # The CLIP tower's q/k/v_proj, the projector and lm_head stay plain nn.Linear.
    for name, m in model.named_modules():
        if name.startswith(("vision_tower.", "multi_modal_projector.")) or name == "language_model.lm_head":
            assert not isinstance(m, LoRALinear), name
    assert type(model.language_model.lm_head) is nn.Linear
    assert type(model.vision_tower.vision_model.encoder.layers[0].self_attn.q_proj) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}.weight" for m in wrapped for ab in "AB"}
    t = model.config.text_config
    q = model.language_model.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.shape == (4, t.hidden_size)
    assert q.lora_B.weight.shape == (t.num_attention_heads * t.head_dim, 4)
    d = model.language_model.model.layers[1].mlp.down_proj
    assert d.lora_A.weight.shape == (4, t.intermediate_size) and d.lora_B.weight.shape == (t.hidden_size, 4)
    assert q.scaling == 2.0
    assert torch.count_nonzero(q.lora_B.weight) == 0 and torch.count_nonzero(q.lora_A.weight) > 0
    # Kaiming-uniform with a = sqrt(5): bound = 1 / sqrt(fan_in).
    assert q.lora_A.weight.abs().max() <= 1 / t.hidden_size ** 0.5
    assert set(lora_state_dict(model)) == trainable


def test_output_unchanged_at_init_even_with_dropout_in_train_mode():
    model = tiny_model().eval()
    ids, pixels = inputs(model)
    with torch.no_grad():
        before = model(ids, pixels)
        apply_lora(model, r=4, alpha=8, dropout=0.5)
        model.train()  # dropout is active, but B = 0 makes the adapter path exactly zero
        after = model(ids, pixels)
    assert torch.equal(before, after)


def test_optimizer_step_changes_only_adapters():
    model = tiny_model()
    apply_lora(model, r=4, alpha=8)
    ids, pixels = inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)  # frozen ones included

    def step():
        model(ids, pixels).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}

    # Step 1: dL/dA = scaling * B^T (dL/dy) x^T = 0 while B = 0, so only the B matrices move.
    changed = step()
    assert changed == {k for k in before if k.endswith(".lora_B.weight")}
    # Step 2: B is non-zero now, so A moves too; nothing outside the adapters ever does.
    changed = step()
    assert changed == {k for k in before if k.endswith((".lora_A.weight", ".lora_B.weight"))}


def test_merge_equals_unmerged_and_restores_canonical_modules():
    model = tiny_model().eval()
    canonical_keys = set(model.state_dict())
    apply_lora(model, r=4, alpha=8, dropout=0.1)
    randomize_adapters(model)
    ids, pixels = inputs(model)
    q = model.language_model.model.layers[0].self_attn.q_proj
    expected_q = q.base_layer.weight + 2.0 * q.lora_B.weight @ q.lora_A.weight  # alpha / r = 2
    with torch.no_grad():
        unmerged = model(ids, pixels)
        merge_lora(model)
        merged = model(ids, pixels)
    assert not torch.equal(unmerged, tiny_model().eval()(ids, pixels))  # the adapters do something
    # W + s B A in one matrix rounds differently from W x + s B (A x): a few float32 ulps of the
    # logits (1.04e-6 seen on an AMD EPYC), while a wrong merge (scale, transpose) is off by ~1e-2
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not lora_modules(model)
    assert type(model.language_model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert set(model.state_dict()) == canonical_keys
    torch.testing.assert_close(model.language_model.model.layers[0].self_attn.q_proj.weight, expected_q)


def test_merge_keeps_a_bfloat16_base_in_bfloat16():
    model = tiny_model().to(torch.bfloat16)
    apply_lora(model, r=2, alpha=2)
    randomize_adapters(model)
    m = model.language_model.model.layers[0].mlp.up_proj
    assert m.lora_A.weight.dtype == torch.float32  # adapters train in float32
    expected = (m.base_layer.weight.float() + m.lora_B.weight @ m.lora_A.weight).to(torch.bfloat16)
    merge_lora(model)
    w = model.language_model.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, expected)


def test_save_load_round_trip_in_peft_layout(tmp_path):
    model = tiny_model().eval()
    apply_lora(model, r=4, alpha=16, dropout=0.05)
    randomize_adapters(model)
    ids, pixels = inputs(model)
    with torch.no_grad():
        expected = model(ids, pixels)
    save_lora(model, tmp_path, base_model_name_or_path="llava-hf/llava-1.5-7b-hf")

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.{m}.lora_{ab}.weight" for m in expected_wrapped(model) for ab in "AB"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16, 0.05)
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False and config["use_rslora"] is False
    assert config["base_model_name_or_path"] == "llava-hf/llava-1.5-7b-hf"
    # target_modules is a regex PEFT full-matches against module paths: language model only.
    pattern = re.compile(config["target_modules"])
    assert pattern.fullmatch("language_model.model.layers.0.self_attn.q_proj")
    assert pattern.fullmatch("model.language_model.layers.3.mlp.down_proj")  # newer HF LLaVA paths
    assert not pattern.fullmatch("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not pattern.fullmatch("language_model.lm_head")

    fresh = tiny_model().eval()  # the same base weights, no LoRA
    load_lora(fresh, tmp_path)
    assert set(lora_modules(fresh)) == expected_wrapped(fresh)
    assert fresh.language_model.model.layers[0].self_attn.q_proj.scaling == 4.0
    with torch.no_grad():
        assert torch.equal(fresh(ids, pixels), expected)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(lora_state_dict(fresh))


def test_load_accepts_adapter_name_segment_and_newer_hf_paths(tmp_path):
    model = tiny_model().eval()
    apply_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    ids, pixels = inputs(model)
    with torch.no_grad():
        expected = model(ids, pixels)
    save_lora(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    renamed = {k.replace("base_model.model.language_model.model.", "base_model.model.model.language_model.")
               .replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    assert all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in renamed)
    save_file(renamed, str(tmp_path / "adapter_model.safetensors"))
    fresh = tiny_model().eval()
    load_lora(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids, pixels), expected)


def test_errors_name_the_problem(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="prefix=''"):
        apply_lora(model.language_model, r=2, alpha=2)  # a bare LM has no 'language_model.' prefix
    apply_lora(model, r=2, alpha=2)
    with pytest.raises(ValueError, match="already has"):
        apply_lora(model, r=2, alpha=2)
    save_lora(model, tmp_path)
    with pytest.raises(ValueError, match="r=3"):
        save_lora(model, tmp_path, r=3)
    other = tiny_model()
    apply_lora(other, r=8, alpha=2)
    with pytest.raises(ValueError, match="r=2"):
        load_lora(other, tmp_path)
    with pytest.raises(ValueError, match="no LoRA modules"):
        merge_lora(tiny_model())


def test_bare_language_model_with_empty_prefix():
    model = tiny_model().language_model
    apply_lora(model, r=2, alpha=4, targets=("q_proj", "v_proj"), prefix="")
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert set(lora_modules(model)) == expected


def test_peft_reads_the_files(tmp_path):
    """Optional parity: PEFT (if installed) parses our config and finds our keys in its own format."""
    peft = pytest.importorskip("peft")
    model = tiny_model()
    apply_lora(model, r=4, alpha=8)
    save_lora(model, tmp_path)
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (config.r, config.lora_alpha) == (4, 8)
    weights = peft.utils.load_peft_weights(str(tmp_path))
    assert set(weights) == {f"base_model.model.{k}" for k in lora_state_dict(model)}
