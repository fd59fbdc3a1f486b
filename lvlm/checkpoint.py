"""Hugging Face checkpoints in and out: ``load_lvlm`` / ``save_lvlm`` (LLaVA) and ``load_clip`` / ``save_clip``.

A checkpoint is a directory (ANCHORS §5):

    config.json                              the model config (``lvlm.config`` reads and writes it)
    model.safetensors                        all weights in one file, or, when large,
    model-00001-of-00003.safetensors ...     shards, with
    model.safetensors.index.json             {"metadata": {"total_size": bytes}, "weight_map": {key: file}}
    tokenizer.json, ...                      optional; never read or written here (see ``copy_tokenizer``)

Our module tree is built so that its ``state_dict`` keys *are* the classic Hugging Face keys
(``language_model.model.layers.0.self_attn.q_proj.weight``, ``vision_tower.vision_model.*``, ...).
Files written by other transformers versions spell some prefixes differently; ``canonical_llava_key``
maps each known spelling onto ours before anything is compared.

Loading, step by step (``_load_weights``):

1. build the model on the ``meta`` device: every parameter has a shape and no storage, so a 7B model
   costs nothing before its weights are read;
2. read the safetensors *headers* of every file (``read_safetensors_header``): key -> dtype, shape and
   byte range; check the keys and shapes against the model's, strictly, and report every problem at once;
3. for each parameter, allocate its final tensor (requested dtype, device) and read its bytes straight
   from the file into it (``_read_tensor``). Host memory peaks at about one copy of the weights (plus one
   tensor while casting), because nothing is memory-mapped and no random initial copy ever exists.

Saving writes under temporary names and renames into place, index last, so an interrupted save never
leaves a checkpoint that looks complete (``_commit``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

from .clip import CLIPModel
from .config import CLIPConfig, LlavaConfig, read_config
from .llava import LlavaForConditionalGeneration

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_FILE, TORCH_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"  # read-only fallback
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "processor_config.json")

# Keys some writers store that are not weights: the position-id buffer of older CLIP files and the
# rotary inverse frequencies of older Llama files (we recompute both). They are skipped silently.
HARMLESS_SUFFIXES = (".position_ids", ".rotary_emb.inv_freq")

# How other transformers versions spell LLaVA keys, rewritten onto the classic spelling in this order.
# - transformers 4.52-4.5x keep `model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`
#   and `lm_head.*` in memory (their `_checkpoint_conversion_mapping`); some files on the Hub were saved so.
# - transformers 5.x hold the vision tower without its inner `vision_model.` and `save_pretrained` writes
#   `vision_tower.embeddings.*`, `vision_tower.encoder.layers.N.*`, `vision_tower.pre_layrnorm.*` (checked on
#   5.23: the language model keys are written in the classic spelling there).
LLAVA_KEY_RENAMES = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class StoredTensor(NamedTuple):
    """Where one tensor lives: its file, its key there, shape, dtype and byte range (safetensors only)."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int = 0  # absolute byte offsets in the file
    end: int = 0


# ---------------------------------------------------------------------------------------------
# Reading files: the safetensors header, the list of files of a checkpoint, one tensor's bytes.
# ---------------------------------------------------------------------------------------------

def read_safetensors_header(file: Path) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file, without reading the tensors.

    The format (huggingface/safetensors): 8 bytes little-endian header length N, N bytes of JSON
    ``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data;
    offsets count from the end of the header; data is little-endian, as is every host this runs on.
    A file cut short or a header that does not add up raises ``ValueError`` naming the file.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: not a safetensors file (only {size} bytes; truncated?)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"{file}: corrupt or truncated safetensors file (header says {n} bytes of JSON, "
                             f"the file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{file}: unreadable header entry for {key!r}: {entry!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize:
            raise ValueError(f"{file}: tensor {key!r} of shape {list(shape)} {entry['dtype']} should take "
                             f"{numel * dtype.itemsize} bytes, the header gives {end - begin}")
        if data_start + end > size:
            raise ValueError(f"{file}: truncated — tensor {key!r} ends at byte {data_start + end} "
                             f"but the file has {size} bytes")
        tensors[key] = StoredTensor(file, key, shape, dtype, data_start + begin, data_start + end)
    return tensors


