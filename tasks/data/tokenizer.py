"""The text tokenizer a datamodule trains on its own data: a byte-level BPE cached next to the data."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from modalities.text import TextTokenizer


def load_or_train_bpe(path: str | Path, texts: Callable[[], list[str]] | None, vocab_size: int) -> TextTokenizer:
    """Load ``path``; when it does not exist, train a BPE of ``vocab_size`` on ``texts()`` and cache it there
    atomically (concurrent writers each write their own temp folder; the last ``os.replace`` wins)."""
    path = Path(path)
    if not path.is_file():
        if texts is None:
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        corpus = texts()
        if not corpus:
            raise ValueError(f"no training text to build the tokenizer {path} from")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = path.parent / f".tok-{path.stem}-{os.getpid()}"
        os.replace(TextTokenizer.train(corpus, vocab_size=vocab_size).save(tmp_dir), path)
        tmp_dir.rmdir()
    return TextTokenizer.from_file(path)
