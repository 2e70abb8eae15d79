"""A modality registered outside the library (here: a toy 1-D "audio" patch tokenizer, in this file only) is built,
batched, trained, saved and loaded through the modality registry with no library change; registering it changes
no other model's shapes; the saved-config schemas derived from the registry stay strict."""
import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from modalities.base import ModalityConfig, get_modality, is_pos, register_modality, unregister_modality
from modalities.text import TextTokenizer
from tasks.data.collate import Seq2SeqCollator
from zoo.config import ModelConfig
from zoo.loading import MODALITY_SCHEMAS, ModelFolderError, UnsafeModelError, model_config_from_dict
from zoo.model import UnifiedSeq2Seq
from zoo.pretrained import Pretrained
from zoo.vocab import PAD_ID


# --- the toy modality -------------------------------------------------------------------------------
@dataclass
class AudioConfig(ModalityConfig):
    """A waveform cut into fixed patches of ``patch`` samples."""

    patch: int = 8
    max_patches: int = 16
    gain: float = 1.0


class AudioPatcher:
    """Waveform → float tensor ``[T]`` (at most ``max_patches * patch`` samples, times ``gain``)."""

    def __init__(self, cfg: AudioConfig):
        self.cfg = cfg

    def __call__(self, wave) -> torch.Tensor:
        x = torch.as_tensor(wave, dtype=torch.float32).flatten()[: self.cfg.max_patches * self.cfg.patch]
        return x * self.cfg.gain


