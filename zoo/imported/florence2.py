"""Florence-2 (Microsoft, MIT licence) in mmzoo's own modules: loading, task prompts, generation, saving.

A Florence-2 folder is recognised from its ``config.json`` *as data* (``model_type == "florence2"`` plus the
vision config's shape tells the layout): transformers' native layout (``florence-community/*``) or Microsoft's
original one (``microsoft/Florence-2-*``). Nothing from the folder is imported or executed; there is no
``trust_remote_code``. Weights: ``model.safetensors`` (preferred) or ``pytorch_model.bin`` through
``torch.load(weights_only=True)`` only; every tensor goes through the layout's key table exactly once.

Vocabulary: BART's ids ``<s>=0, <pad>=1, </s>=2, <unk>=3`` swap rows 0 and 1 to become mmzoo's ``<pad>=0, <s>=1``;
every other id is unchanged (text range ``[4, V)``; the ``<loc_i>`` tokens are ordinary ids in it).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from zoo.config import ModelConfig
from zoo.generation_hf import HFGenerationConfig, hf_generate
from zoo.imported.florence2_keys import florence2_aliases, florence2_table
from zoo.imported.florence2_post import boxes_per_image, parse_ocr, parse_regions, parse_text, region_prompt
from zoo.imported.keymap import convert, expand
from zoo.loading import (Check, ModelFolderError, _bool, _list_of, _nonneg, _num, _optional, _str,
                         _upto, check_keys, check_state, model_config_from_dict, model_root, read_json_object,
                         read_limited, read_pickle_weights, read_safetensors, refuse_targets)
from zoo.pretrained import CONFIG_FILE, Pretrained, _as_list, _version

WEIGHTS_ST, WEIGHTS_BIN = "model.safetensors", "pytorch_model.bin"
#: Florence-2's patch embeddings, fixed by timm's DaViT (stem 7/4/3 post-norm, then 3/2/1 pre-norm)
PATCH = {"patch_size": [7, 3, 3, 3], "patch_stride": [4, 2, 2, 2], "patch_padding": [3, 1, 1, 1],
         "patch_prenorm": [False, True, True, True]}
#: tokens Microsoft's remote processor adds to BART's vocabulary at run time, in order (ids 50265..51288)
MS_EXTRA_TOKENS = (["<od>", "</od>", "<ocr>", "</ocr>"] + [f"<loc_{i}>" for i in range(1000)]
                   + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
                      "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
                      "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>"])
#: Florence-2's task tokens → prompts (transformers' Florence2Processor)
TASK_PROMPTS = {
    "<OCR>": "What is the text in the image?",
    "<OCR_WITH_REGION>": "What is the text in the image, with regions?",
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<OD>": "Locate the objects with category name in the image.",
    "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
    "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
}
TASK_PROMPTS_WITH_INPUT = {
    "<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "Locate {input} in the image with mask",
    "<REGION_TO_SEGMENTATION>": "What is the polygon mask of region {input}",
    "<OPEN_VOCABULARY_DETECTION>": "Locate {input} in the image.",
    "<REGION_TO_CATEGORY>": "What is the region {input}?",
    "<REGION_TO_DESCRIPTION>": "What does the region {input} describe?",
    "<REGION_TO_OCR>": "What text is in the region {input}?",
}
CAPTION_TASKS = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "paragraph": "<MORE_DETAILED_CAPTION>"}
BANNED_GROUNDING = {"it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers", "they",
                    "them", "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its", "myself",
                    "yourself", "himself", "herself", "itself", "ourselves", "yourselves", "themselves", "this",
                    "that", "these", "those", "who", "whom", "whose", "which", "what", "all", "another", "any",
                    "anybody", "anyone", "anything", "each", "everybody", "everyone", "everything", "few", "many",
                    "nobody", "none", "several", "some", "somebody", "someone", "something", "each other",
                    "one another", "the image", "image", "images", "the", "a", "an", "a group", "other objects",
                    "lots", "a set"}
#: generation_config.json keys read (transformers' names) → our HFGenerationConfig fields
_GEN_KEYS = {"max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens", "num_beams": "num_beams",
             "do_sample": "do_sample", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
             "no_repeat_ngram_size": "no_repeat_ngram_size", "length_penalty": "length_penalty",
             "early_stopping": "early_stopping", "decoder_start_token_id": "decoder_start_id",
             "eos_token_id": "eos_id", "pad_token_id": "pad_id", "forced_bos_token_id": "forced_bos_id",
             "forced_eos_token_id": "forced_eos_id"}
_ID_FIELDS = ("decoder_start_id", "eos_id", "pad_id", "forced_bos_id", "forced_eos_id")
_ID = _upto(2**22, 0)
#: generation_config.json: the keys read (transformers' names) and the values accepted; other keys are ignored
GEN_FILE_SCHEMA: dict[str, Check] = {
    "max_new_tokens": _upto(2**16), "min_new_tokens": _upto(2**16, 0), "max_length": _upto(2**16 + 1),
    "min_length": _upto(2**16, 0), "num_beams": _upto(2**10), "do_sample": _bool, "temperature": _num,
    "top_k": _upto(2**22, 0), "top_p": _num, "no_repeat_ngram_size": _upto(2**10, 0), "length_penalty": _num,
    "early_stopping": lambda v: v in (True, False, "never"), "decoder_start_token_id": _ID,
    "eos_token_id": lambda v: _ID(v) or _list_of(_ID)(v), "pad_token_id": _ID, "forced_bos_token_id": _ID,
    "forced_eos_token_id": lambda v: _ID(v) or _list_of(_ID)(v)}
#: our saved folder's ``florence2.generation`` (HFGenerationConfig fields, unified ids)
GEN_SCHEMA: dict[str, Check] = {
    **{ours: GEN_FILE_SCHEMA[theirs] for theirs, ours in _GEN_KEYS.items() if ours not in _ID_FIELDS},
    **{ours: _optional(_ID) for ours in _ID_FIELDS}}
#: our saved folder's ``florence2`` entry (provenance + generation defaults)
META_SCHEMA: dict[str, Check] = {
    "layout": lambda v: v in ("transformers", "microsoft"), "source": _optional(_str), "revision": _optional(_str),
    "license": _optional(_str), "generation": lambda v: isinstance(v, dict)}


def swap01(i: int) -> int:
    """BART id ↔ unified id (rows 0 and 1 swap; the map is its own inverse)."""
    return {0: 1, 1: 0}.get(int(i), int(i))


# ------------------------------------------------------------------------------------------------
# Recognising a folder (config.json read as data)
# ------------------------------------------------------------------------------------------------
def _read_json(path: Path, root: Path | None = None) -> dict[str, Any]:
    """A JSON object from a file of the model folder (confined to ``root``, default :func:`zoo.loading.model_root`;
    size-limited; clear errors naming the file); a ``_target_`` anywhere in it is refused."""
    obj = read_json_object(model_root(path.parent) if root is None else root, path)
    refuse_targets(obj, str(path))
    return obj


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling / outside link is refused by confined(), not skipped


def recognise(folder: str | Path) -> str | None:
    """``"transformers"`` / ``"microsoft"`` for a published Florence-2 folder, ``"mmzoo"`` for one saved by
    :meth:`Florence2.save_pretrained`, else ``None``. ``config.json`` is read as data (nothing in it is imported:
    ``auto_map`` and the like are ignored)."""
    path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir() or not _exists(path):
        return None
    cfg = read_json_object(model_root(Path(folder)), path)
    if isinstance(cfg.get("florence2"), dict) and "arch" in cfg:
        return "mmzoo"
    if cfg.get("model_type") != "florence2":
        return None
    vision = cfg.get("vision_config")
    vision = vision if isinstance(vision, dict) else {}
    if "embed_dim" in vision or vision.get("model_type") == "florence_vision":
        return "transformers"
    if "dim_embed" in vision or vision.get("model_type") == "davit":
        return "microsoft"
    raise ModelFolderError(f"{path}: model_type 'florence2' but the vision config matches neither published layout "
                           f"(keys {sorted(map(str, vision))[:20]})")


# ------------------------------------------------------------------------------------------------
# Config translation: only the keys used, each type-checked and bounded (other keys of a published config are
# ignored: nothing is instantiated from them)
# ------------------------------------------------------------------------------------------------
_REQUIRED = object()


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ModelFolderError(f"{where}: unsupported Florence-2 config: {what}")


def _field(d: dict[str, Any], key: str, check: Check, where: str, prefix: str = "", default: Any = _REQUIRED) -> Any:
    """``d[key]`` after ``check``; a missing key gives ``default`` (or an error when it is required)."""
    if key not in d or (d[key] is None and default is not _REQUIRED):
        if default is _REQUIRED:
            raise ModelFolderError(f"{where}: key '{prefix}{key}' is missing (a Florence-2 config needs it)")
        return default
    if not check(d[key]):
        raise ModelFolderError(f"{where}: key '{prefix}{key}' has an invalid value {d[key]!r:.200}")
    return d[key]


def _section(d: dict[str, Any], key: str, where: str, prefix: str = "") -> dict[str, Any]:
    return _field(d, key, lambda v: isinstance(v, dict), where, prefix)


_STAGES4 = lambda limit: _list_of(_upto(limit), 4)  # noqa: E731
_PATCH_CHECKS: dict[str, Check] = {"patch_size": _list_of(_upto(64), 4), "patch_stride": _list_of(_upto(64), 4),
                                   "patch_padding": _list_of(_upto(64, 0), 4), "patch_prenorm": _list_of(_bool, 4)}


def _vision_fields(vision: dict[str, Any], layout: str, where: str) -> dict[str, Any]:
    """The DaViT sizes of either layout's vision config, in transformers' names, each checked."""
    p = "vision_config."
    common = {"depths": _field(vision, "depths", _STAGES4(2**10), where, p),
              "num_heads": _field(vision, "num_heads", _STAGES4(2**10), where, p),
              "num_groups": _field(vision, "num_groups", _STAGES4(2**10), where, p),
              "projection_dim": _field(vision, "projection_dim", _upto(2**16), where, p),
              **{k: _field(vision, k, c, where, p, PATCH[k]) for k, c in _PATCH_CHECKS.items()}}
    if layout == "microsoft":
        pos = _field(vision, "image_pos_embed", lambda v: isinstance(v, dict), where, p, {})
        tmp = _field(vision, "visual_temporal_embedding", lambda v: isinstance(v, dict), where, p, {})
        return {**common, "embed_dim": _field(vision, "dim_embed", _STAGES4(2**16), where, p),
                "window_size": _field(vision, "window_size", _upto(2**10), where, p, 12),
                "max_position_embeddings": _field(pos, "max_pos_embeddings", _upto(2**14), where,
                                                  p + "image_pos_embed.", 50),
                "max_temporal_embeddings": _field(tmp, "max_temporal_embeddings", _upto(2**14), where,
                                                  p + "visual_temporal_embedding.", 100)}
    return {**common, "embed_dim": _field(vision, "embed_dim", _STAGES4(2**16), where, p),
            "window_size": _field(vision, "window_size", _upto(2**10), where, p),
            "max_position_embeddings": _field(vision, "max_position_embeddings", _upto(2**14), where, p),
            "max_temporal_embeddings": _field(vision, "max_temporal_embeddings", _upto(2**14), where, p)}


def model_config(cfg: dict[str, Any], layout: str, image_size: int, where: str = CONFIG_FILE) -> ModelConfig:
    """Our ``ModelConfig`` for a published Florence-2 ``config.json`` (BART text config + DaViT vision config)."""
    from modalities.florence_image import FlorenceImageConfig

    refuse_targets(cfg, where)
    text = _section(cfg, "text_config", where)
    vision = _vision_fields(_section(cfg, "vision_config", where), layout, where)
    t = "text_config."
    d = _field(text, "d_model", _upto(2**16), where, t)
    heads = _field(text, "encoder_attention_heads", _upto(2**10), where, t)
    ffn = _field(text, "encoder_ffn_dim", _upto(2**20), where, t)
    enc = _field(text, "encoder_layers", _upto(2**10, 0), where, t)
    dec = _field(text, "decoder_layers", _upto(2**10, 0), where, t)
    positions = _field(text, "max_position_embeddings", _upto(2**20), where, t)
    _need(_field(text, "decoder_attention_heads", _upto(2**10), where, t, heads) == heads, where,
          "encoder and decoder head counts differ")
    _need(_field(text, "decoder_ffn_dim", _upto(2**20), where, t, ffn) == ffn, where,
          "encoder and decoder FFN sizes differ")
    act = _field(text, "activation_function", _str, where, t, "gelu")
    _need(act == "gelu", where, f"activation {act!r} (only 'gelu')")
    specials = tuple(_field(text, k, _upto(2**22, 0), where, t, v)
                     for k, v in (("bos_token_id", 0), ("pad_token_id", 1), ("eos_token_id", 2)))
    _need(specials == (0, 1, 2), where, "BART special ids other than <s>=0, <pad>=1, </s>=2")
    scale = _field(text, "scale_embedding", _bool, where, t, False)
    vocab = _field(text, "vocab_size", _upto(2**22, 5), where, t, None)
    if vocab is None:
        vocab = _field(cfg, "vocab_size", _upto(2**22, 5), where)
    for k, v in PATCH.items():
        _need(list(vision[k]) == v, where, f"vision {k}={vision[k]} (timm's DaViT has {v})")
    _need(vision["num_groups"] == vision["num_heads"], where, "channel groups differ from heads")
    _need(vision["projection_dim"] == d, where, f"projection_dim {vision['projection_dim']} != d_model {d}")
    _need(d % heads == 0, where, f"d_model {d} is not a multiple of the {heads} heads")
    dims = [int(x) for x in vision["embed_dim"]]
    tower = "davit_huge_fl" if dims == [256, 512, 1024, 2048] else "davit_base_fl"
    try:
        image = FlorenceImageConfig(tower=tower, depths=vision["depths"], embed_dims=dims,
                                    num_heads=vision["num_heads"], window_size=int(vision["window_size"]),
                                    image_size=int(image_size), max_pos_embeddings=int(vision["max_position_embeddings"]),
                                    max_temporal_embeddings=int(vision["max_temporal_embeddings"]))
    except ValueError as e:
        raise ModelFolderError(f"{where}: unsupported Florence-2 vision config: {e}") from None
    return ModelConfig(
        arch="custom", d_model=d, n_heads=heads, enc_layers=enc, dec_layers=dec, ffn_dim=ffn, activation="gelu",
        max_positions=positions, norm_first=False, embed_norm=True, embed_scale=scale, pos_offset=2,
        enc_positions="sequence", type_embed=False, logits_bias=layout == "microsoft", vocab={"text_size": vocab - 4},
        modalities={"florence_image": image.to_dict()})


def image_settings(folder: Path, root: Path | None = None) -> dict[str, Any]:
    """The image processor's settings (``preprocessor_config.json`` or ``processor_config.json``), as checked data."""
    root = model_root(folder) if root is None else root
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if not _exists(path):
            continue
        where = str(path)
        data, p = _read_json(path, root), ""
        if "image_processor" in data:
            data, p = _section(data, "image_processor", where), "image_processor."
        size = _field(data, "size", lambda v: isinstance(v, dict), where, p)
        side = _field(size, "height", _upto(2**14, 32), where, p + "size.")
        _need(_field(size, "width", _upto(2**14, 32), where, p + "size.", side) == side, where,
              f"non-square size {size}")
        _need(not _field(data, "do_center_crop", _bool, where, p, False), where, "do_center_crop=true")
        resample = _field(data, "resample", _upto(5, 0), where, p, 3)
        _need(resample == 3, where, f"resample={resample} (bicubic is 3)")
        _need(abs(_field(data, "rescale_factor", _num, where, p, 1 / 255) - 1 / 255) < 1e-9, where, "rescale_factor")
        mean = _field(data, "image_mean", _list_of(_num, 3), where, p, None)
        std = _field(data, "image_std", _list_of(lambda v: _num(v) and v > 0, 3), where, p, None)
        _need((mean is None) == (std is None), where, "image_mean and image_std come together")
        return {"image_size": side, "mean": mean, "std": std,
                "image_seq_length": _field(data, "image_seq_length", _upto(2**20), where, p, None)}
    return {"image_size": 768, "mean": None, "std": None, "image_seq_length": None}