def _read_torch_file(file: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` (older Hub repositories, e.g. OpenAI's CLIP ones), memory-mapped, no pickled code."""
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several kinds for a bad zip / pickle
        raise ValueError(f"{file}: unreadable PyTorch weights file ({type(e).__name__}: {e})") from None


def _files_from_index(index: Path) -> dict[Path, list[str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a valid index file (need a 'weight_map' object; {e!r})") from None
    files: dict[Path, list[str]] = {}
    for key, name in weight_map.items():
        files.setdefault(index.parent / name, []).append(key)
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{index} names the shard {file.name}, which does not exist in {index.parent}")
    return files


def read_checkpoint_tensors(directory: str | Path) -> dict[str, StoredTensor]:
    """All tensors of a checkpoint directory, by their key as stored (no renaming), from the headers only.

    Looks for, in order: ``model.safetensors.index.json`` (sharded), ``model.safetensors``, and the
    same two for ``pytorch_model.bin`` (read-only fallback). Shards without their index are refused: that
    is what an interrupted save leaves behind.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if (directory / INDEX_FILE).is_file() or (directory / TORCH_INDEX_FILE).is_file():
        index = directory / (INDEX_FILE if (directory / INDEX_FILE).is_file() else TORCH_INDEX_FILE)
        files = _files_from_index(index)  # file -> the keys the index puts there
    elif (directory / SINGLE_FILE).is_file():
        files = {directory / SINGLE_FILE: None}
    elif (directory / TORCH_FILE).is_file():
        files = {directory / TORCH_FILE: None}
    else:
        found = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
        hint = (f"; found {', '.join(found)} but no {INDEX_FILE} (an interrupted save?)" if found else "")
        raise FileNotFoundError(f"no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")

    tensors: dict[str, StoredTensor] = {}
    for file, keys in files.items():
        if file.suffix == ".bin":
            found = {k: StoredTensor(file, k, tuple(t.shape), t.dtype) for k, t in _read_torch_file(file).items()}
        else:
            found = read_safetensors_header(file)
        for key in keys or ():
            if key not in found:
                raise ValueError(f"the index of {directory} puts {key!r} in {file.name}, which does not hold it")
        for key, stored in found.items():
            if key in tensors:
                raise ValueError(f"{key!r} is stored twice: in {tensors[key].file.name} and {file.name}")
            tensors[key] = stored
    return tensors


def _read_tensor(stored: StoredTensor, raw, out: torch.Tensor) -> None:
    """Copy the bytes of ``stored`` from the open file ``raw`` into ``out`` (CPU, contiguous, stored dtype)."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy())  # the tensor's own memory, as bytes
    raw.seek(stored.begin)
    while len(view):  # a single read returns at most ~2 GB on Linux
        got = raw.readinto(view)
        if not got:
            raise ValueError(f"{stored.file}: truncated while reading {stored.key!r}")
        view = view[got:]


# ---------------------------------------------------------------------------------------------
# Matching files to a model, then materialising the meta model from the files.
# ---------------------------------------------------------------------------------------------

def canonical_llava_key(key: str) -> str:
    """The classic Hugging Face spelling of a LLaVA key written by any transformers version (see
    ``LLAVA_KEY_RENAMES``), e.g. ``model.vision_tower.encoder.layers.0.mlp.fc1.weight`` ->
    ``vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight``.
    """
    for pattern, replacement in LLAVA_KEY_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _rename(stored: dict[str, StoredTensor], rename) -> dict[str, StoredTensor]:
    out: dict[str, StoredTensor] = {}
    for key, s in stored.items():
        if key.endswith(HARMLESS_SUFFIXES):
            continue
        new = rename(key)
        if new in out:
            raise ValueError(f"two stored keys mean the same weight {new!r}: {out[new].key!r} in "
                             f"{out[new].file.name} and {key!r} in {s.file.name}")
        out[new] = s
    return out


def _fmt(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _check_keys(where: Path, expected: dict[str, torch.Tensor], groups: list[list[str]],
                stored: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """Match the model's tensors to the stored ones; raise ONE ValueError listing every missing, unexpected
    and wrongly shaped key. ``groups`` lists names that share one tensor (a tied ``lm_head``): any one of
    them in the files is enough. Returns group leader name -> the stored tensor to read.
    """
    missing, wrong_shape, plan = [], [], {}
    for names in groups:
        present = [n for n in names if n in stored]
        if not present:
            missing.append(f"  {names[0]}  expected {_fmt(expected[names[0]].shape)}")
            continue
        for n in present:
            if tuple(stored[n].shape) != tuple(expected[n].shape):
                wrong_shape.append(f"  {n}  expected {_fmt(expected[n].shape)}, found {_fmt(stored[n].shape)} "
                                   f"in {stored[n].file.name}")
        plan[names[0]] = stored[present[0]]
    unexpected = [f"  {s.key}  found {_fmt(s.shape)} in {s.file.name}" + (f" (read as {k})" if k != s.key else "")
                  for k, s in stored.items() if k not in expected]
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint {where} does not match the model built from its config.json:"]
        for title, items in (("missing (the model has them, the files do not)", missing),
                             ("unexpected (in the files, not in the model)", unexpected),
                             ("wrong shape", wrong_shape)):
            if items:
                lines += [f"{title}: {len(items)}"] + items
        if any(s.key.startswith("model.mm_projector") for s in stored.values()):
            lines.append("hint: this is the original LLaVA repository layout (liuhaotian/llava-*); "
                         "load the converted llava-hf checkpoint instead")
        raise ValueError("\n".join(lines))
    return plan


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16``, ``"bfloat16"`` or ``None`` -> a torch dtype or None."""
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name (e.g. 'bfloat16', 'float32')")
        return getattr(torch, dtype)
    return dtype


def _resolve_dtype(dtype, plan: dict[str, StoredTensor], config_dtype) -> torch.dtype:
    """The dtype floating tensors are loaded in. ``None`` means: the dtype they are stored in, when the files
    agree; for mixed files, the config's ``torch_dtype`` (``dtype`` in transformers 5.x); else float32.
    """
    dtype = _as_dtype(dtype)
    if dtype is not None:
        return dtype
    stored = {s.dtype for s in plan.values() if s.dtype.is_floating_point}
    if len(stored) == 1:
        return stored.pop()
    named = getattr(torch, config_dtype, None) if isinstance(config_dtype, str) else None
    return named if isinstance(named, torch.dtype) else torch.float32


def _tied_groups(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """``{name: tensor}`` of every parameter and persistent buffer (aliases included), and the names grouped
    by the tensor they share, in ``state_dict`` order (so the embedding comes before a tied ``lm_head``).
    """
    expected = model.state_dict(keep_vars=True)
    by_id: dict[int, list[str]] = {}
    for name, t in expected.items():
        by_id.setdefault(id(t), []).append(name)
    return expected, list(by_id.values())


def _set_group(model: nn.Module, names: list[str], value: torch.Tensor, expected: dict) -> None:
    """Put ``value`` in place of the meta parameter (or buffer) under every name of one tied group; all the
    names get the very same ``Parameter``, so a tied ``lm_head`` stays tied.
    """
    like = expected[names[0]]
    if isinstance(like, nn.Parameter):
        value = nn.Parameter(value, requires_grad=like.requires_grad)
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(value, nn.Parameter):
            setattr(owner, leaf, value)
        else:
            owner._buffers[leaf] = value


def _load_weights(model: nn.Module, directory: Path, rename, dtype, device, config_dtype) -> nn.Module:
    """Materialise the meta-device ``model`` from the checkpoint in ``directory`` (steps 2-3 of the module
    docstring). Every stored floating tensor becomes ``dtype`` (see ``_resolve_dtype``) on ``device``.
    """
    device = torch.device(device)
    expected, groups = _tied_groups(model)
    stored = _rename(read_checkpoint_tensors(directory), rename)
    plan = _check_keys(directory, expected, groups, stored)
    dtype = _resolve_dtype(dtype, plan, config_dtype)
    leaders = {names[0]: names for names in groups}

    def target_dtype(s: StoredTensor) -> torch.dtype:
        return dtype if s.dtype.is_floating_point else s.dtype

    def read_in_place(s: StoredTensor) -> bool:  # no cast, no move: read straight into the parameter
        return target_dtype(s) == s.dtype and device.type == "cpu"

    # One staging buffer, reused, for the tensors that are cast or moved: a fresh one per tensor would leave
    # the host allocator holding freed blocks next to the weights (measured: +20% peak when casting).
    staging = torch.empty(max((s.end - s.begin for s in plan.values() if not read_in_place(s)), default=0),
                          dtype=torch.uint8)
    by_file: dict[Path, list[str]] = {}
    for leader, s in plan.items():
        by_file.setdefault(s.file, []).append(leader)
    for file, leaders_here in by_file.items():
        leaders_here.sort(key=lambda n: plan[n].begin)  # read each file front to back
        if file.suffix == ".bin":  # pytorch_model.bin: copies out of the memory map
            bin_tensors = _read_torch_file(file)
            values = {n: bin_tensors[plan[n].key].to(device=device, dtype=target_dtype(plan[n]), copy=True)
                      for n in leaders_here}
            del bin_tensors
            for leader, value in values.items():
                _set_group(model, leaders[leader], value, expected)
            continue
        with open(file, "rb", buffering=0) as raw:
            for leader in leaders_here:
                s = plan[leader]
                if read_in_place(s):
                    value = torch.empty(s.shape, dtype=s.dtype)
                    _read_tensor(s, raw, value)
                else:
                    buffer = staging[: s.end - s.begin].view(s.dtype).view(s.shape)
                    _read_tensor(s, raw, buffer)
                    value = buffer.to(device=device, dtype=target_dtype(s))
                _set_group(model, leaders[leader], value, expected)
    del staging

    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"after loading {directory}, these tensors were never filled: {', '.join(still_meta)}")
    return model.eval()


def _config_dtype(directory: Path):
    try:
        d = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d.get("torch_dtype") or d.get("dtype")


# ---------------------------------------------------------------------------------------------
# Public: load
# ---------------------------------------------------------------------------------------------

def load_lvlm(path: str | Path, *, dtype: torch.dtype | str | None = None,
              device: str | torch.device = "cpu") -> LlavaForConditionalGeneration:
    """A ``LlavaForConditionalGeneration`` in eval mode from a Hugging Face LLaVA directory.

    ``dtype``: ``None`` keeps the dtype the weights are stored in (float16 for ``llava-hf/llava-1.5-7b-hf``;
    files mixing dtypes use the config's ``torch_dtype``, else float32); a ``torch.dtype`` or its name casts
    every floating tensor. ``device``: where the parameters are created. Every key spelling of
    ``LLAVA_KEY_RENAMES`` is accepted; a tied ``lm_head`` may be absent from the files. Raises ValueError
    for an unsupported config field, for missing / unexpected / mis-shaped keys (all listed at once) and
    for corrupt files; FileNotFoundError when config or weights are missing.
    """
    path = Path(path)
    config = read_config(path)
    if not isinstance(config, LlavaConfig):
        raise ValueError(f"{path}/config.json describes a {type(config).__name__}; use load_clip for CLIP")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return _load_weights(model, path, canonical_llava_key, dtype, device, _config_dtype(path))


def load_clip(path: str | Path, *, dtype: torch.dtype | str | None = None,
              device: str | torch.device = "cpu") -> CLIPModel:
    """A ``CLIPModel`` in eval mode from a Hugging Face ``CLIPModel`` directory (e.g.
    ``openai/clip-vit-large-patch14-336``); ``dtype`` and ``device`` as in ``load_lvlm``. Older files'
    ``*.position_ids`` buffers are ignored; ``pytorch_model.bin`` is read when no safetensors file exists.
    """
    path = Path(path)
    config = read_config(path)
    if not isinstance(config, CLIPConfig):
        raise ValueError(f"{path}/config.json describes a {type(config).__name__}; use load_lvlm for LLaVA")
    with torch.device("meta"):
        model = CLIPModel(config)
    return _load_weights(model, path, lambda k: k, dtype, device, _config_dtype(path))


# ---------------------------------------------------------------------------------------------
# Public: save
# ---------------------------------------------------------------------------------------------

def _plain_state_dict(model: nn.Module, cls: type, what: str) -> dict[str, torch.Tensor]:
    """The model's tensors by canonical key, each shared tensor once (first name wins, so a tied ``lm_head``
    is left out as transformers does). Refuses wrapped models: the keys must be exactly the class's own.
    """
    if not isinstance(model, cls):
        hint = ("; unwrap it first: model._orig_mod (torch.compile) or model.module (DDP/FSDP)"
                if hasattr(model, "_orig_mod") or hasattr(model, "module") else "")
        raise ValueError(f"{what} takes a plain {cls.__name__}, got {type(model).__name__}{hint}")
    with torch.device("meta"):
        reference = cls(model.config)
    expected = set(reference.state_dict())
    state = model.state_dict(keep_vars=True)
    extra = sorted(set(state) - expected)
    if extra:
        raise ValueError(f"{what}: the model has tensors the {cls.__name__} layout does not "
                         f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}); merge LoRA "
                         "(optim.merge_lora) or remove added modules before saving")
    out, seen = {}, set()
    for key, t in state.items():
        if id(t) not in seen:
            seen.add(id(t))
            out[key] = t
    return out


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split keys (in order) into shards of at most ``max_shard_bytes``; one larger tensor gets its own."""
    shards, current, used = [], [], 0
    for key, n in sizes.items():
        if current and used + n > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += n
    return shards + ([current] if current else [])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(directory: Path, written: dict[str, Path], marker: str) -> None:
    """Rename temporary files to their names. Old weight files and index go first, the file that makes
    the checkpoint look complete (``marker``: the index, or the single weights file) comes last.
    """
    for old in directory.glob("model-*-of-*.safetensors"):
        if old.name not in written:
            old.unlink()
    for name in (INDEX_FILE, SINGLE_FILE):
        if name != marker and name not in written and (directory / name).exists():
            (directory / name).unlink()
    (directory / marker).unlink(missing_ok=True)
    for name, tmp in written.items():
        if name != marker:
            os.replace(tmp, directory / name)
    os.replace(written[marker], directory / marker)


def _save(model: nn.Module, cls: type, what: str, path: str | Path, max_shard_bytes: int, dtype) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}: {path} exists and is not a directory")
    state = _plain_state_dict(model, cls, what)
    dtype = _as_dtype(dtype)

    def out_dtype(t):
        return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype

    sizes = {k: t.numel() * out_dtype(t).itemsize for k, t in state.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    path.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{uuid.uuid4().hex[:8]}"
    written: dict[str, Path] = {}
    try:
        for name, keys in zip(names, shards):
            # One shard at a time on the host: a copy only where a tensor is cast or lives on a GPU.
            tensors = {k: state[k].detach().to(device="cpu", dtype=out_dtype(state[k])).contiguous() for k in keys}
            written[name] = path / (name + tag)
            save_file(tensors, written[name], metadata={"format": "pt"})
            _fsync(written[name])
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {k: name for name, keys in zip(names, shards) for k in sorted(keys)}}
            written[INDEX_FILE] = path / (INDEX_FILE + tag)
            written[INDEX_FILE].write_text(json.dumps(index, indent=2) + "\n")
        config = model.config.to_hf()
        float_dtypes = {out_dtype(t) for t in state.values() if t.dtype.is_floating_point}
        if len(float_dtypes) == 1:
            config["torch_dtype"] = str(float_dtypes.pop()).removeprefix("torch.")
        written["config.json"] = path / ("config.json" + tag)
        written["config.json"].write_text(json.dumps(config, indent=2) + "\n")
        _commit(path, written, INDEX_FILE if len(shards) > 1 else SINGLE_FILE)
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
    return path


def save_lvlm(model: LlavaForConditionalGeneration, path: str | Path, *, max_shard_bytes: int = 5 * 2**30,
              dtype: torch.dtype | str | None = None) -> Path:
    """Write ``model`` as a Hugging Face LLaVA directory: ``config.json`` and ``model.safetensors``, or shards
    of at most ``max_shard_bytes`` plus ``model.safetensors.index.json``, in the classic key spelling that
    every transformers version reads. ``dtype`` casts floating tensors (default: as they are); config.json
    records it as ``torch_dtype``. Other files already in ``path`` (a tokenizer, say) are left alone; stale
    weight files of an earlier save there are removed. Takes a plain model: unwrap torch.compile / DDP and
    merge LoRA first. Load -> save -> load gives bit-identical tensors.
    """
    return _save(model, LlavaForConditionalGeneration, "save_lvlm", path, max_shard_bytes, dtype)


def save_clip(model: CLIPModel, path: str | Path, *, max_shard_bytes: int = 5 * 2**30,
              dtype: torch.dtype | str | None = None) -> Path:
    """Write ``model`` as a Hugging Face ``CLIPModel`` directory; the same rules as ``save_lvlm``."""
    return _save(model, CLIPModel, "save_clip", path, max_shard_bytes, dtype)


def copy_tokenizer(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the tokenizer / processor files that exist in ``src_dir`` (``TOKENIZER_FILES``) into ``dst_dir``,
    each under a temporary name first; returns the names copied. Weights and config are not touched.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            tmp = dst_dir / f"{name}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copyfile(src_dir / name, tmp)
            os.replace(tmp, dst_dir / name)
            copied.append(name)
    return copied
