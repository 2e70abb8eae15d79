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
from zoo.imported.keymap import convert, expand
from zoo.pretrained import CONFIG_FILE, Pretrained, UnsafeModelError, _as_list, _version

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


def swap01(i: int) -> int:
    """BART id ↔ unified id (rows 0 and 1 swap; the map is its own inverse)."""
    return {0: 1, 1: 0}.get(int(i), int(i))


# ------------------------------------------------------------------------------------------------
# Recognising a folder (config.json read as data)
# ------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file of the model folder (confined to it; clear errors naming the file)."""
    from zoo.loading import model_root, read_json_object

    return read_json_object(model_root(path.parent), path)


def recognise(folder: str | Path) -> str | None:
    """``"transformers"`` / ``"microsoft"`` for a published Florence-2 folder, ``"mmzoo"`` for one saved by
    :meth:`Florence2.save_pretrained`, else ``None``."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    cfg = _read_json(path)
    if isinstance(cfg.get("florence2"), dict) and "arch" in cfg:
        return "mmzoo"
    if cfg.get("model_type") != "florence2":
        return None
    vision = cfg.get("vision_config") or {}
    if "embed_dim" in vision or vision.get("model_type") == "florence_vision":
        return "transformers"
    if "dim_embed" in vision or vision.get("model_type") == "davit":
        return "microsoft"
    raise ValueError(f"{path}: model_type 'florence2' but the vision config matches neither published layout "
                     f"(keys {sorted(vision)})")


# ------------------------------------------------------------------------------------------------
# Config translation
# ------------------------------------------------------------------------------------------------
def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ValueError(f"{where}: unsupported Florence-2 config: {what}")


def _vision_fields(vision: dict[str, Any], layout: str) -> dict[str, Any]:
    """The DaViT sizes of either layout's vision config, in transformers' names."""
    if layout == "microsoft":
        return {"embed_dim": vision.get("dim_embed"), "depths": vision.get("depths"),
                "num_heads": vision.get("num_heads"), "num_groups": vision.get("num_groups"),
                "window_size": vision.get("window_size", 12), "projection_dim": vision.get("projection_dim"),
                "max_position_embeddings": (vision.get("image_pos_embed") or {}).get("max_pos_embeddings", 50),
                "max_temporal_embeddings": (vision.get("visual_temporal_embedding") or {}).get(
                    "max_temporal_embeddings", 100),
                **{k: vision.get(k, v) for k, v in PATCH.items()}}
    return {k: vision.get(k) for k in ("embed_dim", "depths", "num_heads", "num_groups", "window_size",
                                       "projection_dim", "max_position_embeddings", "max_temporal_embeddings",
                                       *PATCH)}


def model_config(cfg: dict[str, Any], layout: str, image_size: int, where: str = CONFIG_FILE) -> ModelConfig:
    """Our ``ModelConfig`` for a published Florence-2 ``config.json`` (BART text config + DaViT vision config)."""
    from modalities.florence_image import FlorenceImageConfig

    text = cfg.get("text_config") or {}
    vision = _vision_fields(cfg.get("vision_config") or {}, layout)
    for k in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
              "max_position_embeddings"):
        _need(isinstance(text.get(k), int), where, f"text_config.{k} missing")
    d = text["d_model"]
    _need(text.get("decoder_attention_heads", text["encoder_attention_heads"]) == text["encoder_attention_heads"],
          where, "encoder and decoder head counts differ")
    _need(text.get("decoder_ffn_dim", text["encoder_ffn_dim"]) == text["encoder_ffn_dim"], where,
          "encoder and decoder FFN sizes differ")
    _need(text.get("activation_function", "gelu") == "gelu", where,
          f"activation {text.get('activation_function')!r} (only 'gelu')")
    _need((text.get("bos_token_id", 0), text.get("pad_token_id", 1), text.get("eos_token_id", 2)) == (0, 1, 2), where,
          "BART special ids other than <s>=0, <pad>=1, </s>=2")
    for k, v in PATCH.items():
        _need(list(vision[k]) == v, where, f"vision {k}={vision[k]} (timm's DaViT has {v})")
    _need(vision["num_groups"] == vision["num_heads"], where, "channel groups differ from heads")
    _need(vision["projection_dim"] == d, where, f"projection_dim {vision['projection_dim']} != d_model {d}")
    vocab = int(text.get("vocab_size") or cfg.get("vocab_size"))
    dims = [int(x) for x in vision["embed_dim"]]
    tower = "davit_huge_fl" if dims == [256, 512, 1024, 2048] else "davit_base_fl"
    image = FlorenceImageConfig(tower=tower, depths=vision["depths"], embed_dims=dims, num_heads=vision["num_heads"],
                                window_size=int(vision["window_size"]), image_size=int(image_size),
                                max_pos_embeddings=int(vision["max_position_embeddings"]),
                                max_temporal_embeddings=int(vision["max_temporal_embeddings"]))
    return ModelConfig(
        arch="custom", d_model=d, n_heads=text["encoder_attention_heads"], enc_layers=text["encoder_layers"],
        dec_layers=text["decoder_layers"], ffn_dim=text["encoder_ffn_dim"], activation="gelu",
        max_positions=text["max_position_embeddings"], norm_first=False, embed_norm=True,
        embed_scale=bool(text.get("scale_embedding", False)), pos_offset=2, enc_positions="sequence",
        type_embed=False, logits_bias=layout == "microsoft", vocab={"text_size": vocab - 4},
        modalities={"florence_image": image.to_dict()})


def image_settings(folder: Path) -> dict[str, Any]:
    """The image processor's settings (``preprocessor_config.json`` or ``processor_config.json``), as data."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            data = _read_json(path)
            data = data.get("image_processor", data)
            size = data.get("size") or {}
            if "height" not in size:
                raise ValueError(f"{path}: size {size} is not {{height, width}}")
            _need(size["height"] == size.get("width"), str(path), f"non-square size {size}")
            _need(not data.get("do_center_crop", False), str(path), "do_center_crop=true")
            _need(int(data.get("resample", 3)) == 3, str(path), f"resample={data.get('resample')} (bicubic is 3)")
            _need(abs(float(data.get("rescale_factor", 1 / 255)) - 1 / 255) < 1e-9, str(path), "rescale_factor")
            return {"image_size": int(size["height"]), "mean": data.get("image_mean"), "std": data.get("image_std"),
                    "image_seq_length": data.get("image_seq_length")}
    return {"image_size": 768, "mean": None, "std": None, "image_seq_length": None}


