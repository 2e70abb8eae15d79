"""Image captioning: ``[image] what does the image describe?`` → caption text.

Holds the COCO-captions datamodule and the captioning task (CIDEr-D, BLEU-4).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from modalities.image import ImagePreprocessor
from modalities.text import TextTokenizer
from tasks.base import Seq2SeqTask
from tasks.data.coco import CaptionRecord, read_coco_captions
from tasks.data.collate import Seq2SeqCollator
from tasks.data_module import FileSplitsMixin, SplitInfo, TextDataModule, image_preprocessor
from zoo.task_specs import task_spec
from zoo.vocab import VocabLayout


class CaptionTrainSet(Dataset):
    """One item per image carrying up to ``captions_per_image`` of its captions (tokenised up front).

    The image is encoded once for all its captions, which makes an epoch over every caption several
    times cheaper than one item per (image, caption) pair. ``captions_per_image=1`` draws one caption
    at random per visit.
    """

    def __init__(self, paths: list[Path], ids: list[Any], targets: list[list[list[int]]], prompt: list[int],
                 preprocess: ImagePreprocessor, captions_per_image: int = 5):
        self.paths, self.ids, self.targets, self.prompt, self.preprocess = paths, ids, targets, prompt, preprocess
        self.k = captions_per_image

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        caps = self.targets[i]
        if len(caps) > self.k:
            pick = torch.randperm(len(caps))[: self.k].tolist()
            caps = [caps[j] for j in pick]
        return {"image": self.preprocess(self.paths[i]), "prompt": self.prompt, "targets": caps, "id": self.ids[i]}


class ImageEvalSet(Dataset):
    """One item per image (references are scored at epoch end)."""

    def __init__(self, records: list[CaptionRecord], prompt: list[int], preprocess: ImagePreprocessor):
        self.records, self.prompt, self.preprocess = records, prompt, preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        return {"image": self.preprocess(r.path), "prompt": self.prompt, "id": r.image_id}


class CaptionDataModule(FileSplitsMixin, TextDataModule):
    """COCO-captions data (``captions_{split}.json`` + images); generates Shapes on first use.

    Call :meth:`prepare_data` (dataset and tokenizer), then :meth:`bind` with the model's image config
    and vocabulary layout before the loaders are used.
    """

    def __init__(
        self,
        root: str,
        train_file: str = "captions_train.json",
        val_file: str = "captions_val.json",
        test_file: str | None = "captions_test.json",
        image_root: str | None = None,
        generate: str | None = "shapes",
        shapes: dict[str, Any] | None = None,
        tokenizer_path: str | None = None,
        tokenizer_vocab_size: int = 1024,
        batch_size: int = 16,
        captions_per_image: int = 5,
        eval_batch_size: int = 128,
        num_workers: int = 1,
        max_target_len: int = 32,
        prompt: str = task_spec("caption").prompt,
        val_limit: int | None = None,
        skip_bad: bool = False,
        check_files: str = "decode",
        allow_outside_root: bool = False,
    ):
        super().__init__()
        self.root = Path(root)
        self.image_root = Path(image_root) if image_root else self.root
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.generate, self.shapes_kwargs = generate, dict(shapes or {})
        self.tokenizer_path = tokenizer_path
        self.vocab_size = tokenizer_vocab_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        self.captions_per_image = captions_per_image
        self.num_workers, self.max_target_len, self.prompt_text = num_workers, max_target_len, prompt
        self.val_limit = val_limit
        self.skip_bad, self.check_files = skip_bad, check_files  # see tasks/data/validate.py
        self.allow_outside_root = allow_outside_root
        self.split_infos: dict[str, SplitInfo] = {}
        self.records: dict[str, list[CaptionRecord]] = {}
        self.tokenizer: TextTokenizer | None = None
        self.preprocess: ImagePreprocessor | None = None
        self.layout: VocabLayout | None = None
        self.collate = Seq2SeqCollator()

    # --- preparation --------------------------------------------------------------------------
    def _read(self, split: str) -> list[CaptionRecord]:
        """The split's records, validated up front (bad records raise, or are skipped with ``skip_bad``)."""
        if split not in self.records:
            from tasks.data.validate import Problems, confine_roots, filter_records

            path = self.root / self.files[split]
            problems = Problems(self.skip_bad, str(path))
            recs = read_coco_captions(path, self.image_root, problems=problems)
            recs = filter_records(recs, lambda r: r.path, lambda r: f"{path}: image id={r.image_id}",
                                  problems, self.check_files,
                                  confine_roots(self.allow_outside_root, self.root, self.image_root))
            self._keep(split, path, recs, problems)
        return self.records[split]

    def ensure_data(self) -> None:
        """Generate the embedded dataset on first use (``generate``)."""
        if self.generate == "shapes":
            from tasks.data.shapes import ShapesConfig, ensure_shapes

            ensure_shapes(self.root, ShapesConfig(**self.shapes_kwargs))
        elif self.generate:
            raise ValueError(f"unknown data generator {self.generate!r}; use 'shapes' or null")

    def prepare_data(self) -> None:
        self.ensure_data()
        for split, name in self.files.items():
            if name:
                self._read(split)  # validate every split now, before the long run
        self.load_tokenizer()

    tokenizer_kind = ""  # cached BPE file: tokenizer-{kind}bpe{vocab}.json

    def training_texts(self) -> list[str]:
        """Every text the model reads or writes in training (what the BPE is trained on)."""
        self.ensure_data()
        return [self.prompt_text, *(c for r in self._read("train") for c in r.captions)]

    def tokenizer_file(self) -> Path:
        return self.root / f"tokenizer-{self.tokenizer_kind}bpe{self.vocab_size}.json"

    def model_overrides(self) -> dict[str, Any]:
        """Model-config entries this data dictates (none for images: the model's image config rules)."""
        return {}

    def bind(self, model_cfg: Any, layout: VocabLayout, tokenizer: TextTokenizer | None = None) -> None:
        """Attach the model's image preprocessing and vocabulary (and optionally a pretrained tokenizer)."""
        self.preprocess = image_preprocessor(model_cfg, "captioning")
        self.attach(layout, tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.preprocess is None or self.layout is None:
            raise RuntimeError("CaptionDataModule.bind(image_cfg, layout) must be called before setup()")
        self.load_tokenizer()
        self.prompt_ids = self.encode_text([self.prompt_text], self.max_target_len)[0]

    # --- datasets -----------------------------------------------------------------------------
    def references(self, stage: str) -> dict[Any, list[str]]:
        return {r.image_id: r.captions for r in self._eval_records(stage)}

    def _eval_records(self, stage: str) -> list[CaptionRecord]:
        records = self._read(stage)
        return records[: self.val_limit] if self.val_limit else records

    def train_dataloader(self) -> DataLoader:
        recs = self._read("train")
        flat = iter(self.encode_text([c for r in recs for c in r.captions], self.max_target_len,  # one tokenizer call
                                     "training captions (data.max_target_len)",
                                     [f"{self.split_infos['train'].source}: image id={r.image_id}"
                                      for r in recs for _ in r.captions]))
        targets = [[next(flat) for _ in r.captions] for r in recs]
        ds = CaptionTrainSet([r.path for r in recs], [r.image_id for r in recs], targets, self.prompt_ids,
                             self.preprocess, self.captions_per_image)
        return self._loader(ds, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(ImageEvalSet(self._eval_records("val"), self.prompt_ids, self.preprocess),
                            self.eval_batch_size, shuffle=False)

    def has_split(self, stage: str) -> bool:
        """Whether the data has a ``stage`` split (``data.test_file: null``: none to test on)."""
        return bool(self.files.get(stage))

    def test_dataloader(self) -> DataLoader:
        if not self.files["test"]:
            raise ValueError("this dataset has no test split (data.test_file is null)")
        return self._loader(ImageEvalSet(self._eval_records("test"), self.prompt_ids, self.preprocess),
                            self.eval_batch_size, shuffle=False)


class CaptionTask(Seq2SeqTask):
    """Captioning: image + instruction → text; scored with CIDEr-D and BLEU-4."""

    name = "caption"
    spec = task_spec("caption")
    monitor_metric = "cider"

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"image": batch["image"], "text": (batch["prompt_ids"], batch["prompt_mask"])}

    def compute_metrics(self, stage: str, predictions: dict[Any, str]) -> dict[str, float]:
        from tasks.metrics import caption_scores

        refs = self.scored_references(stage, self.datamodule.references(stage), predictions, "images")
        scores = caption_scores({k: predictions[k] for k in refs}, refs)
        return {"cider": scores["cider"], "bleu4": scores["bleu4"], "rouge_l": scores["rouge_l"]}

    def format_predictions(self, predictions: dict[Any, str]) -> list[dict[str, Any]]:
        return [{"image_id": k, "caption": v} for k, v in predictions.items()]

    def write_samples(self, path: Path, stage: str) -> None:
        from tasks.visualize import save_grid

        s = self.samples.get(stage)
        if not s:
            return
        pre = self.datamodule.preprocess
        images = [pre.denormalize(x) for x in s["image"]]
        save_grid(images, s["predictions"], path, references=self.sample_references(stage))
