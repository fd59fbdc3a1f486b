"""Model configurations as dataclasses, read from and written to Hugging Face ``config.json``.

Three configs describe a LLaVA-1.5 model (ANCHORS §5):

- ``LlamaConfig``      the language decoder (``text_config`` in the LLaVA file);
- ``CLIPVisionConfig`` the ViT vision tower (``vision_config``), also CLIP's image tower;
- ``CLIPTextConfig``   CLIP's text tower (only the standalone CLIP model has one);

and two containers: ``LlavaConfig`` (vision + projector + text) and ``CLIPConfig`` (vision + text +
projections). Field names and defaults are the Hugging Face ones, because the official
``llava-1.5-7b-hf/config.json`` lists only the fields that differ from those defaults.

``from_hf`` reads a ``config.json`` dictionary (unknown keys are ignored, unsupported values raise
``ValueError`` naming the field); ``to_hf`` writes one that transformers reads back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .records import read_json


def _pick(cls, d: dict) -> dict:
    """The entries of ``d`` that are fields of dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _unsupported(where: str, name: str, value, allowed) -> ValueError:
    return ValueError(f"unsupported config: {where}.{name} = {value!r} (this code supports {allowed})")


@dataclass
class LlamaConfig:
    """The Llama decoder (Touvron et al. 2023): RMSNorm, rotate-half RoPE, GQA, SwiGLU."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> = num_attention_heads (no GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"unsupported config: text_config.num_attention_heads = {self.num_attention_heads} is not a "
                f"multiple of num_key_value_heads = {self.num_key_value_heads}"
            )

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        where = "text_config"
        if d.get("model_type", "llama") not in ("llama",):
            raise _unsupported(where, "model_type", d["model_type"], "'llama'")
        if d.get("hidden_act", "silu") != "silu":
            raise _unsupported(where, "hidden_act", d["hidden_act"], "'silu'")
        if d.get("rope_scaling") not in (None, {}):
            raise _unsupported(where, "rope_scaling", d["rope_scaling"], "None")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise _unsupported(where, flag, d[flag], "False")
        d = dict(d)
        if isinstance(d.get("eos_token_id"), list):  # some writers store a list of end ids
            d["eos_token_id"] = d["eos_token_id"][0]
        rope = d.get("rope_parameters")  # transformers 5.x moves rope_theta here
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in d:
            d["rope_theta"] = rope["rope_theta"]
        return cls(**_pick(cls, d))

    def to_hf(self) -> dict:
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **dataclasses.asdict(self)}


@dataclass
class CLIPVisionConfig:
    """The CLIP ViT image tower (Radford et al. 2021) — also LLaVA's vision tower."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 512

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict) -> "CLIPVisionConfig":
        if d.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise _unsupported("vision_config", "hidden_act", d["hidden_act"], "'quick_gelu' or 'gelu'")
        return cls(**_pick(cls, d))

    def to_hf(self) -> dict:
        return {"model_type": "clip_vision_model", **dataclasses.asdict(self)}