def collate_audio(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad waveforms → ``(values [B,T], valid [B,T])``."""
    t = max(len(x) for x in items)
    values, valid = torch.zeros(len(items), t), torch.zeros(len(items), t, dtype=torch.bool)
    for i, x in enumerate(items):
        values[i, : len(x)], valid[i, : len(x)] = x, True
    return values, valid


class AudioEmbedder(nn.Module):
    """Patches → linear projection + learned positions; a patch is real when any of its samples is."""

    def __init__(self, cfg: AudioConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.patch, d_model)
        self.pos = nn.Parameter(torch.randn(cfg.max_patches, d_model) * 0.02)

    def forward(self, values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.cfg.patch
        n = math.ceil(values.shape[1] / p)
        values = F.pad(values, (0, n * p - values.shape[1]))
        valid = F.pad(valid, (0, n * p - valid.shape[1]))
        x = self.proj(values.view(len(values), n, p)) + self.pos[:n]
        return x, valid.view(len(valid), n, p).any(-1)


@pytest.fixture(scope="module", autouse=True)
def audio():
    """The toy is registered for this module only (collecting it registers nothing; other modules see mmzoo's own
    modalities)."""
    spec = register_modality("toy_audio", config=AudioConfig, embedder=AudioEmbedder, preprocess=AudioPatcher,
                             collate=collate_audio, typed=True, field_checks={"patch": is_pos, "max_patches": is_pos})
    yield spec
    unregister_modality("toy_audio")

TEXTS = ["a low hum", "a sharp click then silence", "two short beeps", "a rising whistle"] * 8


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(TEXTS, vocab_size=120)


def _model(tok: TextTokenizer) -> UnifiedSeq2Seq:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64, max_positions=64,
                      vocab={"text_size": tok.vocab_size}, modalities={"toy_audio": {"patch": 8, "max_patches": 16}})
    return UnifiedSeq2Seq(cfg)


def _batch(model: UnifiedSeq2Seq, tok: TextTokenizer, pre) -> dict:
    g = torch.Generator().manual_seed(0)
    off = model.layout.text_start
    samples = [{"toy_audio": pre(torch.randn(int(n), generator=g)), "prompt": [off + t for t in tok.encode("describe")],
                "target": [off + t for t in tok.encode(TEXTS[i])], "id": f"clip{i}"}
               for i, n in enumerate((40, 128, 77, 9))]
    return Seq2SeqCollator()(samples)


def _segments(batch: dict) -> dict:
    return {"toy_audio": batch["toy_audio"], "text": (batch["prompt_ids"], batch["prompt_mask"])}


def test_toy_modality_trains_saves_and_loads(audio, tok, tmp_path):
    model = _model(tok)
    assert model.cfg.type_index["toy_audio"] == 4 and model.type_embed.weight.shape[0] == 5  # the next free row
    pre = audio.preprocessor({"patch": 8, "max_patches": 16})
    batch = _batch(model, tok, pre)
    values, valid = batch["toy_audio"]
    assert values.shape == (4, 128) and valid.sum(1).tolist() == [40, 128, 77, 9]  # padded by the toy collate
    assert batch["ids"] == ["clip0", "clip1", "clip2", "clip3"]

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(3):
        logits = model(_segments(batch), batch["tgt_in"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=PAD_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    assert model.embedders["toy_audio"].proj.weight.grad is not None  # the toy embedder is trained

    model.eval()
    folder = Pretrained(model, tok, tasks={}).save_pretrained(tmp_path / "toy-audio-model")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["modalities"]["toy_audio"] == {"patch": 8, "max_patches": 16, "gain": 1.0}
    assert saved["type_index"] == {"text": 0, "image": 1, "image_codes": 2, "sensor": 3, "toy_audio": 4}
    loaded = Pretrained.from_folder(folder)
    with torch.no_grad():
        want = model(_segments(batch), batch["tgt_in"])
        batch2 = _batch(loaded.model, loaded.tokenizer, loaded.preprocessor("toy_audio"))
        got = loaded.model(_segments(batch2), batch2["tgt_in"])
    assert torch.equal(batch2["toy_audio"][0], batch["toy_audio"][0])
    assert torch.equal(got, want)


def test_registering_a_modality_changes_no_other_shape(audio):
    assert get_modality("toy_audio") is audio
    model = zoo.create_model("test-tiny")
    assert model.type_embed.weight.shape[0] == 4
    assert model.cfg.type_index == {"text": 0, "image": 1, "image_codes": 2, "sensor": 3}
    # a config saved before type_index existed gets the legacy rows
    d = {k: v for k, v in model.cfg.to_dict().items() if k != "type_index"}
    assert model_config_from_dict(d).type_index == model.cfg.type_index


def test_saved_toy_config_is_checked(tok):
    cfg = _model(tok).cfg.to_dict()
    with pytest.raises(UnsafeModelError, match="modalities.toy_audio.shell"):
        model_config_from_dict({**cfg, "modalities": {"toy_audio": {"patch": 8, "shell": "rm"}}})
    with pytest.raises(ModelFolderError, match="modalities.toy_audio.patch"):
        model_config_from_dict({**cfg, "modalities": {"toy_audio": {"patch": 0}}})
    with pytest.raises(ModelFolderError, match="modalities.toy_audio.gain"):
        model_config_from_dict({**cfg, "modalities": {"toy_audio": {"gain": "loud"}}})
    with pytest.raises(UnsafeModelError, match="unknown modality 'modalities.speech'"):
        model_config_from_dict({**cfg, "modalities": {"speech": {}}})
    with pytest.raises(ValueError, match="already registered"):
        register_modality("image", config=AudioConfig, embedder=AudioEmbedder)


@pytest.mark.parametrize("name, key, bad", [
    ("image", "image_size", 0), ("image", "mean", [0.5, 0.5]), ("image", "out_index", True),
    ("image", "backbone_kwargs", []), ("image", "pretrained", 3), ("sensor", "patch_len", 0),
    ("sensor", "channels", "ax"), ("sensor", "sample_rate", float("nan")), ("sensor", "antialias", 1),
    ("sensor", "mean", [1, "x"]), ("florence_image", "tower", "../x"), ("florence_image", "depths", [1, 0, 1, 1]),
    ("florence_image", "window_size", 2**11), ("florence_image", "image_size", 2**15),
])
def test_registry_schemas_refuse_bad_values(name, key, bad):
    """The schemas derived from the config dataclasses keep the bounds of the former hand-written ones."""
    schema = MODALITY_SCHEMAS[name]
    assert not schema[key](bad)
    assert set(schema) == set(get_modality(name).config.__dataclass_fields__)


def test_old_fixture_loads_with_the_toy_registered():
    from tests.test_old_model import test_old_model_loads_with_identical_outputs

    assert "toy_audio" in MODALITY_SCHEMAS  # registered while the old model loads
    test_old_model_loads_with_identical_outputs()


def test_unregister_keeps_builtins():
    unregister_modality("image")
    assert get_modality("image").config.__name__ == "ImageConfig"