def generation_defaults(folder: Path, root: Path | None = None) -> dict[str, Any]:
    """``generation_config.json`` → :class:`HFGenerationConfig` fields (ids in unified ids); only the keys of
    :data:`GEN_FILE_SCHEMA` are read, each checked."""
    path = folder / "generation_config.json"
    out: dict[str, Any] = {}
    if _exists(path):
        raw = _read_json(path, model_root(folder) if root is None else root)
        data = {k: _field(raw, k, c, str(path), default=None) for k, c in GEN_FILE_SCHEMA.items()}
        if data["max_new_tokens"] is None and data["max_length"] is not None:
            data["max_new_tokens"] = max(1, data["max_length"] - 1)
        if data["min_new_tokens"] is None and data["min_length"] is not None:
            data["min_new_tokens"] = max(0, data["min_length"] - 1)
        for theirs, ours in _GEN_KEYS.items():
            v = data[theirs]
            if v is None:
                continue
            if isinstance(v, list):  # eos_token_id may be a list
                _need(len(v) == 1, str(path), f"{theirs}={v} (one id only)")
                v = v[0]
            out[ours] = swap01(v) if ours in _ID_FIELDS else v
    out.setdefault("decoder_start_id", swap01(2))
    out.setdefault("eos_id", swap01(2))
    out.setdefault("pad_id", swap01(1))
    return out


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
class FlorenceTokenizer:
    """Florence-2's BART byte-level BPE (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) with the location
    tokens, mapping between its ids and the unified ids (:func:`swap01`)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer

    @classmethod
    def from_folder(cls, folder: Path, vocab_rows: int | None = None, root: Path | None = None) -> "FlorenceTokenizer":
        """The tokenizer files of ``folder`` (read confined to ``root``, as data: a ``tokenizers`` JSON, or BPE
        ``vocab.json`` + ``merges.txt``)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        root = model_root(folder) if root is None else root
        tj, vj, mt = folder / "tokenizer.json", folder / "vocab.json", folder / "merges.txt"
        if _exists(tj):
            tok = _parse(tj, lambda text: Tokenizer.from_str(text), read_limited(root, tj), "tokenizer.json")
            where = tj
        elif _exists(vj) and _exists(mt):
            vocab = read_json_object(root, vj)
            if not all(isinstance(k, str) and _nonneg(v) for k, v in vocab.items()):
                raise ModelFolderError(f"{vj}: expected an object of token -> non-negative id")
            merges = []
            for n, line in enumerate(_utf8(mt, read_limited(root, mt)).splitlines(), 1):
                if not line or line.startswith("#version"):
                    continue
                pair = line.split(" ")
                if len(pair) != 2:
                    raise ModelFolderError(f"{mt}: line {n} is not a merge 'a b': {line[:80]!r}")
                merges.append((pair[0], pair[1]))
            tok = _parse(vj, lambda _: Tokenizer(models.BPE(vocab=vocab, merges=merges)), b"", "BPE vocabulary")
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
            where = vj
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json (nor vocab.json + merges.txt)")
        if tok.token_to_id("<loc_0>") is None:  # Microsoft's layout: the processor adds these at run time
            tok.add_special_tokens(list(MS_EXTRA_TOKENS))
        ids = [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")]
        if ids != [0, 1, 2, 3]:
            raise ModelFolderError(f"{where}: tokenizer has <s>, <pad>, </s>, <unk> at {ids}, expected [0, 1, 2, 3]")
        if vocab_rows is not None and tok.get_vocab_size(with_added_tokens=True) > vocab_rows:
            raise ModelFolderError(f"{where}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens but "
                                   f"the model's embedding only {vocab_rows} rows")
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """The unified id of ``token`` (``None`` if absent)."""
        i = self.tok.token_to_id(token)
        return None if i is None else swap01(i)

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """``<s>prompt</s>`` per prompt → unified ids (as Florence2Processor, without the image tokens)."""
        encs = self.tok.encode_batch([f"<s>{p}</s>" for p in prompts], add_special_tokens=False)
        return [[swap01(i) for i in e.ids] for e in encs]

    def decode_raw(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Unified ids → text as ``batch_decode(skip_special_tokens=False)`` with ``<s>``, ``</s>``, ``<pad>``
        removed (location tokens kept)."""
        texts = self.tok.decode_batch([[swap01(i) for i in r] for r in rows], skip_special_tokens=False)
        return [t.replace("<s>", "").replace("</s>", "").replace("<pad>", "") for t in texts]

    def save(self, folder: Path) -> None:
        self.tok.save(str(folder / "tokenizer.json"))


def _utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{path}: not UTF-8 text ({e})") from None


def _parse(path: Path, fn: Any, data: bytes, what: str) -> Any:
    """``fn(text)`` with any tokenizers error turned into one naming ``path``."""
    text = _utf8(path, data)
    try:
        return fn(text)
    except Exception as e:  # noqa: BLE001 — tokenizers raises bare Exceptions
        raise ModelFolderError(f"{path}: not a valid {what} ({type(e).__name__}: {str(e)[:200]})") from None


# ------------------------------------------------------------------------------------------------
# Post-processing (location tokens → pixel boxes)
# ------------------------------------------------------------------------------------------------
_LOC = re.compile(r"<loc_(\d+)>")
_BOX = re.compile(r"([^<]+)((?:<loc_\d+>){4,})")


def dequantize_boxes(bins: Sequence[Sequence[int]], width: int, height: int,
                     integer: bool = True) -> list[list[Any]]:
    """Location bins (1000 per side) ``[[x0, y0, x1, y1], ...]`` → pixel boxes at the bins' centres, truncated to
    integers in float32 as Florence-2's post-processor does (``integer=False``: the float centres, which
    :func:`quantize_boxes` maps back to the same bins)."""
    t = torch.tensor([list(b) for b in bins], dtype=torch.int64).reshape(-1, 4)
    scale = torch.tensor([width / 1000, height / 1000, width / 1000, height / 1000], dtype=torch.float32)
    centres = (t + 0.5) * scale
    return centres.int().tolist() if integer else centres.tolist()


def quantize_boxes(boxes: Sequence[Sequence[float]], width: float, height: float) -> list[list[int]]:
    """Pixel boxes ``[[x0, y0, x1, y1], ...]`` → location bins (1000 per side): ``floor(v / (side / 1000))`` in
    float32, clamped to ``[0, 999]``, as Florence-2's post-processor quantises. Inverse of
    :func:`dequantize_boxes`: bins → centres → bins is the identity, pixels → bins → centres moves a coordinate
    by at most half a bin (``side / 2000`` pixels)."""
    t = torch.tensor([[float(v) for v in b] for b in boxes], dtype=torch.float32).reshape(-1, 4)
    per_bin = torch.tensor([width / 1000, height / 1000, width / 1000, height / 1000], dtype=torch.float32)
    return (t / per_bin).floor().clamp(0, 999).int().tolist()


def parse_boxes(text: str, width: int, height: int, banned: set[str] | None = None) -> dict[str, list[Any]]:
    """``label<loc_a><loc_b><loc_c><loc_d>...`` → ``{"bboxes": [[x0, y0, x1, y1], ...], "labels": [...]}`` in pixels;
    a label followed by several boxes gives one entry per box; labels in ``banned`` are dropped (grounding)."""
    text = text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")
    boxes, labels = [], []
    for label, locs in _BOX.findall(text):
        label = label.strip()
        if banned is not None and label in banned:
            continue
        bins = [int(x) for x in _LOC.findall(locs)]
        groups = [bins[i:i + 4] for i in range(0, len(bins) - 3, 4)]
        label = label.encode("ascii", "ignore").decode("ascii")
        for box in dequantize_boxes(groups, width, height):
            boxes.append(box)
            labels.append(label)
    return {"bboxes": boxes, "labels": labels}


def draw_boxes(image: Any, result: dict[str, list[Any]], width: int = 3) -> Any:
    """A copy of ``image`` (path / bytes / PIL) with ``result``'s boxes and labels drawn (``detect`` / ``ground``)."""
    from PIL import ImageDraw

    from modalities.image import load_image

    img = load_image(image).copy()
    draw = ImageDraw.Draw(img)
    colours = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "white"]
    for i, (box, label) in enumerate(zip(result["bboxes"], result["labels"])):
        colour = colours[i % len(colours)]
        draw.rectangle([float(v) for v in box], outline=colour, width=width)
        if label:
            draw.text((float(box[0]) + 3, float(box[1]) + 2), str(label), fill=colour)
    return img


