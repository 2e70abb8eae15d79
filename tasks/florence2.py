"""Florence-2 fine-tuning: one Lightning task for its detection, caption, grounding and VQA prompts.

A batch holds the pixels (Florence-2's preprocessing, in DataLoader workers), the prompt ``<s>prompt</s>`` (task
tokens expanded as Florence2Processor does) and the target. The loss is BART's teacher-forced cross-entropy:
labels ``<s> target </s>``, decoder input the labels shifted right behind ``</s>`` (``decoder_start_token_id``), as
``Florence2ForConditionalGeneration(..., labels=...)`` computes it. Validation generates with the model's own
decoding (:func:`zoo.generation_hf.hf_generate`, the defaults of the model's ``generation_config.json``) and scores
the kind's metric: COCO mAP (detection), CIDEr-D / BLEU-4 (captions), accuracy at IoU 0.5 (grounding), VQA
accuracy (VQA).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from tasks.base import Seq2SeqTask
from tasks.data.florence2 import KINDS, FlorenceRecord, read_records, write_shapes_instances
from tasks.data.validate import Problems
from tasks.data_module import FileSplitsMixin, SplitInfo, TaskDataModule
from tasks.florence2_bundle import (BASE_GENERATION, florence2_bundle, init_location_embeddings,  # noqa: F401
                                    new_florence2)
from zoo.imported.florence2 import (MS_EXTRA_TOKENS, TASK_PROMPTS, TASK_PROMPTS_WITH_INPUT, FlorenceTokenizer,
                                    dequantize_boxes, parse_boxes, task_prompt)
from zoo.vocab import PAD_ID

log = logging.getLogger(__name__)
#: default files of each kind (``data.kind``) when ``data.train_file`` etc. are not given
DEFAULT_FILES = {"detection": "instances_{split}.json", "caption": "captions_{split}.json",
                 "grounding": "refs_{split}.json", "vqa": "questions_{split}.json"}
_LOC = re.compile(r"<loc_\d+>")


def expand_prompt(prompt: str) -> str:
    """A task token (optionally followed by its input) → Florence-2's natural-language prompt; other text is kept."""
    for task in (*TASK_PROMPTS, *TASK_PROMPTS_WITH_INPUT):
        if prompt.startswith(task):
            return task_prompt(task, prompt[len(task):] or None)
    return prompt


def train_florence_tokenizer(texts: Sequence[str], vocab_size: int) -> FlorenceTokenizer:
    """A byte-level BPE in BART's layout (``<s> <pad> </s> <unk>`` at 0..3, ``<mask>``) trained on ``texts``, plus
    Florence-2's task and location tokens: the tokenizer of a Florence-2 trained from its architecture."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_LOC.sub(" ", t) for t in texts], trainer=trainer)
    tok.add_special_tokens(list(MS_EXTRA_TOKENS))
    return FlorenceTokenizer(tok)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
class FlorenceTrainSet(Dataset):
    """One item per record: preprocessed pixels, prompt ids and one of its target id rows (drawn per visit)."""

    def __init__(self, records: list[FlorenceRecord], prompts: list[list[int]], targets: list[list[list[int]]],
                 preprocess: Any, train: bool = True):
        self.records, self.prompts, self.targets, self.preprocess, self.train = records, prompts, targets, \
            preprocess, train

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        targets = self.targets[i]
        pick = int(torch.randint(len(targets), ())) if self.train and len(targets) > 1 else 0
        return {"pixels": self.preprocess(self.records[i].path), "prompt": self.prompts[i], "target": targets[pick],
                "id": self.records[i].id}


def collate_florence(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixels; right-pad prompts and targets with ``<pad>`` (unified 0); ``tgt_in`` = labels shifted right
    behind ``</s>`` (BART's ``shift_tokens_right``)."""
    b = len(items)
    n = max(len(x["prompt"]) for x in items)
    t = max(len(x["target"]) for x in items)
    prompt_ids = torch.full((b, n), PAD_ID, dtype=torch.long)
    labels = torch.full((b, t), PAD_ID, dtype=torch.long)
    for i, x in enumerate(items):
        prompt_ids[i, :len(x["prompt"])] = torch.as_tensor(x["prompt"])
        labels[i, :len(x["target"])] = torch.as_tensor(x["target"])
    tgt_in = torch.full_like(labels, PAD_ID)
    tgt_in[:, 0] = BASE_GENERATION["decoder_start_id"]
    tgt_in[:, 1:] = labels[:, :-1]
    return {"pixels": torch.stack([x["pixels"] for x in items]), "prompt_ids": prompt_ids,
            "prompt_mask": prompt_ids != PAD_ID, "labels": labels, "tgt_in": tgt_in, "ids": [x["id"] for x in items]}