def generation_defaults(folder: Path) -> dict[str, Any]:
    """``generation_config.json`` → :class:`HFGenerationConfig` fields (ids in unified ids)."""
    path = folder / "generation_config.json"
    out: dict[str, Any] = {}
    if path.is_file():
        data = _read_json(path)
        if "max_new_tokens" not in data and isinstance(data.get("max_length"), int):
            data["max_new_tokens"] = data["max_length"] - 1
        if "min_new_tokens" not in data and isinstance(data.get("min_length"), int):
            data["min_new_tokens"] = max(0, data["min_length"] - 1)
        for theirs, ours in _GEN_KEYS.items():
            if data.get(theirs) is not None:
                v = data[theirs]
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
    def from_folder(cls, folder: Path, vocab_rows: int | None = None) -> "FlorenceTokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        if (folder / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises bare Exceptions
                raise ValueError(f"{folder / 'tokenizer.json'} is not a valid tokenizer.json: {e}") from e
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json (nor vocab.json + merges.txt)")
        if tok.token_to_id("<loc_0>") is None:  # Microsoft's layout: the processor adds these at run time
            tok.add_special_tokens(list(MS_EXTRA_TOKENS))
        ids = [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")]
        if ids != [0, 1, 2, 3]:
            raise ValueError(f"{folder}: tokenizer has <s>, <pad>, </s>, <unk> at {ids}, expected [0, 1, 2, 3]")
        if vocab_rows is not None and tok.get_vocab_size(with_added_tokens=True) > vocab_rows:
            raise ValueError(f"{folder}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens but the "
                             f"model's embedding only {vocab_rows} rows")
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


# ------------------------------------------------------------------------------------------------
# Post-processing (location tokens → pixel boxes)
# ------------------------------------------------------------------------------------------------
_LOC = re.compile(r"<loc_(\d+)>")
_BOX = re.compile(r"([^<]+)((?:<loc_\d+>){4,})")


def dequantize_boxes(bins: Sequence[Sequence[int]], width: int, height: int) -> list[list[int]]:
    """Location bins (1000 per side) ``[[x0, y0, x1, y1], ...]`` → pixel boxes at the bins' centres, truncated to
    integers in float32 as Florence-2's post-processor does."""
    t = torch.tensor([list(b) for b in bins], dtype=torch.int64).reshape(-1, 4)
    scale = torch.tensor([width / 1000, height / 1000, width / 1000, height / 1000], dtype=torch.float32)
    return ((t + 0.5) * scale).int().tolist()


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
    ``ocr`` add its post-processing (boxes in pixel coordinates of each input image).
    """

    generation: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # --- inputs -------------------------------------------------------------------------------
    def preprocessor(self, modality: str = "florence_image") -> Any:
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
def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` (preferred) or ``pytorch_model.bin`` with ``torch.load(weights_only=True)`` only."""
    if (folder / WEIGHTS_ST).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / WEIGHTS_ST))
    if (folder / WEIGHTS_BIN).is_file():
        try:
            state = torch.load(folder / WEIGHTS_BIN, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — never fall back to full unpickling
            raise UnsafeModelError(f"{folder / WEIGHTS_BIN}: not loadable with torch.load(weights_only=True) ({e}); "
                                   "mmzoo never unpickles beyond that") from e
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{folder / WEIGHTS_BIN}: expected a flat state dict of tensors")
        return state
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_ST} or {WEIGHTS_BIN} (files: "
                            f"{sorted(p.name for p in folder.iterdir())})")