def task_prompt(task: str, text_input: str | None = None) -> str:
    """The prompt of a task token (``<CAPTION>`` → ``What does the image describe?``); other text is kept."""
    if task in TASK_PROMPTS:
        if text_input:
            raise ValueError(f"task {task} takes no text input, got {text_input!r}")
        return TASK_PROMPTS[task]
    if task in TASK_PROMPTS_WITH_INPUT:
        return TASK_PROMPTS_WITH_INPUT[task].format(input=(text_input or "").strip())
    return task if text_input is None else task + text_input


# ------------------------------------------------------------------------------------------------
# The bundle
# ------------------------------------------------------------------------------------------------
@dataclass
class Florence2(Pretrained):
    """A Florence-2 model in mmzoo's modules with its tokenizer, image preprocessing and generation defaults.

    ``generate`` returns Florence-2's raw text; ``caption`` / ``detect`` / ``ground`` / ``dense_caption`` /
    ``ocr`` / ``propose_regions`` / ``region_to_category`` / ``region_to_description`` add its post-processing
    (boxes in pixel coordinates of each input image).
    """

    generation: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # --- inputs -------------------------------------------------------------------------------
    def preprocessor(self, modality: str = "florence_image") -> Any:
        """The CPU image preprocessing (``"image"`` is an alias: zoo-predict's caption path asks for it)."""
        modality = "florence_image" if modality == "image" else modality
        if modality not in self._pre:
            from modalities.florence_image import FlorenceImageConfig, FlorenceImagePreprocessor

            if modality != "florence_image":
                raise NotImplementedError(f"Florence-2 has no {modality!r} modality")
            self._pre[modality] = FlorenceImagePreprocessor(
                FlorenceImageConfig(**self.model.cfg.modalities["florence_image"]))
        return self._pre[modality]

    def _images(self, images: Sequence[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Pixels ``[B, 3, S, S]`` and each image's original ``(width, height)``."""
        from modalities.image import load_image

        pre = self.preprocessor()
        pixels, sizes = [], []
        for x in images:
            if torch.is_tensor(x) and x.ndim == 3:  # already preprocessed: its own size
                pixels.append(x)
                sizes.append((x.shape[-1], x.shape[-2]))
                continue
            try:
                img = load_image(x)
            except Exception as e:
                raise ValueError(f"cannot read image {x if isinstance(x, (str, Path)) else type(x).__name__}: {e}") from e
            sizes.append(img.size)
            pixels.append(pre(img))
        return torch.stack(pixels).to(self.device), sizes

    def _prompt_segment(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.tokenizer.encode_prompts(prompts)
        n = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)  # unified <pad> = 0, right padding (as the processor)
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.as_tensor(r)
            mask[i, :len(r)] = True
        return ids.to(self.device), mask.to(self.device)

    def generation_config(self, **overrides: Any) -> HFGenerationConfig:
        """The repo's ``generation_config.json`` defaults with Hugging Face-named ``overrides`` (token ids in the
        published vocabulary)."""
        unknown = set(overrides) - set(_GEN_KEYS) - {"max_length", "min_length"}
        if unknown:
            raise TypeError(f"unknown generation keyword(s) {sorted(unknown)}; known: {sorted(_GEN_KEYS)}")
        kw = dict(self.generation)
        for k, v in overrides.items():
            if v is None:
                continue
            if k == "max_length":
                k, v = "max_new_tokens", v - 1
            elif k == "min_length":
                k, v = "min_new_tokens", max(0, v - 1)
            ours = _GEN_KEYS[k]
            kw[ours] = swap01(v) if ours in _ID_FIELDS and v is not None else v
        return HFGenerationConfig(**kw)

    @torch.no_grad()
    def _generate(self, images: Sequence[Any], prompts: Sequence[str], **generation: Any) -> torch.Tensor:
        cfg = self.generation_config(**generation)
        pixels, _ = self._images(images)
        ids, mask = self._prompt_segment([self._expand_prompt(p) for p in prompts])
        self.model.eval()
        with self.autocast():
            return hf_generate(self.model, {"florence_image": pixels, "text": (ids, mask)}, cfg).cpu()

    def generate_ids(self, images: Sequence[Any], prompts: Sequence[str], **generation: Any) -> torch.Tensor:
        """Token ids ``[B, 1 + T]`` in the published vocabulary (as transformers' ``generate`` returns them)."""
        out = self._generate(images, prompts, **generation)
        return torch.where(out < 2, 1 - out, out)  # swap01

    def generate(self, images: Any, prompt: str | Sequence[str], *, batch_size: int = 8,
                 **generation: Any) -> str | list[str]:
        """Florence-2's raw output text per image (``<s>``, ``</s>``, ``<pad>`` removed, location tokens kept).

        ``prompt``: a task token (``<CAPTION>``, ``<OD>``, ...), a task token followed by its input
        (``<CAPTION_TO_PHRASE_GROUNDING>a cat``) or free text; one for all images or one per image. Generation
        keywords use Hugging Face's names (``num_beams``, ``max_new_tokens``, ``do_sample``,
        ``no_repeat_ngram_size``, ``early_stopping``, ...); defaults come from the repo's generation_config.json.
        """
        items, single = _as_list(images)
        prompts = [prompt] * len(items) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(items):
            raise ValueError(f"got {len(items)} images but {len(prompts)} prompts")
        texts = []
        for i in range(0, len(items), batch_size):
            ids = self._generate(items[i:i + batch_size], prompts[i:i + batch_size], **generation)
            texts += self.tokenizer.decode_raw(ids.tolist())
        return texts[0] if single else texts

    @staticmethod
    def _expand_prompt(prompt: str) -> str:
        for task in (*TASK_PROMPTS, *TASK_PROMPTS_WITH_INPUT):
            if prompt.startswith(task):
                return task_prompt(task, prompt[len(task):] or None)
        return prompt

    # --- tasks --------------------------------------------------------------------------------
    def caption(self, images: Any, *, detail: str = "short", batch_size: int = 8, **generation: Any) -> str | list[str]:
        """Captions: ``detail`` = ``short`` (``<CAPTION>``), ``detailed`` or ``paragraph``."""
        if detail not in CAPTION_TASKS:
            raise ValueError(f"detail must be one of {sorted(CAPTION_TASKS)}, got {detail!r}")
        out = self.generate(images, CAPTION_TASKS[detail], batch_size=batch_size, **generation)
        return out.strip() if isinstance(out, str) else [t.strip() for t in out]

    def _boxes(self, images: Any, prompt: str | Sequence[str], banned: set[str] | None = None,
               batch_size: int = 8, **generation: Any) -> Any:
        items, single = _as_list(images)
        texts = self.generate(items, prompt, batch_size=batch_size, **generation)
        sizes = [self._size(x) for x in items]
        out = [parse_boxes(t, w, h, banned) for t, (w, h) in zip(texts, sizes)]
        return out[0] if single else out

    def _size(self, x: Any) -> tuple[int, int]:
        from modalities.image import load_image

        if torch.is_tensor(x) and x.ndim == 3:
            return x.shape[-1], x.shape[-2]
        return load_image(x).size

    def detect(self, images: Any, vocabulary: str | None = None, *, batch_size: int = 8, **generation: Any) -> Any:
        """Object detection (``<OD>``) → ``{"bboxes": [[x0, y0, x1, y1], ...], "labels": [...]}`` per image in pixels;
        with ``vocabulary`` (a phrase), open-vocabulary detection (``<OPEN_VOCABULARY_DETECTION>``)."""
        prompt = "<OD>" if vocabulary is None else f"<OPEN_VOCABULARY_DETECTION>{vocabulary}"
        return self._boxes(images, prompt, batch_size=batch_size, **generation)

    def dense_caption(self, images: Any, **generation: Any) -> Any:
        """Dense region captions (``<DENSE_REGION_CAPTION>``): boxes with descriptions."""
        return self._boxes(images, "<DENSE_REGION_CAPTION>", **generation)

    def ground(self, images: Any, phrase: str | Sequence[str], *, batch_size: int = 8, **generation: Any) -> Any:
        """Phrase grounding (``<CAPTION_TO_PHRASE_GROUNDING>``): boxes of the phrases of a caption."""
        phrases = [phrase] if isinstance(phrase, str) else list(phrase)
        prompts = [f"<CAPTION_TO_PHRASE_GROUNDING>{p}" for p in phrases]
        return self._boxes(images, prompts[0] if len(prompts) == 1 else prompts, BANNED_GROUNDING, batch_size,
                           **generation)

    def ocr(self, images: Any, *, regions: bool = False, batch_size: int = 8, **generation: Any) -> Any:
        """The text in each image (``<OCR>``, a string); with ``regions=True`` (``<OCR_WITH_REGION>``) its lines as
        ``{"quad_boxes": [[x0, y0, x1, y1, x2, y2, x3, y3], ...], "labels": [line, ...]}`` in pixels."""
        if regions:
            return self._parsed(images, "<OCR_WITH_REGION>", parse_ocr, batch_size, generation)
        return self._parsed(images, "<OCR>", lambda text, w, h: parse_text(text), batch_size, generation)

    def propose_regions(self, images: Any, *, batch_size: int = 8, **generation: Any) -> Any:
        """Region proposals (``<REGION_PROPOSAL>``): ``{"bboxes": [...], "labels": ["", ...]}`` per image in pixels."""
        return self._parsed(images, "<REGION_PROPOSAL>", parse_regions, batch_size, generation)

    def region_to_category(self, images: Any, box: Any, *, batch_size: int = 8, **generation: Any) -> Any:
        """The category of a region (``<REGION_TO_CATEGORY>``). ``box``: ``[x0, y0, x1, y1]`` in pixels (one for all
        images, or one per image), written into the prompt as 4 location tokens quantised as Florence-2's processor
        does. Returns the answer text as its post-processing does (the published models answer ``label<loc_..>x4``)."""
        return self._region("<REGION_TO_CATEGORY>", images, box, batch_size, generation)

    def region_to_description(self, images: Any, box: Any, *, batch_size: int = 8, **generation: Any) -> Any:
        """A description of a region (``<REGION_TO_DESCRIPTION>``); ``box`` as in :meth:`region_to_category`."""
        return self._region("<REGION_TO_DESCRIPTION>", images, box, batch_size, generation)

    def _region(self, task: str, images: Any, box: Any, batch_size: int, generation: dict[str, Any]) -> Any:
        items, single = _as_list(images)
        boxes = boxes_per_image(box, len(items))
        prompts = [region_prompt(task, b, *self._size(x)) for b, x in zip(boxes, items)]
        texts = self.generate(items, prompts, batch_size=batch_size, **generation)
        return parse_text(texts[0]) if single else [parse_text(t) for t in texts]

    def _parsed(self, images: Any, prompt: str, parse: Any, batch_size: int, generation: dict[str, Any]) -> Any:
        """``parse(text, width, height)`` of each image's generated text."""
        items, single = _as_list(images)
        texts = self.generate(items, prompt, batch_size=batch_size, **generation)
        out = [parse(t, *self._size(x)) for t, x in zip(texts, items)]
        return out[0] if single else out

    # --- I/O ----------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        d = self.model.cfg.to_dict()
        d["vocab"] = self.layout.to_dict()
        return {**d, "mmzoo_version": _version(), "format": 1, "tasks": {},
                "florence2": {**self.meta, "generation": self.generation}}

    def save_pretrained(self, folder: str | Path, card: dict[str, Any] | None = None) -> Path:
        """Our own folder: config.json (mmzoo fields + ``florence2`` generation defaults and provenance),
        model.safetensors, tokenizer.json, README.md (source repo, revision, licence)."""
        import os
        import shutil
        import uuid

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2) + "\n", encoding="utf-8")
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_ST), metadata={"format": "pt", "mmzoo_version": _version()})
            self.tokenizer.save(tmp)
            (tmp / "README.md").write_text(self.model_card(card), encoding="utf-8")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def model_card(self, card: dict[str, Any] | None = None) -> str:
        m, card = self.meta, card or {}
        lic = m.get("license") or "unknown (see the source repo)"
        return "\n".join([
            "---", "library_name: mmzoo", f"license: {m.get('license') or 'other'}", "tags:", "- mmzoo", "- florence-2",
            *( [f"base_model: {m['source']}"] if m.get("source") else []), "---", "",
            f"# {card.get('name') or m.get('source') or 'Florence-2'} (mmzoo)", "",
            f"Florence-2 converted to mmzoo's modules (`{self.model.cfg.arch}`, d_model {self.model.cfg.d_model}, "
            f"{self.model.cfg.enc_layers}+{self.model.cfg.dec_layers} layers, DaViT "
            f"`{self.model.cfg.modalities['florence_image']['tower']}`).", "",
            f"- Source: `{m.get('source', 'unknown')}` (layout: {m.get('layout', 'unknown')}), revision "
            f"`{m.get('revision') or 'unknown'}`", f"- Licence: {lic} (the source model's licence applies)",
            f"- Parameters: {self.model.num_parameters() / 1e6:.1f}M", "", "## Load", "", "```python", "import zoo",
            "m = zoo.load('./this-folder')", "print(m.caption('photo.jpg'))", "print(m.detect('photo.jpg'))", "```", ""])

    def __repr__(self) -> str:
        return (f"Florence2(params={self.num_parameters() / 1e6:.2f}M, source={self.source!r}, "
                f"layout={self.meta.get('layout')!r})")


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def read_weights(folder: Path, root: Path | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    """``(state, file)``: ``model.safetensors`` (preferred; framing checked) or, only when there is none,
    ``pytorch_model.bin`` through ``torch.load(weights_only=True)`` (:func:`zoo.loading.read_pickle_weights`)."""
    root = model_root(folder) if root is None else root
    for name, read in ((WEIGHTS_ST, read_safetensors), (WEIGHTS_BIN, read_pickle_weights)):
        if _exists(folder / name):
            return read(root, folder / name), folder / name
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_ST} or {WEIGHTS_BIN} (files: "
                            f"{sorted(p.name for p in folder.iterdir())})")


