"""Checkpoint import/export (lvlm.checkpoint): layouts, key spellings, strictness, dtypes, atomic saves."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lvlm.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    copy_tokenizer,
    load_clip,
    load_lvlm,
    read_safetensors_header,
    save_clip,
    save_lvlm,
)
from lvlm.clip import CLIPModel
from lvlm.config import preset
from lvlm.llava import LlavaForConditionalGeneration


def _tiny_llava(seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = preset("tiny-llava")
    cfg.text_config = dataclasses.replace(cfg.text_config, tie_word_embeddings=tie)
    return LlavaForConditionalGeneration(cfg).eval()


def _batch(cfg, seed=1):
    """Two rows: one with an image (its token expanded), one text-only."""
    g = torch.Generator().manual_seed(seed)
    n_img = cfg.image_tokens_per_image
    text = lambda n: torch.randint(4, cfg.text_config.vocab_size, (n,), generator=g)  # noqa: E731
    row0 = torch.cat([text(3), torch.full((n_img,), cfg.image_token_index), text(4)])
    row1 = text(3 + n_img + 4)
    size = cfg.vision_config.image_size
    return torch.stack([row0, row1]), torch.randn(1, 3, size, size, generator=g)


def _logits(model):
    ids, pixels = _batch(model.config)
    with torch.no_grad():
        return model(ids, pixels.to(next(model.parameters()).dtype))


def _assert_same_tensors(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _assert_no_meta(model):
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert not t.is_meta, name
        assert t.device.type == "cpu", name


def _rewrite(src, dst, rename=lambda k: k, extra=None, drop=()):
    """Copy checkpoint ``src`` to ``dst`` as one safetensors file, keys renamed by ``rename``."""
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, SINGLE_FILE))
    out = {rename(k): v for k, v in tensors.items() if k not in drop}
    out.update(extra or {})
    save_file(out, os.path.join(dst, SINGLE_FILE), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(config)


# -- layouts ---------------------------------------------------------------------------------

def test_single_file_and_sharded_load_the_same_weights(tmp_path):
    model = _tiny_llava()
    save_lvlm(model, tmp_path / "single")
    save_lvlm(model, tmp_path / "sharded", max_shard_bytes=20_000)
    assert sorted(os.listdir(tmp_path / "single")) == ["config.json", SINGLE_FILE]
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_path / "sharded" / SINGLE_FILE).exists()
    # every key of the model is in the index, in the file the index names, and shards respect the limit
    assert set(index["weight_map"]) == set(model.state_dict())
    total = 0
    for shard in shards:
        with safe_open(tmp_path / "sharded" / shard, "pt") as f:
            keys = list(f.keys())
            sizes = [f.get_tensor(k).numel() * 4 for k in keys]
        assert all(index["weight_map"][k] == shard for k in keys)
        assert sum(sizes) <= 20_000 or len(keys) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total == sum(t.numel() * 4 for t in model.state_dict().values())

    single, sharded = load_lvlm(tmp_path / "single"), load_lvlm(tmp_path / "sharded")
    _assert_same_tensors(model, single)
    _assert_same_tensors(model, sharded)
    assert not single.training
    _assert_no_meta(sharded)
    assert torch.equal(_logits(single), _logits(model))
    assert torch.equal(_logits(sharded), _logits(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_save_load_is_bit_exact(tmp_path, dtype):
    save_lvlm(_tiny_llava(), tmp_path / "a", dtype=dtype)
    first = load_lvlm(tmp_path / "a")
    assert {p.dtype for p in first.parameters()} == {dtype}  # dtype=None keeps the stored dtype
    assert json.loads((tmp_path / "a" / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]
    save_lvlm(first, tmp_path / "b", max_shard_bytes=30_000)
    second = load_lvlm(tmp_path / "b")
    _assert_same_tensors(first, second)
    with safe_open(tmp_path / "a" / SINGLE_FILE, "pt") as f:  # the files agree with the library's reader
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), second.state_dict()[k]), k


# Other writers' spellings, produced from the classic keys independently of the loader's renaming table.
def _transformers_4_5x(k):  # LlavaForConditionalGeneration in memory, 4.52+
    if k.startswith("language_model.model."):
        return "model.language_model." + k[len("language_model.model."):]
    if k.startswith("language_model.lm_head."):
        return k[len("language_model."):]
    return "model." + k


def _transformers_5x(k):  # save_pretrained of 5.x: vision tower without `vision_model.`
    return k.replace("vision_tower.vision_model.", "vision_tower.")


def _transformers_5x_under_model(k):
    return _transformers_4_5x(k).replace("vision_tower.vision_model.", "vision_tower.")


@pytest.mark.parametrize("rename", [lambda k: k, _transformers_4_5x, _transformers_5x, _transformers_5x_under_model],
                         ids=["classic", "4.5x", "5.x", "5.x-under-model"])
def test_every_key_spelling_loads_to_the_same_model(tmp_path, rename):
    model = _tiny_llava()
    save_lvlm(model, tmp_path / "classic")
    # harmless extras older writers add: CLIP position ids, Llama rotary frequencies
    extras = {rename("vision_tower.vision_model.embeddings.position_ids"): torch.arange(5)[None],
              "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    _rewrite(tmp_path / "classic", tmp_path / "renamed", rename, extra=extras)
    with safe_open(tmp_path / "renamed" / SINGLE_FILE, "pt") as f:
        assert set(f.keys()) == {rename(k) for k in model.state_dict()} | set(extras)
    loaded = load_lvlm(tmp_path / "renamed")
    _assert_same_tensors(model, loaded)
    assert torch.equal(_logits(loaded), _logits(model))


def test_tied_embeddings_may_be_absent_from_the_file(tmp_path):
    model = _tiny_llava(tie=True)
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
    save_lvlm(model, tmp_path / "tied")
    with safe_open(tmp_path / "tied" / SINGLE_FILE, "pt") as f:
        keys = set(f.keys())
    assert "language_model.lm_head.weight" not in keys and "language_model.model.embed_tokens.weight" in keys
    loaded = load_lvlm(tmp_path / "tied")
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    assert torch.equal(_logits(loaded), _logits(model))
    # a file that stores the tied head as well (in the 4.5x spelling) loads too
    embed = model.language_model.model.embed_tokens.weight.detach().clone()
    _rewrite(tmp_path / "tied", tmp_path / "both", extra={"lm_head.weight": embed})
    assert torch.equal(_logits(load_lvlm(tmp_path / "both")), _logits(model))


def test_dtype_conversion_on_load(tmp_path):
    model = _tiny_llava()
    save_lvlm(model, tmp_path / "m")
    bf16 = load_lvlm(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for k, v in model.state_dict().items():
        assert torch.equal(bf16.state_dict()[k], v.to(torch.bfloat16)), k
    logits = _logits(bf16)  # the forward runs in bf16
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert (logits.float() - _logits(model)).abs().max() < 0.1
    assert next(load_lvlm(tmp_path / "m", dtype="float16").parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_lvlm(tmp_path / "m", dtype="fp17")


def test_mixed_dtype_files_follow_the_config_dtype(tmp_path):
    model = _tiny_llava()
    save_lvlm(model, tmp_path / "m", dtype=torch.bfloat16)  # config.json says torch_dtype bfloat16
    norm = "language_model.model.norm.weight"
    _rewrite(tmp_path / "m", tmp_path / "mixed", drop={norm}, extra={norm: model.state_dict()[norm]})  # f32
    with safe_open(tmp_path / "mixed" / SINGLE_FILE, "pt") as f:
        assert f.get_tensor(norm).dtype == torch.float32
    loaded = load_lvlm(tmp_path / "mixed")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


# -- errors ----------------------------------------------------------------------------------

def test_strict_error_lists_missing_unexpected_and_misshaped_keys_together(tmp_path):
    save_lvlm(_tiny_llava(), tmp_path / "good")
    _rewrite(tmp_path / "good", tmp_path / "bad",
             drop={"language_model.model.norm.weight", "multi_modal_projector.linear_1.bias"},
             extra={"language_model.model.layers.0.mlp.extra_proj.weight": torch.zeros(3, 4),
                    "multi_modal_projector.linear_1.bias": torch.zeros(65)})
    with pytest.raises(ValueError) as err:
        load_lvlm(tmp_path / "bad")
    msg = str(err.value)
    assert "missing" in msg and "language_model.model.norm.weight  expected [64]" in msg
    assert "unexpected" in msg and "language_model.model.layers.0.mlp.extra_proj.weight  found [3, 4] in " \
           "model.safetensors" in msg
    assert "wrong shape" in msg and "multi_modal_projector.linear_1.bias  expected [64], found [65]" in msg
    assert str(tmp_path / "bad") in msg


def test_truncated_and_corrupt_files_are_named(tmp_path):
    save_lvlm(_tiny_llava(), tmp_path / "m")
    path = tmp_path / "m" / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        load_lvlm(tmp_path / "m")
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header"):
        load_lvlm(tmp_path / "m")
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file"):
        load_lvlm(tmp_path / "m")


def test_missing_shard_missing_weights_and_shards_without_index(tmp_path):
    save_lvlm(_tiny_llava(), tmp_path / "m", max_shard_bytes=50_000)
    second = sorted(set(json.loads((tmp_path / "m" / INDEX_FILE).read_text())["weight_map"].values()))[1]
    (tmp_path / "m" / second).unlink()
    with pytest.raises(FileNotFoundError, match=second):
        load_lvlm(tmp_path / "m")
    (tmp_path / "m" / INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        load_lvlm(tmp_path / "m")
    for p in (tmp_path / "m").glob("*.safetensors"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match=f"no weights in {tmp_path / 'm'}"):
        load_lvlm(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_lvlm(tmp_path / "nowhere")


def test_unsupported_config_names_the_field(tmp_path):
    save_lvlm(_tiny_llava(), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["text_config"]["hidden_act"] = "gelu"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"text_config\.hidden_act = 'gelu'"):
        load_lvlm(tmp_path / "m")


def test_save_refuses_wrapped_or_extended_models(tmp_path):
    model = _tiny_llava()

    class Wrapper(nn.Module):  # what DDP / FSDP look like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(ValueError, match=r"model\.module"):
        save_lvlm(Wrapper(model), tmp_path / "w")
    model.language_model.model.layers[0].self_attn.q_proj.lora_A = nn.Linear(64, 2, bias=False)
    with pytest.raises(ValueError, match="lora_A"):
        save_lvlm(model, tmp_path / "l")
    assert not (tmp_path / "w").exists() and not (tmp_path / "l").exists()


# -- saving: overwrite and interruption --------------------------------------------------------

def test_overwrite_keeps_other_files_and_removes_stale_weights(tmp_path):
    out = tmp_path / "m"
    save_lvlm(_tiny_llava(seed=0), out, max_shard_bytes=50_000)
    (out / "tokenizer.json").write_text("{}")
    model = _tiny_llava(seed=1)
    save_lvlm(model, out)  # now a single file: the old shards and index must go
    assert sorted(os.listdir(out)) == ["config.json", SINGLE_FILE, "tokenizer.json"]
    _assert_same_tensors(model, load_lvlm(out))


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import lvlm.checkpoint as ckpt

    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_lvlm(_tiny_llava(), tmp_path / "m", max_shard_bytes=50_000)
    assert os.listdir(tmp_path / "m") == []  # temporaries removed, nothing renamed into place
    with pytest.raises(FileNotFoundError):
        load_lvlm(tmp_path / "m")


# -- CLIP ------------------------------------------------------------------------------------

def _tiny_clip(seed=0):
    torch.manual_seed(seed)
    return CLIPModel(preset("tiny-clip")).eval()


def _clip_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 100, (2, 8), generator=g)
    ids[0, 5], ids[0, 6:] = 127, 0  # end-of-text, then padding
    return torch.randn(2, 3, 28, 28, generator=g), ids


def test_clip_round_trip_and_old_position_ids(tmp_path):
    model = _tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(4.2)
    save_clip(model, tmp_path / "clip")
    loaded = load_clip(tmp_path / "clip")
    _assert_same_tensors(model, loaded)
    _assert_no_meta(loaded)
    pixels, ids = _clip_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))
    _rewrite(tmp_path / "clip", tmp_path / "old", extra={
        "text_model.embeddings.position_ids": torch.arange(16)[None],
        "vision_model.embeddings.position_ids": torch.arange(5)[None]})
    _assert_same_tensors(model, load_clip(tmp_path / "old"))
    with pytest.raises(ValueError, match="use load_clip"):
        load_lvlm(tmp_path / "clip")
    with pytest.raises(ValueError, match="use load_lvlm"):
        load_clip(_save_llava(tmp_path / "llava"))


def _save_llava(path):
    save_lvlm(_tiny_llava(), path)
    return path


def test_clip_from_pytorch_model_bin(tmp_path):
    model = _tiny_clip(seed=2)
    save_clip(model, tmp_path / "clip")
    (tmp_path / "clip" / SINGLE_FILE).unlink()
    torch.save(dict(model.state_dict()), tmp_path / "clip" / "pytorch_model.bin")
    _assert_same_tensors(model, load_clip(tmp_path / "clip"))


# -- the reader against the safetensors library ------------------------------------------------

def test_header_reader_matches_the_safetensors_library(tmp_path):
    tensors = {"f16": torch.randn(3, 5).half(), "bf16": torch.randn(7).bfloat16(), "i64": torch.arange(6).view(2, 3),
               "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors")
    header = read_safetensors_header(tmp_path / "t.safetensors")
    assert set(header) == set(tensors)
    from lvlm.checkpoint import _read_tensor

    with open(tmp_path / "t.safetensors", "rb", buffering=0) as raw:
        for k, s in header.items():
            assert s.shape == tuple(tensors[k].shape) and s.dtype == tensors[k].dtype
            out = torch.empty(s.shape, dtype=s.dtype)
            _read_tensor(s, raw, out)
            assert torch.equal(out, tensors[k]), k


def test_copy_tokenizer(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text('{"a": 1}')
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "src" / "model.safetensors").write_text("not copied")
    assert copy_tokenizer(tmp_path / "src", tmp_path / "dst") == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path / "dst")) == ["tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"a": 1}'
