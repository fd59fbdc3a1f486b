"""LoRA: low-rank adapters on the language model's linear layers (Hu et al. 2021, "LoRA").

A frozen linear layer ``y = W x`` gets a trainable low-rank correction (paper, eq. 3):

    y = W x + (alpha / r) * B A dropout(x)        A: [r, in], B: [out, r]

``A`` starts like a default ``nn.Linear`` weight (Kaiming-uniform, as PEFT does) and ``B`` starts at
zero, so at initialisation the model computes exactly what it computed before. Only ``A`` and ``B``
train; everything else is frozen. After training, ``merge_lora`` folds ``(alpha / r) * B A`` into
``W`` and the model is a plain model again.

CSR trains LoRA r=128, alpha=256, dropout 0.05 on every Linear of the language model but ``lm_head``;
the Fact-RLHF reward model r=64, alpha=16 (ANCHORS §1, §3). The vision tower (which has its own
``q_proj``/``k_proj``/``v_proj``) and the projector are never touched: by default only modules under
``language_model.`` are wrapped.

Names are chosen so that files map one to one onto the PEFT layout (the format
``PeftModel.from_pretrained`` reads):

    in memory (ours)                                          adapter_model.safetensors
    language_model.model.layers.0.self_attn.q_proj.base_layer.weight   (not saved: frozen base)
    language_model.model.layers.0.self_attn.q_proj.lora_A.weight   ->  base_model.model.<same>.lora_A.weight
    language_model.model.layers.0.self_attn.q_proj.lora_B.weight   ->  base_model.model.<same>.lora_B.weight

The module path is our canonical one, which equals the module path of the classic Hugging Face
``LlavaForConditionalGeneration`` (transformers < 4.52). Newer transformers nest the decoder as
``model.language_model.layers.N...``; ``load_lora`` reads both spellings, ``save_lora`` writes the
classic one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper classes put the model under this path


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus a trainable low-rank path (Hu et al. 2021, eq. 3).

    ``forward(x)`` with ``x`` [..., in] returns ``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``,
    [..., out], where ``scaling = alpha / r``. ``lora_A.weight`` is [r, in], ``lora_B.weight`` [out, r].
    The adapters are kept in ``adapter_dtype`` (float32 by default, even under a bf16 base, so that
    the optimizer updates them in full precision); the adapter path's result is cast back to the
    base output's dtype.
    """

    def __init__(self, base_layer: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        device = base_layer.weight.device
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=adapter_dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / r
        # PEFT's default init: A like nn.Linear's own (Kaiming-uniform, a = sqrt(5)), B = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        x = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(x)) * self.scaling).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}"


# ---------------------------------------------------------------------------------------------
# apply / merge
# ---------------------------------------------------------------------------------------------


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's ``LoRALinear`` modules by module path (empty when it has none)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, targets) -> bool:
    """PEFT's rule for a list of targets: the module path equals a target or ends with ``.target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _wrap_modules(model: nn.Module, names, *, r: int, alpha: float, dropout: float) -> nn.Module:
    """Replace each named ``nn.Linear`` by a ``LoRALinear`` and freeze every non-adapter parameter."""
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        wrapper = LoRALinear(linear, r=r, alpha=alpha, dropout=dropout)
        wrapper.train(linear.training)  # a model in eval mode stays in eval mode (no adapter dropout)
        setattr(parent, child_name, wrapper)
    adapters = {id(p) for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)
    return model


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float = 0.0, targets=DEFAULT_TARGETS,
               prefix: str = "language_model.") -> nn.Module:
    """Wrap every ``nn.Linear`` under ``prefix`` whose name ends with one of ``targets`` in a ``LoRALinear``
    (Hu et al. 2021) and freeze every other parameter. In place; returns ``model``.

    ``prefix="language_model."`` (the default) keeps the vision tower, the projector and — since it is
    not a target — ``lm_head`` untouched; pass ``prefix=""`` for a bare ``LlamaForCausalLM``.
    ``targets`` match like PEFT's ``target_modules`` list: a module whose path is ``t`` or ends in ``.t``.
    """
    if isinstance(targets, str):
        targets = (targets,)
    if lora_modules(model):
        raise ValueError(f"apply_lora: the model already has {len(lora_modules(model))} LoRA modules; "
                         "merge_lora(model) first, or keep training the ones it has")
    names = []
    for name, module in model.named_modules():
        if not name.startswith(prefix) or not _matches(name, targets):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"apply_lora: {name} matches targets {list(targets)} but is a "
                             f"{type(module).__name__}, not an nn.Linear")
        names.append(name)
    if not names:
        raise ValueError(f"apply_lora: no nn.Linear under prefix {prefix!r} matches targets {list(targets)} "
                         "(for a bare language model pass prefix='')")
    return _wrap_modules(model, names, r=r, alpha=alpha, dropout=dropout)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight, ``W <- W + (alpha / r) * B A`` (Hu et al. 2021, §4.1:
    "no additional inference latency"), and put the plain ``nn.Linear`` back. In place; returns ``model``.

    The product is formed in float32 and the sum rounded once to ``W``'s dtype, so the merged model's
    outputs equal the unmerged ones up to that rounding. Afterwards ``state_dict()`` has the canonical
    keys again (what ``lvlm.save_lvlm`` writes). Parameters keep the ``requires_grad`` they had (all
    frozen after ``apply_lora``).
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("merge_lora: the model has no LoRA modules")
    for name, m in modules.items():
        w = m.base_layer.weight  # [out, in]
        delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling  # [out, r] @ [r, in]
        w.copy_((w.float() + delta).to(w.dtype))
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, m.base_layer)
    return model


def _is_adapter_key(key: str) -> bool:
    return key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of ``model.state_dict()``: ``<module>.lora_A.weight`` [r, in] and
    ``<module>.lora_B.weight`` [out, r] for every wrapped module."""
    return {k: v for k, v in model.state_dict().items() if _is_adapter_key(k)}


# ---------------------------------------------------------------------------------------------
# the PEFT file layout
# ---------------------------------------------------------------------------------------------


def _lora_settings(modules: dict[str, LoRALinear]) -> tuple[int, float, float]:
    """The (r, alpha, dropout) all wrapped modules share; ValueError when they differ."""
    settings = {(m.r, m.alpha, m.dropout) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"save_lora: the LoRA modules use different (r, alpha, dropout): {sorted(settings)}; "
                         "the PEFT config holds one setting")
    return settings.pop()


def _target_regex(names) -> str:
    """A regex for PEFT's ``target_modules`` that matches exactly the language-model modules we wrapped.

    PEFT reads a string ``target_modules`` as a regex that must match a whole module path. A plain list
    such as ``["q_proj", ...]`` would also match the CLIP tower's ``q_proj/k_proj/v_proj`` of a Hugging
    Face LLaVA and give them fresh (zero, so harmless, but spurious) adapters; this regex does not.
    """
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    scope = ".*language_model\\." if all(n.startswith("language_model.") for n in names) else ""
    return f"{scope}.*\\.({'|'.join(leaves)})" if scope else f"(.*\\.)?({'|'.join(leaves)})"


def save_lora(model: nn.Module, directory: str | Path, *, r: int | None = None, alpha: float | None = None,
              dropout: float | None = None, targets=None, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters in the PEFT layout: ``adapter_model.safetensors`` and ``adapter_config.json``.

    Keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, ``<module>`` being our
    canonical path (= the classic HF LLaVA path, see the module docstring). r, alpha and dropout are read
    from the modules; when given they must agree (a guard against saving with the wrong config).
    ``target_modules`` is written as a regex (see ``_target_regex``) unless ``targets`` is given, in which
    case that list is written. Files are written to temporary names and renamed. Returns the directory.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_lora: the model has no LoRA modules")
    found = dict(zip(("r", "alpha", "dropout"), _lora_settings(modules)))
    for key, given in (("r", r), ("alpha", alpha), ("dropout", dropout)):
        if given is not None and given != found[key]:
            raise ValueError(f"save_lora: {key}={given!r} was passed but the model's LoRA modules have "
                             f"{key}={found[key]!r}")
    tensors = {}
    for name, m in modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().to("cpu").contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().to("cpu").contiguous()
    config = {  # field names and meanings of PEFT's LoraConfig
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": found["r"],
        "lora_alpha": found["alpha"],
        "lora_dropout": found["dropout"],
        "target_modules": list(targets) if targets is not None else _target_regex(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / (ADAPTER_WEIGHTS + ".tmp")), metadata={"format": "pt"})
    os.replace(directory / (ADAPTER_WEIGHTS + ".tmp"), directory / ADAPTER_WEIGHTS)
    (directory / (ADAPTER_CONFIG + ".tmp")).write_text(json.dumps(config, indent=2) + "\n")
    os.replace(directory / (ADAPTER_CONFIG + ".tmp"), directory / ADAPTER_CONFIG)
    return directory


# Module-path spellings of newer Hugging Face LLaVA classes -> ours (ANCHORS §5).
_HF_PATH_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head", "language_model.lm_head"),
)


def _parse_adapter_key(key: str, where: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A[.default].weight`` -> (``<module>``, ``"lora_A"``)."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    if parts[-1] != "weight":
        raise ValueError(f"{where}: unsupported key {key!r} (expected '<module>.lora_A.weight' or "
                         "'<module>.lora_B.weight', optionally with an adapter name before 'weight')")
    parts = parts[:-1]
    if parts and parts[-1] not in ("lora_A", "lora_B"):
        parts = parts[:-1]  # the adapter name PEFT uses in memory, e.g. "default"
    if len(parts) < 2 or parts[-1] not in ("lora_A", "lora_B"):
        raise ValueError(f"{where}: unsupported key {key!r} (only LoRA A/B matrices are read)")
    return ".".join(parts[:-1]), parts[-1]


def _our_module_path(path: str, names: set[str]) -> str:
    """``path`` as a module path of our model (``names``): newer HF spellings are renamed."""
    if path in names:
        return path
    for theirs, ours in _HF_PATH_RENAMES:
        if path.startswith(theirs) and ours + path[len(theirs):] in names:
            return ours + path[len(theirs):]
    return path  # reported as missing by the caller


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """Read adapters written in the PEFT layout (by ``save_lora`` or by PEFT) into ``model``. In place.

    If the model has no LoRA modules yet, exactly the modules named in the file are wrapped with the
    file's r / lora_alpha / lora_dropout (and everything else frozen); if it has, they must be the same
    modules. Keys may carry PEFT's in-memory adapter name (``lora_A.default.weight``) and the newer HF
    LLaVA module paths. Unsupported PEFT features (DoRA, rsLoRA, per-module rank/alpha patterns, biases,
    fan-in-fan-out) raise ``ValueError``.
    """
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_lora: no {p.name} in {directory}")
    config = json.loads(config_path.read_text())
    where = f"load_lora({directory})"
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type is {config['peft_type']!r}; only 'LORA' is supported")
    unsupported = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                   "rank_pattern": {}, "alpha_pattern": {}}
    for field, supported in unsupported.items():
        if config.get(field) not in (None, supported):
            raise ValueError(f"{where}: {ADAPTER_CONFIG} has {field} = {config[field]!r}; only {supported!r} "
                             "is supported")
    r, alpha, dropout = int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0))

    weights: dict[str, dict[str, torch.Tensor]] = {}  # module path -> {"lora_A": A, "lora_B": B}
    names = {name for name, _ in model.named_modules()}
    for key, tensor in load_file(str(weights_path)).items():
        path, which = _parse_adapter_key(key, where)
        weights.setdefault(_our_module_path(path, names), {})[which] = tensor
    for path, pair in weights.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{where}: module {path} has only {sorted(pair)} in {ADAPTER_WEIGHTS}")

    if not lora_modules(model):
        known = dict(model.named_modules())
        missing = sorted(p for p in weights if not isinstance(known.get(p), nn.Linear))
        if missing:
            raise ValueError(f"{where}: {len(missing)} adapter modules are not nn.Linear modules of the model, "
                             f"e.g. {missing[:3]}")
        _wrap_modules(model, sorted(weights), r=r, alpha=alpha, dropout=dropout)
    modules = lora_modules(model)
    clash = sorted(p for p, m in modules.items() if (m.r, m.alpha) != (r, alpha))
    if clash:
        m = modules[clash[0]]
        raise ValueError(f"{where}: the file has r={r}, lora_alpha={alpha} but the model's LoRA module {clash[0]} "
                         f"has r={m.r}, alpha={m.alpha}")
    if set(modules) != set(weights):
        only_model, only_file = sorted(set(modules) - set(weights)), sorted(set(weights) - set(modules))
        raise ValueError(f"{where}: the file's adapters and the model's LoRA modules differ: only in the model "
                         f"{only_model[:3]} ({len(only_model)}), only in the file {only_file[:3]} ({len(only_file)})")
    with torch.no_grad():
        for path, m in modules.items():
            for which in ("lora_A", "lora_B"):
                param, tensor = getattr(m, which).weight, weights[path][which]
                if param.shape != tensor.shape:
                    raise ValueError(f"{where}: {path}.{which}.weight has shape {tuple(tensor.shape)} in the file, "
                                     f"the model expects {tuple(param.shape)} (r={m.r})")
                param.copy_(tensor)
    return model