class Florence2DataModule(FileSplitsMixin, TaskDataModule):
    """``(image, prompt, target)`` records of one kind (``detection | caption | grounding | vqa``) from the standard
    files (:mod:`tasks.data.florence2`); generates Shapes (and its COCO instances files) on first use.

    :meth:`bind` takes the model's image config and vocabulary, and a pretrained model's tokenizer; without one,
    :meth:`load_tokenizer` trains a BPE with Florence-2's task and location tokens on the training texts (cached).
    """

    def __init__(self, root: str, kind: str = "detection", train_file: str | None = None,
                 val_file: str | None = None, test_file: str | None = None, val_annotations: str | None = None,
                 train_annotations: str | None = None, test_annotations: str | None = None,
                 image_root: str | None = None, generate: str | None = "shapes", shapes: dict[str, Any] | None = None,
                 tokenizer_path: str | None = None, tokenizer_vocab_size: int = 1024, batch_size: int = 16,
                 eval_batch_size: int = 64, num_workers: int = 1, max_target_len: int = 128,
                 val_limit: int | None = None, skip_bad: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"data.kind must be one of {KINDS}, got {kind!r}")
        self.root, self.kind = Path(root), kind
        self.image_root = Path(image_root) if image_root else None
        default = DEFAULT_FILES[kind]
        self.files = {s: f if f is not None else default.format(split=s)
                      for s, f in (("train", train_file), ("val", val_file), ("test", test_file))}
        self.annotations = {"train": train_annotations, "val": val_annotations, "test": test_annotations}
        self.generate, self.shapes_kwargs = generate, dict(shapes or {})
        self.tokenizer_path, self.vocab_size = tokenizer_path, tokenizer_vocab_size
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.max_target_len, self.val_limit, self.skip_bad = max_target_len, val_limit, skip_bad
        self.records: dict[str, list[FlorenceRecord]] = {}
        self.split_infos: dict[str, SplitInfo] = {}
        self.tokenizer: FlorenceTokenizer | None = None
        self.preprocess: Any = None
        self.max_positions: int | None = None

    # --- records --------------------------------------------------------------------------------
    def ensure_data(self) -> None:
        if self.generate == "shapes":
            from tasks.data.shapes import ShapesConfig, ensure_shapes

            ensure_shapes(self.root, ShapesConfig(**self.shapes_kwargs))
            if self.kind == "detection":
                write_shapes_instances(self.root)
        elif self.generate:
            raise ValueError(f"unknown data generator {self.generate!r}; use 'shapes' or null")

    def _read(self, split: str) -> list[FlorenceRecord]:
        if split not in self.records:
            path = self.root / self.files[split]
            problems = Problems(self.skip_bad, str(path))
            ann = self.annotations.get(split)
            recs = read_records(self.kind, path, self.image_root, problems,
                                annotations=self.root / ann if ann else None)
            self._keep(split, path, recs, problems)
        return self.records[split]

    def prepare_data(self) -> None:
        self.ensure_data()
        for split in ("train", "val", "test"):
            if self.files.get(split):
                self._read(split)

    def has_split(self, split: str) -> bool:
        return bool(self.files.get(split)) and (self.root / self.files[split]).is_file()

    def _eval_records(self, stage: str) -> list[FlorenceRecord]:
        recs = self._read(stage)
        return recs[: self.val_limit] if self.val_limit else recs

    def references(self, stage: str) -> dict[Any, Any]:
        return {r.id: r.reference for r in self._eval_records(stage)}

    def sizes(self, stage: str) -> dict[Any, tuple[float, float] | None]:
        """Each record's ``(width, height)`` its boxes were quantised with."""
        return {r.id: r.size for r in self._eval_records(stage)}

    # --- tokenizer and model --------------------------------------------------------------------
    def training_texts(self) -> list[str]:
        recs = self._read("train")
        return [*{expand_prompt(r.prompt) for r in recs}, *(t for r in recs for t in r.targets)]

    def load_tokenizer(self) -> FlorenceTokenizer:
        """The tokenizer: ``tokenizer_path`` (a Florence-2 ``tokenizer.json``), else a BPE with Florence-2's extra
        tokens trained on the training texts, cached under ``root``."""
        if self.tokenizer is None:
            from tokenizers import Tokenizer

            path = Path(self.tokenizer_path) if self.tokenizer_path else \
                self.root / f"tokenizer-florence2-{self.kind}-bpe{self.vocab_size}.json"
            if not path.is_file():
                if self.tokenizer_path:
                    raise FileNotFoundError(f"data.tokenizer_path={path} does not exist")
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                train_florence_tokenizer(self.training_texts(), self.vocab_size).tok.save(str(tmp))
                os.replace(tmp, path)  # concurrent writers: the last replace wins, each file is whole
            self.tokenizer = FlorenceTokenizer(Tokenizer.from_file(str(path)))
        return self.tokenizer

    def text_vocab_size(self, tokenizer: FlorenceTokenizer) -> int:
        """The model's text range: every token id past the four specials (unified ``<pad> <s> </s> <unk>``)."""
        return tokenizer.vocab_size - 4

    def bind(self, model_cfg: Any, layout: Any, tokenizer: Any = None) -> None:
        from modalities.florence_image import FlorenceImageConfig, FlorenceImagePreprocessor

        image = (getattr(model_cfg, "modalities", None) or {}).get("florence_image")
        if image is None:
            raise ValueError("Florence-2 data needs a model with the florence_image modality (a Florence-2 "
                             f"architecture or checkpoint); this one has {sorted(model_cfg.modalities)}")
        if tokenizer is not None:
            if not isinstance(tokenizer, FlorenceTokenizer):
                raise ValueError(f"Florence-2 data needs the model's Florence-2 tokenizer, got {type(tokenizer).__name__}")
            self.tokenizer = tokenizer
        self.preprocess = FlorenceImagePreprocessor(FlorenceImageConfig(**image))
        self.max_positions = int(model_cfg.max_positions)
        self.layout = layout

    def setup(self, stage: str | None = None) -> None:
        if self.preprocess is None:
            raise RuntimeError("Florence2DataModule.bind(model_cfg, layout) must be called before setup()")
        self.load_tokenizer()

    # --- loaders --------------------------------------------------------------------------------
    def encode(self, recs: list[FlorenceRecord], split: str) -> tuple[list[list[int]], list[list[list[int]]]]:
        """Prompt ids and target id rows (``<s> target </s>``) of ``recs``, targets cut to ``max_target_len``."""
        tok = self.load_tokenizer()
        prompts = tok.encode_prompts([expand_prompt(r.prompt) for r in recs])
        flat = tok.encode_prompts([t for r in recs for t in r.targets])
        limit = min(self.max_target_len, self.max_positions or self.max_target_len)
        long = [i for i, x in enumerate(flat) if len(x) > limit]
        if long:
            log.warning("%d of %d %s targets exceed data.max_target_len=%d tokens and are cut (the longest has %d)",
                        len(long), len(flat), split, limit, max(len(flat[i]) for i in long))
        it = iter(x[:limit] for x in flat)
        return prompts, [[next(it) for _ in r.targets] for r in recs]

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        from tasks.runtime.resume import ResumableLoader, eval_generator, run_seed

        kwargs = dict(batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate_florence,
                      persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
        if shuffle:
            return ResumableLoader(ds, seed=run_seed(), drop_last=True, **kwargs)
        return DataLoader(ds, shuffle=False, drop_last=False, generator=eval_generator(self.num_workers), **kwargs)

    def dataset(self, split: str) -> FlorenceTrainSet:
        recs = self._read("train") if split == "train" else self._eval_records(split)
        prompts, targets = self.encode(recs, split)
        return FlorenceTrainSet(recs, prompts, targets, self.preprocess, train=split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False)


# ------------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------------
def boxes_of(text: str, size: tuple[float, float], banned: set[str] | None = None) -> dict[str, list[Any]]:
    """Florence-2 output text → ``{"boxes", "labels"}`` at the bins' centres (floats) in ``size`` pixels."""
    parsed = parse_boxes(text, 1000, 1000, banned)  # at 1000 px the truncated centre of bin b is b itself
    bins = parsed["bboxes"]
    return {"boxes": dequantize_boxes(bins, size[0], size[1], integer=False) if bins else [],
            "labels": parsed["labels"]}


class Florence2Task(Seq2SeqTask):
    """Fine-tunes a Florence-2 model (``full | frozen_encoder | lora``, :mod:`tasks.adapters`) on one kind of
    ``(image, prompt, target)`` records; validates by generating with the model's own decoding."""

    name = "florence2"
    MONITOR = {"detection": "map_50", "caption": "cider", "grounding": "acc50", "vqa": "vqa_acc"}

    def __init__(self, *args: Any, kind: str = "detection", no_repeat_ngram_size: int = 0,
                 init_locations: bool = False, **kwargs: Any):
        kwargs.setdefault("label_smoothing", 0.0)
        super().__init__(*args, **kwargs)
        if kind not in KINDS:
            raise ValueError(f"task.kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.monitor_metric = self.MONITOR[kind]
        self.state_from_checkpoint: dict[str, Any] = {}

    # --- what the model started from ------------------------------------------------------------
    @property
    def generation(self) -> dict[str, Any]:
        """The model's decoding defaults (its ``generation_config.json``; Florence-2's when trained from scratch)."""
        ft = self.finetune_info or self.state_from_checkpoint
        return {**BASE_GENERATION, **(ft.get("generation") or {})}

    @property
    def source_meta(self) -> dict[str, Any]:
        ft = self.finetune_info or self.state_from_checkpoint
        return dict(ft.get("meta") or {"layout": "transformers", "source": None, "revision": None, "license": None})

    def plain_model(self) -> Any:
        """The model to decode with: a LoRA model's base with its adapters injected (peft's wrapper unwrapped)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    # --- training -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """``init_locations``: a model trained from its architecture (not fine-tuned, not resumed) starts with
        smooth location-token embeddings (:func:`init_location_embeddings`)."""
        if self.hparams.init_locations and self.finetune_info is None and self.trainer.ckpt_path is None \
                and self.global_step == 0:
            n = init_location_embeddings(self.plain_model(), self.tokenizer)
            log.info("initialised %d location-token embeddings as sinusoids of the bin index", n)

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"florence_image": batch["pixels"], "text": (batch["prompt_ids"], batch["prompt_mask"])}

    # --- evaluation -----------------------------------------------------------------------------
    def generation_config(self) -> Any:
        from zoo.generation_hf import HFGenerationConfig

        kw = {**self.generation, "max_new_tokens": int(self.hparams.max_new_tokens),
              "num_beams": int(self.hparams.num_beams), "length_penalty": float(self.hparams.length_penalty)}
        if self.hparams.no_repeat_ngram_size:
            kw["no_repeat_ngram_size"] = int(self.hparams.no_repeat_ngram_size)
        return HFGenerationConfig(**kw)

    @torch.no_grad()
    def generate_tokens(self, batch: dict[str, Any], **overrides: Any) -> torch.Tensor:
        from zoo.generation_hf import hf_generate

        return hf_generate(self.plain_model(), self.model_inputs(batch), self.generation_config())

    def decode_outputs(self, tokens: torch.Tensor) -> list[str]:
        """Generated ids → Florence-2's raw text (``<s>``, ``</s>``, ``<pad>`` removed, location tokens kept)."""
        return self.tokenizer.decode_raw(tokens.tolist())

    def compute_metrics(self, stage: str, predictions: dict[Any, str]) -> dict[str, float]:
        dm = self.datamodule
        refs = self.scored_references(stage, dm.references(stage), predictions)
        preds = {k: predictions[k] for k in refs}
        if self.kind == "detection":
            from tasks.detection_metrics import detection_map

            sizes = dm.sizes(stage)
            return detection_map({k: boxes_of(t, sizes[k]) for k, t in preds.items()}, refs)
        if self.kind == "grounding":
            from tasks.detection_metrics import grounding_accuracy
            from zoo.imported.florence2 import BANNED_GROUNDING

            boxes = {k: boxes_of(t, (1.0, 1.0), BANNED_GROUNDING)["boxes"] for k, t in preds.items()}
            return grounding_accuracy(boxes, {k: r["box"] for k, r in refs.items()})
        if self.kind == "caption":
            from tasks.metrics import caption_scores

            scores = caption_scores({k: t.strip() for k, t in preds.items()}, refs)
            return {"cider": scores["cider"], "bleu4": scores["bleu4"]}
        from tasks.metrics import vqa_scores

        return {"vqa_acc": vqa_scores({k: t.strip() for k, t in preds.items()}, refs)["overall"]}

    def format_predictions(self, predictions: dict[Any, str]) -> list[dict[str, Any]]:
        if self.kind != "detection" or self.datamodule is None:
            return [{"id": k, "text": v} for k, v in predictions.items()]
        sizes = {k: v for stage in ("val", "test") if self.datamodule.has_split(stage)
                 for k, v in self.datamodule.sizes(stage).items()}
        out = []
        for k, text in predictions.items():
            found = boxes_of(text, sizes[k]) if sizes.get(k) else {"boxes": [], "labels": []}
            out += [{"image_id": k, "label": lab, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": 1.0}
                    for b, lab in zip(found["boxes"], found["labels"])]
        return out

    def write_samples(self, path: Path, stage: str) -> None:
        from tasks.visualize import save_grid

        s = self.samples.get(stage)
        if not s or self.datamodule is None or self.datamodule.preprocess is None:
            return
        pre = self.datamodule.preprocess
        texts = [_LOC.sub("▫", t) for t in s["predictions"]]
        save_grid([pre.denormalize(x) for x in s["pixels"]], texts, path)

    # --- checkpoints: Florence-2's tokenizer, decoding defaults and provenance ------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {"florence2": {"kind": self.kind, "generation": self.generation, "meta": self.source_meta}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.state_from_checkpoint = dict(state.get("florence2") or {})

    def checkpoint_meta(self) -> Any:
        from tasks.checkpoint import CheckpointMeta

        return CheckpointMeta(task=self.name, model_config=self.plain_model().cfg.to_dict(),
                              tokenizer=self.tokenizer.tok.to_str(), state=self.checkpoint_state(),
                              finetune=self.finetune_info)


__all__ = ["Florence2Task", "Florence2DataModule", "collate_florence", "expand_prompt", "train_florence_tokenizer",
           "florence2_bundle", "new_florence2", "init_location_embeddings", "boxes_of"]
