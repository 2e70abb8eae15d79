"""Where the image tokens' 2-D positions join the features: before the embedder's LayerNorm (older models, the
default) or after it (``ImageConfig.position="after_norm"``), saved with the model and checked on load."""
import json

import pytest
import torch

from modalities.image import ImageConfig, ImageEmbedder
from modalities.text import TextTokenizer
from zoo.config import ModelConfig
from zoo.loading import ModelFolderError
from zoo.model import UnifiedSeq2Seq
from zoo.pretrained import Pretrained

IMAGE = {"backbone": "patch:8", "image_size": 32, "backbone_kwargs": {"embed_dim": 16}}


def _embedder(position: str) -> ImageEmbedder:
    torch.manual_seed(0)
    return ImageEmbedder(ImageConfig(**IMAGE, position=position), d_model=32).eval()


def test_after_norm_adds_the_positions_to_normalised_features():
    emb = _embedder("after_norm")
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        x, mask = emb(pixels)
        pos = (emb.row_pos + emb.col_pos).flatten(0, 1)  # [16, d]
        features = x - pos
    assert x.shape == (2, 16, 32) and bool(mask.all())
    # what is left after removing the positions is exactly LayerNorm's output: zero mean, unit variance per token
    assert torch.allclose(features.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(features.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3)
    # and the positions are not small beside the features (the before_norm init leaves them at ~2 % of the norm)
    assert pos.norm(dim=-1).mean() > 0.3 * features.norm(dim=-1).mean()


def test_before_norm_is_the_default_and_normalises_features_and_positions_together():
    assert ImageConfig().position == "before_norm"
    emb = _embedder("before_norm")
    with torch.no_grad():
        x, _ = emb(torch.rand(2, 3, 32, 32))
    assert torch.allclose(x.mean(-1), torch.zeros(2, 16), atol=1e-5)  # the LayerNorm comes last


def test_position_is_saved_and_reloaded_with_identical_outputs(tmp_path):
    folder, loaded = _save_and_reload(tmp_path, {"position": "after_norm"})
    assert json.loads((folder / "config.json").read_text())["modalities"]["image"]["position"] == "after_norm"
    assert loaded.embedders["image"].cfg.position == "after_norm"


def _save_and_reload(tmp_path, image: dict) -> tuple:
    """Save a micro model with these image settings and load it back: the outputs must be identical."""
    tok = TextTokenizer.train(["a red circle", "a blue square on the left"] * 8, vocab_size=80)
    torch.manual_seed(0)
    model = UnifiedSeq2Seq(ModelConfig(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64,
                                       max_positions=64, vocab={"text_size": tok.vocab_size},
                                       modalities={"image": {**IMAGE, **image}})).eval()
    folder = Pretrained(model, tok, tasks={}).save_pretrained(tmp_path / "m")
    loaded = Pretrained.from_folder(folder).model
    pixels, ids = torch.rand(2, 3, 32, 32), torch.randint(4, 40, (2, 5))
    segments = {"image": pixels, "text": (ids, torch.ones_like(ids, dtype=torch.bool))}
    with torch.no_grad():
        assert torch.equal(loaded(segments, ids), model(segments, ids))
    return folder, loaded

    cfg = json.loads((folder / "config.json").read_text())
    cfg["modalities"]["image"]["position"] = "after_the_stem"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="position"):
        Pretrained.from_folder(folder)


def test_unknown_position_is_refused():
    with pytest.raises(ValueError, match="before_norm.*after_norm"):
        ImageConfig(position="everywhere")


def test_sincos_positions_are_fixed_monotone_and_saved(tmp_path):
    from modalities.image import sincos_2d

    with pytest.raises(ValueError, match="position_encoding"):
        ImageConfig(**IMAGE, position_encoding="rope")
    row, col = sincos_2d(4, 4, 32)
    assert row.shape == (4, 1, 32) and col.shape == (1, 4, 32)
    assert torch.all(row[:, 0, 16:] == 0) and torch.all(col[0, :, :16] == 0)  # rows and columns in separate halves
    assert torch.all(row[1:, 0, 0] > row[:-1, 0, 0]) and torch.all(col[0, 1:, 16] > col[0, :-1, 16])  # monotone
    cells = (row + col).flatten(0, 1)
    assert torch.cdist(cells, cells).add(torch.eye(16) * 9).min() > 0.5  # every cell differs from every other

    torch.manual_seed(0)
    emb = ImageEmbedder(ImageConfig(**IMAGE, position="after_norm", position_encoding="sincos"), d_model=32)
    assert not any("pos" in n for n, _ in emb.named_parameters()) and not any("pos" in k for k in emb.state_dict())
    _, loaded = _save_and_reload(tmp_path, {"position": "after_norm", "position_encoding": "sincos"})
    assert loaded.embedders["image"].cfg.position_encoding == "sincos"
