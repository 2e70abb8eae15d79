"""Text modality: a byte-level BPE tokenizer built on Hugging Face ``tokenizers``.

The tokenizer returns *raw* ids in ``[0, vocab_size)``; the model's vocabulary layout maps them into
the unified id space. Text tokens are embedded by the model's shared (tied) token embedding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from modalities.base import register_modality

TOKENIZER_FILE = "tokenizer.json"


def read_text_file(path: str | Path, error: type[Exception] = ValueError) -> str:
    """The UTF-8 text of ``path`` (a leading BOM is dropped); bytes that are not UTF-8 raise ``error`` naming
    the file, the line and the column of the first bad byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at line {line}, column {col} "
                    f"(byte offset {e.start}); save the file as UTF-8") from None


class TextTokenizer:
    """Batched encode/decode around a ``tokenizers.Tokenizer``; trainable, saveable, loadable."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 1024,
        min_frequency: int = 2,
        lowercase: bool = True,
    ) -> "TextTokenizer":
        """Train a byte-level BPE on ``texts``."""
        tok = Tokenizer(models.BPE())
        if lowercase:
            tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        else:
            tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        """Load any ``tokenizer.json`` (a file, or a folder that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises bare Exceptions
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e

    @classmethod
    def from_str(cls, data: str) -> "TextTokenizer":
        return cls(Tokenizer.from_str(data))

    def to_str(self) -> str:
        return self.tok.to_str()

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / TOKENIZER_FILE
        tmp = path.with_suffix(".json.tmp")
        self.tok.save(str(tmp))
        tmp.replace(path)
        return path

    # --- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str], max_len: int | None = None) -> list[list[int]]:
        """Encode texts to raw ids, truncated to ``max_len`` tokens if given."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of strings, got a single str")
        encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
        ids = [e.ids for e in encs]
        if max_len is not None:
            ids = [x[:max_len] for x in ids]
        return ids

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        return self.encode_batch([text], max_len)[0]

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [s.strip() for s in self.tok.decode_batch([list(map(int, x)) for x in ids])]

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_batch([ids])[0]


# text segments use the model's shared token embedding (no config or embedder of their own)
register_modality("text", typed=True, legacy_type_index=0)
