"""Reading a saved model folder safely: confined file reads, an explicit ``config.json`` schema, checked weights.

Every file is read through :func:`confined`: it must lie inside the model folder (for a Hub snapshot: inside the
repo's cache folder, whose snapshot files link into ``blobs/``), so a symlink that points elsewhere is refused.
``config.json`` is read through :data:`MODEL_SCHEMA` (known keys with types); a key it does not know, a ``_target_``,
a backbone that is not a plain registered timm / open_clip name, or a backbone argument off the allow-list
(:data:`modalities.image.BACKBONE_KWARGS`) raises :class:`UnsafeModelError` naming the key and the file. Weights are
safetensors; a pickle weights file is read only with ``allow_pickle=True`` and then only by
``torch.load(weights_only=True)``. Every tensor must match the architecture's name, shape and dtype (fp16 / bf16
are upcast to fp32); anything corrupt raises :class:`ModelFolderError` naming the file and what is wrong.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from modalities.base import (get_modality, is_bool, is_ident, is_int, is_nonneg, is_num, is_pos, is_str, list_modalities,
                             list_of, optional, upto)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
META_KEYS = ("mmzoo_version", "format", "tasks", "image_codes", "renderer")
#: the largest config / tokenizer JSON read (a 50k-token tokenizer.json is a few MB)
MAX_JSON_BYTES = 256 * 2**20
#: dtypes a float32 weight may be stored in and is deliberately upcast from
UPCAST_FROM = (torch.float16, torch.bfloat16)


class ModelFolderError(ValueError):
    """A model folder, or a file in it, is corrupt or invalid; the message names the file and what is wrong."""


class UnsafeModelError(ModelFolderError):
    """A model folder asks for something loading refuses to do (pickle, ``_target_``, a file outside the folder,
    a Hub or local-dir backbone, an unknown key, ...); the message names the file and the key."""


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def model_root(folder: Path) -> Path:
    """The folder loading may read in: ``folder`` itself (resolved), or for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<commit>``) that repo's cache folder, since snapshot files link into ``blobs/``."""
    real = Path(folder).resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def confined(root: Path, path: Path, kind: str = "file") -> Path:
    """``path`` resolved (symlinks followed), after checking that it stays inside ``root`` (already resolved)
    and is a ``kind`` (``"file"`` or ``"dir"``); raises ``FileNotFoundError`` when it does not exist."""
    real = path.resolve()
    if real != root and root not in real.parents:
        raise UnsafeModelError(f"{path}: points to {real}, outside the model folder {root}; loading reads nothing "
                               "outside the model folder (replace the link by the file itself)")
    if not real.exists():
        raise FileNotFoundError(f"{path}: missing")
    if kind == "file" and not real.is_file():
        raise ModelFolderError(f"{path}: expected a file")
    if kind == "dir" and not real.is_dir():
        raise ModelFolderError(f"{path}: expected a folder")
    return real


def read_limited(root: Path, path: Path, limit: int | None = None) -> bytes:
    """The bytes of ``path`` (confined to ``root``), refusing files larger than ``limit`` (:data:`MAX_JSON_BYTES`)."""
    real = confined(root, path)
    limit = MAX_JSON_BYTES if limit is None else limit
    size = real.stat().st_size
    if size > limit:
        raise ModelFolderError(f"{path}: {size} bytes, more than the {limit} a model's JSON file may have")
    return real.read_bytes()


def read_json_object(root: Path, path: Path) -> dict[str, Any]:
    """A UTF-8 JSON object from ``path`` (confined to ``root``); every way it can be broken names the file."""
    data = read_limited(root, path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{path}: not UTF-8 text ({e}); a config is a UTF-8 JSON object") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}: invalid JSON: {e}") from None
    except RecursionError:
        raise ModelFolderError(f"{path}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got a JSON {type(obj).__name__}")
    return obj


