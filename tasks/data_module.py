"""What the sequence-to-sequence datamodules share: the text tokenizer, unified-vocabulary ids, the loaders."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from modalities.image import ImageConfig, ImagePreprocessor
from modalities.text import TextTokenizer
from tasks.runtime.resume import ResumableLoader, eval_generator, run_seed
from zoo.task_specs import unified_text_ids
from zoo.vocab import VocabLayout

log = logging.getLogger(__name__)


@dataclass
class SplitInfo:
    """What a split holds after validation: read by the pre-flight checks (:mod:`tasks.cli.preflight`)."""

    source: str  # the file(s) the split comes from
    records: int  # usable records
    skipped: list[str] = field(default_factory=list)  # why each record skipped under data.skip_bad was bad
    batches: int | None = None  # training batches per epoch (train split), before DDP sharding
    units: int | None = None  # items the training loader deals out (records, or images for grouped VQA)

    def skip_note(self) -> str:
        if not self.skipped:
            return ""
        return f" ({len(self.skipped)} bad record(s) skipped with data.skip_bad=true, e.g. {self.skipped[0]})"


def empty_split_error(info: SplitInfo, split: str) -> str:
    """The message for a split with no usable record."""
    return f"{info.source}: the {split} split has no usable records{info.skip_note()}"


class TaskDataModule(L.LightningDataModule):
    """Base of every mmzoo datamodule: the hooks ``zoo-train``, ``zoo-eval`` and the tasks call (defaults for
    data that does not need them)."""

    #: a multi-task datamodule's parts by task name; empty for a single task's data
    subs: Mapping[str, TaskDataModule] = MappingProxyType({})
    #: evaluation batch size (the pre-flight checks use it with ``trainer.limit_val_batches``)
    eval_batch_size: int | None = None

    def model_overrides(self) -> dict[str, Any]:
        """Model config fields the data decides (e.g. the image size, a sensor's channels); none by default."""
        return {}

    def bind(self, model_cfg: Any, layout: VocabLayout, tokenizer: TextTokenizer | None = None) -> None:
        """Take the model's config and vocabulary layout (and a pretrained model's tokenizer) before the loaders
        are used."""
        raise NotImplementedError(f"{type(self).__name__} does not bind to a unified model")

    def references(self, stage: str) -> dict[Any, Any] | None:
        """Each ``stage`` record's reference(s) by record id, for scoring; ``None``: the data has none."""
        return None

    def has_split(self, split: str) -> bool:
        """Whether ``split`` has data configured (``zoo-train`` skips testing without a test split)."""
        return True


class TextDataModule(TaskDataModule):
    """Base of the caption, VQA, text-to-image and sensor-to-text datamodules.

    A subclass sets ``root``, ``tokenizer_path``, ``vocab_size``, ``num_workers`` and ``collate`` in its
    ``__init__`` and implements :meth:`training_texts`. The text tokenizer is then ``tokenizer_path`` when
    given, else a BPE trained on :meth:`training_texts` and cached under ``root`` (:meth:`tokenizer_file`).
    """

    root: Path
    tokenizer_path: str | None = None
    vocab_size: int = 1024
    num_workers: int = 1
    collate: Any = None
    tokenizer: TextTokenizer | None = None
    layout: VocabLayout | None = None

    def training_texts(self) -> list[str]:
        """Every text the model reads or writes in training (what the BPE is trained on)."""
        raise NotImplementedError

    def tokenizer_file(self) -> Path:
        """Where the BPE trained on this data is cached."""
        return self.root / f"tokenizer-bpe{self.vocab_size}.json"

    def load_tokenizer(self) -> TextTokenizer:
        """The text tokenizer: the given file, or a BPE trained on :meth:`training_texts` (cached)."""
        if self.tokenizer is None:
            from tasks.data.tokenizer import load_or_train_bpe

            path = self.tokenizer_path or self.tokenizer_file()
            self.tokenizer = load_or_train_bpe(path, None if self.tokenizer_path else self.training_texts,
                                               self.vocab_size)
        return self.tokenizer

    def attach(self, layout: VocabLayout, tokenizer: TextTokenizer | None = None) -> None:
        """Take the model's vocabulary layout (and a pretrained model's tokenizer, when given)."""
        self.layout = layout
        if tokenizer is not None:
            self.tokenizer = tokenizer

    def encode_text(self, texts: list[str], max_len: int, what: str | None = None,
                    names: Sequence[str] | None = None) -> list[list[int]]:
        """Unified-vocabulary ids of ``texts``, each cut to ``max_len`` tokens (one batched tokenizer call).

        With ``what`` (e.g. ``"questions (data.max_question_len)"``) a text longer than ``max_len`` tokens is
        logged as a warning: how many were cut, and the longest with its token count and its record
        (``names[i]``)."""
        assert self.tokenizer is not None and self.layout is not None
        ids = self.tokenizer.encode_batch(texts, None if what else max_len)
        if what:
            long = [i for i, x in enumerate(ids) if len(x) > max_len]
            if long:
                worst = max(long, key=lambda i: len(ids[i]))
                who = f", {names[worst]}," if names else ""
                log.warning("%d of %d %s exceed the limit of %d tokens and are cut to it; the longest%s has %d "
                            "tokens", len(long), len(ids), what, max_len, who, len(ids[worst]))
                ids = [x[:max_len] for x in ids]
        return unified_text_ids(ids, self.layout)

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool, collate: Any = None) -> DataLoader:
        """Shuffled training batches drop the last partial one and resume exactly (:class:`ResumableLoader`);
        evaluation keeps every record."""
        kwargs = dict(batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate or self.collate,
                      persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
        if shuffle:
            return ResumableLoader(ds, seed=run_seed(), drop_last=True, **kwargs)
        return DataLoader(ds, shuffle=False, drop_last=False, generator=eval_generator(self.num_workers), **kwargs)

    def split_info(self, split: str) -> SplitInfo | None:
        """The split's :class:`SplitInfo` (``None``: the split is not configured). Subclasses implement it."""
        return None


class FileSplitsMixin:
    """``split_info`` for datamodules with one file per split (``self.files``) read by ``self._read(split)``,
    which fills ``self.split_infos``; the train split's batch count uses ``self.batch_size``."""

    def _keep(self, split: str, path: Any, recs: list, problems: Any) -> None:
        """Log the split's skipped records, record its :class:`SplitInfo` and its records; an empty train split
        is an error."""
        from tasks.data.coco import DataError

        problems.log()
        self.split_infos[split] = info = SplitInfo(str(path), len(recs), list(problems.messages))
        if split == "train" and not recs:
            raise DataError(f"{empty_split_error(info, split)}: nothing to train on")
        self.records[split] = recs

    def split_info(self, split: str) -> SplitInfo | None:
        if not self.files.get(split):
            return None
        recs = self._read(split)
        info = self.split_infos[split]
        if split == "train":
            info.units, info.batches = len(recs), len(recs) // self.batch_size
        return info


def image_preprocessor(model_cfg: Any, task: str) -> ImagePreprocessor:
    """The preprocessing of the model's image modality (``model_cfg`` is a model config or an image config)."""
    image_cfg = model_cfg.modalities.get("image") if hasattr(model_cfg, "modalities") else model_cfg
    if image_cfg is None:
        raise ValueError(f"this model has no image modality; {task} needs one")
    return ImagePreprocessor(ImageConfig(**image_cfg) if isinstance(image_cfg, dict) else image_cfg)