def _license(folder: Path) -> str | None:
    card = folder / "README.md"
    if card.is_file():
        m = re.search(r"^license:\s*(\S+)", card.read_text(encoding="utf-8", errors="replace"), re.MULTILINE)
        if m:
            return m.group(1)
    return None


def load_folder(folder: str | Path, *, device: str | torch.device | None = None, source: str | None = None,
                revision: str | None = None) -> Florence2:
    """A Florence-2 folder of either published layout, or one saved by :meth:`Florence2.save_pretrained`."""
    from modalities.florence_image import FlorenceImageConfig
    from zoo.model import UnifiedSeq2Seq

    folder = Path(folder)
    layout = recognise(folder)
    if layout is None:
        raise ValueError(f"{folder}: not a Florence-2 folder (config.json has no model_type 'florence2')")
    raw = _read_json(folder / CONFIG_FILE)
    if layout == "mmzoo":
        from zoo.pretrained import model_config_from_dict

        meta = dict(raw["florence2"])
        generation = dict(meta.pop("generation", {}) or {})
        cfg = model_config_from_dict({k: v for k, v in raw.items() if k != "florence2"}, str(folder / CONFIG_FILE))
        model = UnifiedSeq2Seq(cfg)
        state = read_weights(folder)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not match config.json: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}")
    else:
        settings = image_settings(folder)
        cfg = model_config(raw, layout, settings["image_size"], str(folder / CONFIG_FILE))
        image_cfg = FlorenceImageConfig(**cfg.modalities["florence_image"])
        if settings["mean"] is not None:
            image_cfg.mean, image_cfg.std = tuple(settings["mean"]), tuple(settings["std"])
            cfg.modalities["florence_image"] = image_cfg.to_dict()
        seq = settings["image_seq_length"]
        if seq is not None and int(seq) != image_cfg.num_tokens:
            raise ValueError(f"{folder}: image_seq_length {seq} but a {image_cfg.image_size}-px image gives "
                             f"{image_cfg.num_tokens} tokens")
        model = UnifiedSeq2Seq(cfg)
        sizes = {"enc": cfg.enc_layers, "dec": cfg.dec_layers, "depths": image_cfg.depths}
        state = convert(read_weights(folder), expand(florence2_table(layout), sizes), florence2_aliases(layout),
                        where=str(folder))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{folder}: checkpoint does not fit its config.json: {e}") from e
        generation = generation_defaults(folder)
        meta = {"layout": layout, "source": source or str(folder), "revision": revision or _snapshot(folder),
                "license": _license(folder)}
    tokenizer = FlorenceTokenizer.from_folder(folder, model.layout.size)
    HFGenerationConfig(**generation)  # validate the defaults now, naming nothing later
    model.eval()
    bundle = Florence2(model=model, tokenizer=tokenizer, source=source or str(folder), generation=generation,
                       meta=meta)
    return bundle.to(device) if device is not None else bundle


def _snapshot(folder: Path) -> str | None:
    """The commit of a Hub cache snapshot folder (``.../snapshots/<40 hex>``), if it is one."""
    name = folder.resolve().name
    return name if re.fullmatch(r"[0-9a-f]{40}", name) else None