def _safetensors_header(path: Path, real: Path) -> None:
    """Check the safetensors framing of ``real`` (header length, JSON header, data extent) with clear errors."""
    size = real.stat().st_size
    fix = "the file is truncated or not a safetensors file; re-download or re-export the model"
    with open(real, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFolderError(f"{path}: not a valid safetensors file ({size} bytes, shorter than its 8-byte "
                                   f"header length); {fix}")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ModelFolderError(f"{path}: not a valid safetensors file: its header length says {n} bytes but the "
                                   f"file has {size}; {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: not a valid safetensors file: its header is not UTF-8 JSON ({e}); {fix}") \
            from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path}: not a valid safetensors file: its header is not a JSON object; {fix}")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelFolderError(f"{path}: not a valid safetensors file: tensor {name!r} has no data offsets; {fix}")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise ModelFolderError(f"{path}: truncated: its tensors need {8 + n + end} bytes but the file has {size}; "
                               "re-download or re-export the model")


def read_safetensors(root: Path, path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (confined to ``root``), on the CPU."""
    real = confined(root, path)
    _safetensors_header(path, real)
    from safetensors.torch import load_file

    try:
        return load_file(str(real))
    except Exception as e:  # noqa: BLE001 — safetensors raises its own error types
        raise ModelFolderError(f"{path}: not a valid safetensors file ({type(e).__name__}: {e}); re-download or "
                               "re-export the model") from None


def read_pickle_weights(root: Path, path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a pickle weights file, read only by ``torch.load(weights_only=True)`` (never fully
    unpickled: a file that needs more is refused)."""
    real = confined(root, path)
    try:
        state = torch.load(real, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — the restricted unpickler refuses anything but tensors and containers
        raise UnsafeModelError(f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
                               f"{str(e)[:200]}); mmzoo never unpickles further (a pickle can run code). Convert "
                               "the weights to safetensors with the code that wrote them") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ModelFolderError(f"{path}: expected a state dict of named tensors, got {type(state).__name__}")
    return state


def pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)


def read_weights(root: Path, folder: Path, st_name: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    """``(state, file)``: ``folder / st_name`` (safetensors), else one pickle weights file if ``allow_pickle``."""
    st = folder / st_name
    if st.exists() or st.is_symlink():
        return read_safetensors(root, st), st
    pickles = pickle_files(folder)
    if not pickles:
        raise FileNotFoundError(f"{folder}: no {st_name} (files: {sorted(p.name for p in folder.iterdir())})")
    if not allow_pickle:
        raise UnsafeModelError(
            f"{pickles[0]}: refusing to load a pickle weights file (pickle can run arbitrary code). mmzoo loads "
            f"only {st_name}; if you trust this file, pass allow_pickle=True (read with torch.load(weights_only="
            "True), tensors only), or convert it to safetensors")
    if len(pickles) > 1:
        raise ModelFolderError(f"{folder}: several pickle weight files {[p.name for p in pickles]}; keep one")
    return read_pickle_weights(root, pickles[0]), pickles[0]


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path | str,
                config: str = CONFIG_FILE) -> dict[str, torch.Tensor]:
    """``state`` checked against the model's own ``expected`` state dict: same names, shapes and dtypes (fp16 /
    bf16 deliberately upcast to fp32). Raises :class:`ModelFolderError` naming the tensor and ``file``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelFolderError(f"{file}: its tensors do not match the architecture in {config}: missing "
                               f"{missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    out = {}
    for name, want in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ModelFolderError(f"{file}: tensor {name!r} has shape {list(got.shape)} but the architecture in "
                                   f"{config} needs {list(want.shape)}")
        if got.dtype != want.dtype:
            if not (want.dtype == torch.float32 and got.dtype in UPCAST_FROM):
                raise ModelFolderError(f"{file}: tensor {name!r} is {got.dtype} but the model needs {want.dtype} "
                                       f"(only float16 / bfloat16 are upcast to float32)")
            got = got.float()
        out[name] = got
    return out


# ------------------------------------------------------------------------------------------------
# The config.json schema
# ------------------------------------------------------------------------------------------------
Check = Callable[[Any], bool]
# the value checks live with the modality protocol (modalities may not import zoo)
_int, _nonneg, _pos, _upto, _num = is_int, is_nonneg, is_pos, upto, is_num
_str, _bool, _optional, _list_of, _ident = is_str, is_bool, optional, list_of, is_ident


#: ``config.json``: every key a saved model may have, with the values it accepts
#: (sizes are bounded far above any real model, so a config cannot make building it loop for hours)
MODEL_SCHEMA: dict[str, Check] = {
    "arch": _ident, "d_model": _upto(2**16), "n_heads": _upto(2**10), "enc_layers": _upto(2**10, 0),
    "dec_layers": _upto(2**10, 0), "ffn_dim": _upto(2**20), "activation": _str, "dropout": _num, "attn_dropout": _num,
    "max_positions": _upto(2**20), "dec_grid": _optional(_list_of(_pos, 2)), "norm_eps": _num, "attn_impl": _str,
    "grad_checkpointing": _bool, "ffn": _str, "num_experts": _upto(2**12), "moe_top_k": _pos,
    "moe_capacity_factor": _num, "moe_aux_weight": _num, "attention": _str, "lfa_kernel": _upto(2**10),
    # layer form (BART / Florence-2)
    "norm_first": _bool, "embed_norm": _bool, "embed_scale": _bool, "pos_offset": _upto(2**10, 0),
    "enc_positions": _str, "type_embed": _bool, "logits_bias": _bool,
    "vocab": lambda v: isinstance(v, dict),
    "modalities": lambda v: isinstance(v, dict),
    "type_index": _optional(lambda v: isinstance(v, dict) and all(_ident(k) and _upto(2**10, 0)(i) for k, i in v.items())),
    # metadata
    "mmzoo_version": _str, "format": _pos, "tasks": lambda v: isinstance(v, (dict, list)),
    "image_codes": lambda v: v is None or isinstance(v, dict),
    "renderer": lambda v: v is None or isinstance(v, dict),  # checked by zoo.layout_generation.check_entry
}
VOCAB_SCHEMA: dict[str, Check] = {
    "text_size": _nonneg, "image_code_size": _nonneg, "loc_bins": _nonneg, "num_specials": _nonneg,
    "ranges": lambda v: isinstance(v, dict) and all(_ident(k) and _list_of(_nonneg, 2)(r) for k, r in v.items()),
}


def modality_schemas() -> dict[str, dict[str, Check]]:
    """Per configurable modality (the registry's encoder inputs): its saved config's keys and value checks,
    derived from the modality's config dataclass (:meth:`modalities.base.Modality.schema`)."""
    return {m: get_modality(m).schema() for m in list_modalities() if get_modality(m).is_input}


class _RegistrySchemas(Mapping):
    """:func:`modality_schemas` as a read-only mapping, read from the registry on each access."""

    def __getitem__(self, name: str) -> dict[str, Check]:
        return modality_schemas()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(modality_schemas())

    def __len__(self) -> int:
        return len(modality_schemas())


#: per modality: its saved config fields and value checks (from the modality registry)
MODALITY_SCHEMAS: Mapping[str, dict[str, Check]] = _RegistrySchemas()


#: a task's saved inference settings (``tasks.<name>.<key>``)
TASK_SCHEMA: dict[str, Check] = {
    "max_new_tokens": _pos, "num_beams": _pos, "length_penalty": _num, "decoding": _ident,
    "guidance_scale": _num, "do_sample": _bool, "temperature": _num, "top_k": _nonneg, "top_p": _num,
    "use_cache": _bool, "seed": _int, "candidates": _list_of(_str), "location_chain": _bool,
}
IMAGE_CODES_SCHEMA: dict[str, Check] = {
    "folder": _str, "format": lambda v: v == "diffusers.VQModel", "num_codes": _pos, "grid": _list_of(_pos, 2),
    "image_size": _pos,
}
#: ``image_codes/config.json`` (a diffusers ``VQModel`` config): keys beside ``VQModel.__init__``'s arguments
VQ_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "mmzoo_local_encoder")


def refuse_targets(obj: Any, where: str, path: str = "") -> None:
    """Raise :class:`UnsafeModelError` if any mapping in ``obj`` has a ``_target_`` key."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{path}.{k}" if path else str(k)
            if k == "_target_":
                raise UnsafeModelError(
                    f"{where}: key {here!r} = {v!r} asks to instantiate an import path; mmzoo never instantiates "
                    "code from a loaded config (architectures resolve only through the registry)")
            refuse_targets(v, where, here)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            refuse_targets(v, where, f"{path}[{i}]")


def check_keys(d: dict[str, Any], schema: dict[str, Check], where: str, prefix: str = "") -> None:
    """Unknown keys → :class:`UnsafeModelError`; known keys with a wrong value → :class:`ModelFolderError`."""
    for key, value in d.items():
        name = f"{prefix}{key}"
        if key not in schema:
            raise UnsafeModelError(f"{where}: unknown key {name!r}; loading reads only known keys (known here: "
                                   f"{', '.join(sorted(schema))})")
        if not schema[key](value):
            raise ModelFolderError(f"{where}: key {name!r} has an invalid value {value!r:.200}")


def check_model_config(d: dict[str, Any], where: str) -> dict[str, Any]:
    """``config.json`` (or a checkpoint's model config) checked against :data:`MODEL_SCHEMA`; returns the
    ``ModelConfig`` fields with modality ``pretrained`` entries dropped (weights come from the folder)."""
    from zoo.registry import list_models

    refuse_targets(d, where)
    check_keys(d, MODEL_SCHEMA, where)
    arch = d.get("arch", "custom")
    if arch != "custom" and arch not in list_models():
        raise UnsafeModelError(f"{where}: architecture {arch!r} is not registered in this mmzoo "
                               f"(known: {', '.join(list_models())}, or 'custom'); upgrade mmzoo or re-export")
    check_keys(d.get("vocab") or {}, VOCAB_SCHEMA, where, "vocab.")
    mods = {}
    schemas = modality_schemas()
    for name, mcfg in (d.get("modalities") or {}).items():
        if name not in schemas:
            raise UnsafeModelError(f"{where}: unknown modality 'modalities.{name}' (known: "
                                   f"{', '.join(sorted(schemas))})")
        if not isinstance(mcfg, dict):
            raise ModelFolderError(f"{where}: 'modalities.{name}' must be an object, got {type(mcfg).__name__}")
        check_keys(mcfg, schemas[name], where, f"modalities.{name}.")
        mcfg = dict(mcfg)
        extra = get_modality(name).check
        if extra is not None:
            try:
                extra(mcfg)
            except ValueError as e:
                raise UnsafeModelError(f"{where}: modalities.{name}.{e}; refused: a saved model names only registered "
                                       "backbones and architecture arguments, never files, URLs or Hub repos") from None
        if "pretrained" in mcfg:
            mcfg["pretrained"] = None
        mods[name] = mcfg
    tasks = d.get("tasks") or {}
    for task, settings in (tasks.items() if isinstance(tasks, dict) else ((t, {}) for t in tasks)):
        if not _ident(task):
            raise ModelFolderError(f"{where}: task name {task!r} is not a plain name")
        if not isinstance(settings, dict):
            raise ModelFolderError(f"{where}: 'tasks.{task}' must be an object, got {type(settings).__name__}")
        check_keys(settings, TASK_SCHEMA, where, f"tasks.{task}.")
    if d.get("image_codes") is not None:
        check_keys(d["image_codes"], IMAGE_CODES_SCHEMA, where, "image_codes.")
    out = {k: v for k, v in d.items() if k not in META_KEYS}
    out["modalities"] = mods
    return out


def model_config_from_dict(d: dict[str, Any], where: str = CONFIG_FILE) -> Any:
    """A ``ModelConfig`` from a loaded ``config.json`` through :func:`check_model_config`."""
    from zoo.config import ModelConfig

    if not isinstance(d, dict):
        raise ModelFolderError(f"{where}: expected a JSON object, got {type(d).__name__}")
    try:
        fields = check_model_config(d, where)
    except RecursionError:
        raise ModelFolderError(f"{where}: nested too deeply") from None
    try:
        cfg = ModelConfig.from_dict(fields)
        cfg.layout  # noqa: B018 — the vocabulary sizes must agree with its recorded ranges
        return cfg
    except (TypeError, ValueError, KeyError) as e:
        raise ModelFolderError(f"{where}: not a valid mmzoo model config: {e}") from None


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------
def load_text_tokenizer(root: Path, folder: Path) -> Any:
    """The text tokenizer from ``folder / tokenizer.json`` (a ``tokenizers`` JSON: data, no code)."""
    from modalities.text import TextTokenizer

    path = folder / TOKENIZER_FILE
    data = read_limited(root, path)
    try:
        return TextTokenizer.from_str(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{path}: not UTF-8 text ({e})") from None
    except Exception as e:  # noqa: BLE001 — tokenizers raises bare Exceptions
        raise ModelFolderError(f"{path}: not a valid tokenizer.json ({type(e).__name__}: {str(e)[:200]})") from None


def load_image_codes(root: Path, folder: Path, entry: dict[str, Any], allow_pickle: bool = False,
                     where: str = CONFIG_FILE) -> Any:
    """The VQ image-code tokenizer in ``folder / entry["folder"]`` (``modalities.image_codes``): a plain subfolder
    of the model folder holding a diffusers ``VQModel`` config (checked key by key) and safetensors weights (a
    pickle only with ``allow_pickle``, read with ``weights_only=True``). It must match ``entry``."""
    import inspect

    from modalities.image_codes import (CONFIG_FILE as VQ_CONFIG, WEIGHTS_FILE as VQ_WEIGHTS, ImageCodeTokenizer,
                                        vqmodel_from_config)

    sub = entry.get("folder") if isinstance(entry, dict) else None
    if not isinstance(sub, str) or sub in ("", ".", "..") or Path(sub).name != sub or "\\" in sub:
        raise UnsafeModelError(f"{where}: image_codes.folder must name a subfolder of the model folder, got {sub!r}")
    vq_dir = folder / sub
    if not vq_dir.exists() and not vq_dir.is_symlink():
        raise FileNotFoundError(f"{vq_dir}: config.json names the image-code tokenizer folder {sub!r}, but it is "
                                "missing; re-export the model (zoo-export) or copy the VQ tokenizer folder there")
    confined(root, vq_dir, "dir")
    cfg_path = vq_dir / VQ_CONFIG
    if not cfg_path.exists() and not cfg_path.is_symlink():
        raise FileNotFoundError(f"{vq_dir}: config.json names the image-code tokenizer folder {sub!r}, but it has no "
                                f"{VQ_CONFIG}; re-export the model (zoo-export) or copy the VQ tokenizer folder there")
    vq_cfg = read_json_object(root, cfg_path)
    refuse_targets(vq_cfg, str(cfg_path))
    if vq_cfg.get("_class_name") != "VQModel":
        raise ModelFolderError(f"{cfg_path}: describes {vq_cfg.get('_class_name')!r}, not a VQModel")
    from diffusers import VQModel

    params = set(inspect.signature(VQModel.__init__).parameters) - {"self"}
    scalar = lambda v: v is None or isinstance(v, (bool, int, float, str))  # noqa: E731
    check_keys(vq_cfg, {**{k: lambda v: scalar(v) or _list_of(scalar)(v) for k in params},
                        **{k: scalar for k in VQ_META_KEYS}}, str(cfg_path))
    try:
        vq = vqmodel_from_config(vq_cfg)
    except Exception as e:  # noqa: BLE001 — diffusers raises assorted errors on a bad config
        raise ModelFolderError(f"{cfg_path}: not a valid VQModel config ({type(e).__name__}: {e})") from None
    state, file = read_weights(root, vq_dir, VQ_WEIGHTS, allow_pickle)
    vq.load_state_dict(check_state(state, vq.state_dict(), file, str(cfg_path)))
    tok = ImageCodeTokenizer(vq.eval())
    found = {"num_codes": tok.num_codes, "grid": list(tok.grid), "image_size": tok.image_size}
    for key, value in found.items():
        if key in entry and entry[key] != value:
            raise ModelFolderError(f"{where}: image_codes.{key} is {entry[key]!r} but the tokenizer in {vq_dir} has "
                                   f"{value!r}; the folder was altered or mixed with another model's")
    return tok
