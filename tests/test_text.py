"""Text tokenizer: training, batched round-trip, save/load, loading a foreign tokenizer.json."""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from modalities.text import TextTokenizer

CORPUS = [f"a {c} {s} is to the left of a small {c2} circle" for c in ("red", "green", "blue")
          for s in ("square", "triangle") for c2 in ("yellow", "purple")] * 5


def test_train_and_roundtrip_batch():
    tok = TextTokenizer.train(CORPUS, vocab_size=500)
    texts = ["a red square is to the left of a small yellow circle", "blue triangle", "unseen wørds: 42!"]
    ids = tok.encode_batch(texts)
    assert all(0 <= i < tok.vocab_size for row in ids for i in row)
    assert tok.decode_batch(ids) == [t.lower() for t in texts]
    # frequent words became single tokens
    assert len(tok.encode("red square")) == 2


def test_truncation_and_type_check():
    tok = TextTokenizer.train(CORPUS, vocab_size=300)
    assert [len(x) for x in tok.encode_batch(["a red square is to the left"], max_len=3)] == [3]
    with pytest.raises(TypeError):
        tok.encode_batch("a single string")


def test_save_load_identical(tmp_path):
    tok = TextTokenizer.train(CORPUS, vocab_size=300)
    tok.save(tmp_path)
    again = TextTokenizer.from_file(tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert again.encode_batch(CORPUS[:5]) == tok.encode_batch(CORPUS[:5])
    assert TextTokenizer.from_str(tok.to_str()).encode("blue circle") == tok.encode("blue circle")


def test_load_any_tokenizer_json(tmp_path):
    raw = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.encode_batch(["hello world", "world foo"]) == [[0, 1], [1, 2]]


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        TextTokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        TextTokenizer.from_file(tmp_path)
