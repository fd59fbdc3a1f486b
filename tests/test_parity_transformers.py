"""Parity with Hugging Face transformers (skipped when it is not installed).

Tiny random transformers models saved with ``save_pretrained`` load with ``lvlm.load_lvlm`` / ``load_clip``
and give the same outputs; what ``save_lvlm`` / ``save_clip`` write loads back in transformers.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lvlm.checkpoint import load_clip, load_lvlm, save_clip, save_lvlm  # noqa: E402

TOL = 1e-4
IMAGE_TOKEN = 3


def _hf_llava(strategy: str):
    """A tiny random transformers LLaVA with the tiny-llava shapes and the real knobs: GQA (4 query heads,
    2 key/value heads), features from layer -2, the given select strategy."""
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16)
    text = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    rms_norm_eps=1e-5, pad_token_id=0, tie_word_embeddings=False)
    n_image_tokens = 4 + (strategy == "full")
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                      image_seq_length=n_image_tokens, vision_feature_layer=-2,
                                      vision_feature_select_strategy=strategy, projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises norms to 1 / biases to 0: randomise so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, n_image_tokens


def _llava_batch(n_image_tokens):
    g = torch.Generator().manual_seed(1)
    text = lambda n: torch.randint(4, 128, (n,), generator=g)  # noqa: E731
    row0 = torch.cat([text(5), torch.full((n_image_tokens,), IMAGE_TOKEN), text(6)])
    row1 = torch.cat([text(2), torch.full((n_image_tokens,), IMAGE_TOKEN), text(9)])
    return torch.stack([row0, row1]), torch.randn(2, 3, 28, 28, generator=g)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_from_transformers_and_back(tmp_path, strategy):
    hf, n_image_tokens = _hf_llava(strategy)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ids, pixels = _llava_batch(n_image_tokens)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits

    ours = load_lvlm(tmp_path / "hf")
    assert ours.config.vision_feature_select_strategy == strategy
    assert ours.config.image_tokens_per_image == n_image_tokens
    with torch.no_grad():
        got = ours(ids, pixels)
    assert got.shape == expected.shape == (2, ids.shape[1], 128)
    assert (got - expected).abs().max() < TOL

    save_lvlm(ours, tmp_path / "ours")
    back, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours",
                                                                            output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        again = back.eval()(input_ids=ids, pixel_values=pixels).logits
    assert (again - expected).abs().max() < TOL


def _features(out):
    """transformers 5.x returns an output object from get_*_features, 4.x a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


# transformers pools the text at the first `eos_token_id`, except for configs saying eos_token_id = 2 (the
# original OpenAI files), where it takes the highest id. Each case is built so the other rule would pool
# elsewhere: with end token 100 other ids are higher; with the legacy config no id 2 occurs at all.
@pytest.mark.parametrize("eos_token_id,end_token", [(100, 100), (2, 127)], ids=["first-eos", "legacy-argmax"])
def test_clip_from_transformers_and_back(tmp_path, eos_token_id, end_token):
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                         pad_token_id=0, bos_token_id=1, eos_token_id=eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14, projection_dim=16),
        projection_dim=16, logit_scale_init_value=3.1)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(config).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)

    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(3, 3, 28, 28, generator=g)
    ids = torch.randint(101, 127, (3, 10), generator=g)  # all above 100, all below 127
    # rows end at different places, padded after the end token
    ids[0, 4], ids[0, 5:] = end_token, 0
    ids[1, 7], ids[1, 8:] = end_token, 0
    ids[2, 9] = end_token
    with torch.no_grad():
        want_img = _features(hf.get_image_features(pixel_values=pixels))
        want_txt = _features(hf.get_text_features(input_ids=ids))

    ours = load_clip(tmp_path / "hf")
    with torch.no_grad():
        assert (ours.encode_image(pixels) - want_img).abs().max() < TOL
        assert (ours.encode_text(ids) - want_txt).abs().max() < TOL
    assert torch.equal(ours.logit_scale, hf.logit_scale)

    save_clip(ours, tmp_path / "ours")
    back, info = transformers.CLIPModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert (_features(back.eval().get_text_features(input_ids=ids)) - want_txt).abs().max() < TOL
        assert (_features(back.get_image_features(pixel_values=pixels)) - want_img).abs().max() < TOL