@dataclass
class CLIPTextConfig:
    """The CLIP text tower: a causal transformer pooled at the end-of-text token."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 512
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    @classmethod
    def from_hf(cls, d: dict) -> "CLIPTextConfig":
        if d.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise _unsupported("text_config", "hidden_act", d["hidden_act"], "'quick_gelu' or 'gelu'")
        return cls(**_pick(cls, d))

    def to_hf(self) -> dict:
        return {"model_type": "clip_text_model", **dataclasses.asdict(self)}


@dataclass
class CLIPConfig:
    """A whole CLIP model: both towers, their bias-free projections and ``logit_scale``."""

    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf(cls, d: dict) -> "CLIPConfig":
        if d.get("model_type", "clip") != "clip":
            raise _unsupported("config", "model_type", d["model_type"], "'clip'")
        return cls(
            text_config=CLIPTextConfig.from_hf(d.get("text_config") or {}),
            vision_config=CLIPVisionConfig.from_hf(d.get("vision_config") or {}),
            **_pick(cls, {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}),
        )

    def to_hf(self) -> dict:
        return {
            "model_type": "clip",
            "architectures": ["CLIPModel"],
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": self.text_config.to_hf(),
            "vision_config": self.vision_config.to_hf(),
        }


@dataclass
class LlavaConfig:
    """LLaVA-1.5 (Liu et al. 2023): CLIP vision tower -> 2-layer GELU MLP projector -> Llama."""

    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text_config: LlamaConfig = field(default_factory=LlamaConfig)
    image_token_index: int = 32000
    pad_token_id: int | None = None
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"

    def __post_init__(self):
        if self.projector_hidden_act != "gelu":
            raise _unsupported("config", "projector_hidden_act", self.projector_hidden_act, "'gelu'")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise _unsupported(
                "config", "vision_feature_select_strategy", self.vision_feature_select_strategy, "'default' or 'full'"
            )
        if not isinstance(self.vision_feature_layer, int):
            raise _unsupported("config", "vision_feature_layer", self.vision_feature_layer, "a single int")
        n = self.vision_config.num_hidden_layers
        if not -(n + 1) <= self.vision_feature_layer <= n:
            raise _unsupported("config", "vision_feature_layer", self.vision_feature_layer, f"-{n + 1}..{n}")

    @property
    def image_tokens_per_image(self) -> int:
        """How many positions of ``input_ids`` one image occupies (576 for LLaVA-1.5 at 336 px)."""
        full = self.vision_feature_select_strategy == "full"
        return self.vision_config.num_patches + (1 if full else 0)

    @classmethod
    def from_hf(cls, d: dict) -> "LlavaConfig":
        if d.get("model_type", "llava") != "llava":
            raise _unsupported("config", "model_type", d["model_type"], "'llava'")
        d = dict(d)
        if "image_token_id" in d and "image_token_index" not in d:  # transformers >= 4.5x spelling
            d["image_token_index"] = d["image_token_id"]
        text = dict(d.get("text_config") or {})
        if d.get("tie_word_embeddings"):  # transformers 5 ties when either level says so
            text["tie_word_embeddings"] = True
        if "vocab_size" in d and "vocab_size" not in text:  # old LLaVA files keep it at the top level
            text["vocab_size"] = d["vocab_size"]
        return cls(
            vision_config=CLIPVisionConfig.from_hf(d.get("vision_config") or {}),
            text_config=LlamaConfig.from_hf(text),
            **_pick(cls, {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}),
        )

    def to_hf(self) -> dict:
        return {
            "model_type": "llava",
            "architectures": ["LlavaForConditionalGeneration"],
            "image_token_index": self.image_token_index,
            "image_token_id": self.image_token_index,
            "pad_token_id": self.pad_token_id,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "image_seq_length": self.image_tokens_per_image,
            "vision_config": self.vision_config.to_hf(),
            "text_config": self.text_config.to_hf(),
        }


def read_config(path: str | Path) -> LlavaConfig | CLIPConfig:
    """Read ``config.json`` (or a directory holding one) into a ``LlavaConfig`` or ``CLIPConfig``."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    d = read_json(path, "config.json")
    kind = d.get("model_type")
    if kind == "llava":
        return LlavaConfig.from_hf(d)
    if kind == "clip":
        return CLIPConfig.from_hf(d)
    raise ValueError(f"{path}: model_type = {kind!r}; expected 'llava' or 'clip'")


def write_config(config: LlavaConfig | CLIPConfig, directory: str | Path) -> Path:
    """Write ``config.json`` into ``directory`` (created if needed); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config.to_hf(), indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Presets. The real ones are the published shapes (ANCHORS §5); the tiny ones keep every
# architectural feature (GQA, several layers, several patches) at a size a CPU test runs in ms.
# ---------------------------------------------------------------------------------------------

CLIP_L14_336_VISION = CLIPVisionConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768,
)


def _llava(text: LlamaConfig) -> LlavaConfig:
    return LlavaConfig(vision_config=dataclasses.replace(CLIP_L14_336_VISION), text_config=text,
                       image_token_index=32000, pad_token_id=32001)


PRESETS = {
    "llava-1.5-7b": lambda: _llava(LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001)),
    "llava-1.5-13b": lambda: _llava(LlamaConfig(
        vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001)),
    "clip-vit-large-patch14-336": lambda: CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, projection_dim=768),
        vision_config=dataclasses.replace(CLIP_L14_336_VISION),
        projection_dim=768,
    ),
    # 28 px images in 14 px patches: 4 patches (+ CLS) per image.
    "tiny-llava": lambda: LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16),
        text_config=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                rms_norm_eps=1e-5, pad_token_id=0),
        image_token_index=3, pad_token_id=0,
    ),
    "tiny-clip": lambda: CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=127),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16),
        projection_dim=16,
    ),
}


def preset(name: str) -> LlavaConfig | CLIPConfig:
    """A fresh copy of a named preset config."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