def _license(folder: Path, root: Path) -> str | None:
    card = folder / "README.md"
    if _exists(card):
        text = read_limited(root, card, 2**20).decode("utf-8", errors="replace")
        m = re.search(r"^license:\s*(\S+)", text, re.MULTILINE)
        if m:
            return m.group(1)[:64]
    return None


def _shapes(cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """The architecture's state dict on the meta device (no memory: a config cannot make loading allocate at will)."""
    from zoo.model import UnifiedSeq2Seq

    try:
        with torch.device("meta"):
            return UnifiedSeq2Seq(cfg).state_dict()
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ModelFolderError(f"{where}: cannot build its architecture ({type(e).__name__}: {e})") from None


def _check_meta(raw: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our saved folder's ``florence2`` entry, checked: ``(meta, generation)``."""
    meta = dict(raw["florence2"])
    check_keys(meta, META_SCHEMA, where, "florence2.")
    generation = dict(meta.pop("generation", None) or {})
    check_keys(generation, GEN_SCHEMA, where, "florence2.generation.")
    return meta, generation


def load_folder(folder: str | Path, *, device: str | torch.device | None = None, source: str | None = None,
                revision: str | None = None) -> Florence2:
    """A Florence-2 folder of either published layout, or one saved by :meth:`Florence2.save_pretrained`.

    Every file is read through :mod:`zoo.loading`, confined to the folder (a Hub snapshot: its repo's cache folder);
    nothing in the folder is imported or executed."""
    from modalities.florence_image import FlorenceImageConfig
    from zoo.model import UnifiedSeq2Seq

    folder = Path(folder)
    root = model_root(folder)
    layout = recognise(folder)
    if layout is None:
        raise ModelFolderError(f"{folder}: not a Florence-2 folder (config.json has no model_type 'florence2')")
    cfg_path = folder / CONFIG_FILE
    where = str(cfg_path)
    raw = _read_json(cfg_path, root)
    if layout == "mmzoo":
        meta, generation = _check_meta(raw, where)
        cfg = model_config_from_dict({k: v for k, v in raw.items() if k != "florence2"}, where)
        state, file = read_weights(folder, root)
        check_state(state, _shapes(cfg, where), file, where)
        model = UnifiedSeq2Seq(cfg)
        model.load_state_dict(check_state(state, model.state_dict(), file, where))
    else:
        settings = image_settings(folder, root)
        cfg = model_config(raw, layout, settings["image_size"], where)
        image_cfg = FlorenceImageConfig(**cfg.modalities["florence_image"])
        if settings["mean"] is not None:
            image_cfg.mean, image_cfg.std = tuple(settings["mean"]), tuple(settings["std"])
            cfg.modalities["florence_image"] = image_cfg.to_dict()
        seq = settings["image_seq_length"]
        if seq is not None and int(seq) != image_cfg.num_tokens:
            raise ModelFolderError(f"{folder}: image_seq_length {seq} but a {image_cfg.image_size}-px image gives "
                                   f"{image_cfg.num_tokens} tokens")
        expected = _shapes(cfg, where)
        sizes = {"enc": cfg.enc_layers, "dec": cfg.dec_layers, "depths": image_cfg.depths}
        theirs, file = read_weights(folder, root)
        state = convert(theirs, expand(florence2_table(layout), sizes), florence2_aliases(layout), where=str(file),
                        expected=expected, config=where)
        model = UnifiedSeq2Seq(cfg)
        model.load_state_dict(check_state(state, model.state_dict(), file, where), strict=True)
        generation = generation_defaults(folder, root)
        meta = {"layout": layout, "source": source or str(folder), "revision": revision or _snapshot(folder),
                "license": _license(folder, root)}
    tokenizer = FlorenceTokenizer.from_folder(folder, model.layout.size, root)
    try:
        HFGenerationConfig(**generation)  # validate the defaults now, naming the file
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"{folder}: invalid generation defaults: {e}") from None
    model.eval()
    bundle = Florence2(model=model, tokenizer=tokenizer, source=source or str(folder), generation=generation,
                       meta=meta)
    return bundle.to(device) if device is not None else bundle


def _snapshot(folder: Path) -> str | None:
    """The commit of a Hub cache snapshot folder (``.../snapshots/<40 hex>``), if it is one."""
    name = folder.resolve().name
    return name if re.fullmatch(r"[0-9a-f]{40}", name) else None
