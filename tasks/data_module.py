"""What the sequence-to-sequence datamodules share: the text tokenizer, unified-vocabulary ids, the loaders."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from modalities.image import ImageConfig, ImagePreprocessor
from modalities.text import TextTokenizer
from tasks.resume import ResumableLoader, eval_generator, run_seed
from zoo.vocab import VocabLayout


class TextDataModule(L.LightningDataModule):
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

    def encode_text(self, texts: list[str], max_len: int) -> list[list[int]]:
        """Unified-vocabulary ids of ``texts``, each cut to ``max_len`` tokens (one batched tokenizer call)."""
        assert self.tokenizer is not None and self.layout is not None
        off = self.layout.text_start
        return [[t + off for t in ids] for ids in self.tokenizer.encode_batch(texts, max_len)]

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool, collate: Any = None) -> DataLoader:
        """Shuffled training batches drop the last partial one and resume exactly (:class:`ResumableLoader`);
        evaluation keeps every record."""
        kwargs = dict(batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate or self.collate,
                      persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
        if shuffle:
            return ResumableLoader(ds, seed=run_seed(), drop_last=True, **kwargs)
        return DataLoader(ds, shuffle=False, drop_last=False, generator=eval_generator(self.num_workers), **kwargs)


def image_preprocessor(model_cfg: Any, task: str) -> ImagePreprocessor:
    """The preprocessing of the model's image modality (``model_cfg`` is a model config or an image config)."""
    image_cfg = model_cfg.modalities.get("image") if hasattr(model_cfg, "modalities") else model_cfg
    if image_cfg is None:
        raise ValueError(f"this model has no image modality; {task} needs one")
    return ImagePreprocessor(ImageConfig(**image_cfg) if isinstance(image_cfg, dict) else image_cfg)
