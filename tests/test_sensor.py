"""Sensor tokenizer: shapes and masks, normalisation round-trip, resampling, bad input errors."""
import numpy as np
import pytest
import torch

from modalities.sensor import (SensorConfig, SensorDataError, SensorEmbedder, SensorRecording, SensorTokenizer,
                               pad_sensor_batch, resample)

CH = ["a", "b", "c"]


def _fitted(**kw) -> SensorTokenizer:
    cfg = SensorConfig(channels=CH, sample_rate=50.0, patch_len=10, patch_stride=5, max_len=200, **kw)
    rng = np.random.default_rng(0)
    recs = [SensorRecording(rng.normal([[1.0], [-2.0], [5.0]], [[2.0], [0.5], [3.0]], (3, 150)), source=f"r{i}")
            for i in range(4)]
    return SensorTokenizer(SensorTokenizer(cfg).fit(recs))


def test_fit_and_normalisation_round_trip():
    tok = _fitted()
    assert np.allclose(tok.cfg.mean, [1.0, -2.0, 5.0], atol=0.15)
    assert np.allclose(tok.cfg.std, [2.0, 0.5, 3.0], rtol=0.1)
    raw = np.random.default_rng(1).normal(size=(3, 120)) * 4
    x, valid = tok(SensorRecording(raw))
    assert x.dtype == torch.float32 and valid.all() and x.shape == (3, 120)
    assert np.allclose(tok.denormalize(x), raw, atol=1e-4)
    cfg2 = SensorConfig(**tok.cfg.to_dict())  # the config (with statistics) survives a dict round trip
    assert cfg2 == tok.cfg


def test_channels_selected_by_name_in_any_order():
    tok = _fitted()
    raw = np.random.default_rng(2).normal(size=(3, 60))
    x1, _ = tok(SensorRecording(raw, channels=CH))
    x2, _ = tok(SensorRecording(raw[[2, 0, 1]], channels=["c", "a", "b"]))
    x3, _ = tok(SensorRecording(np.vstack([raw[[1]], np.zeros((1, 60)), raw[[2, 0]]]), channels=["b", "x", "c", "a"]))
    assert torch.equal(x1, x2) and torch.equal(x1, x3)


def test_isolated_nan_is_masked_not_propagated():
    tok = _fitted()
    raw = np.ones((3, 100))
    raw[1, 40] = np.nan
    raw[2, 7] = np.inf
    x, valid = tok(SensorRecording(raw))
    assert torch.isfinite(x).all()
    assert (~valid).sum() == 2 and not valid[1, 40] and not valid[2, 7]
    assert x[1, 40] == 0 and x[2, 7] == 0
    # the neighbours keep their values
    assert torch.allclose(x[1, 39], x[1, 41]) and x[1, 39] != 0


def test_resampling_known_sine_wave():
    f = 1.5  # Hz
    for rate_in in (20.0, 33.0, 200.0):
        t = np.arange(int(6 * rate_in)) / rate_in
        x = np.sin(2 * np.pi * f * t)[None]
        out, ok = resample(x, np.isfinite(x), t, 50.0)
        grid = np.arange(out.shape[1]) / 50.0
        assert ok.all() and abs(grid[-1] - t[-1]) < 0.02
        err = np.abs(out[0] - np.sin(2 * np.pi * f * grid))[5:-5]
        assert err.max() < 0.03, (rate_in, err.max())


def test_irregular_timestamps_resampled_through_tokenizer():
    tok = _fitted()
    rng = np.random.default_rng(3)
    t = np.cumsum(rng.uniform(0.01, 0.03, 150))  # irregular, ~50 Hz on average
    raw = np.stack([np.sin(2 * np.pi * t), np.cos(2 * np.pi * t), t])
    x, valid = tok(SensorRecording(raw, timestamps=t))
    n = int(np.floor((t[-1] - t[0]) * 50 + 1e-6)) + 1
    assert x.shape == (3, n) and valid.all()
    back = tok.denormalize(x)
    grid = t[0] + np.arange(n) / 50.0
    assert np.abs(back[0] - np.sin(2 * np.pi * grid)).max() < 0.01


def test_nan_next_to_resampled_point_is_masked_locally():
    t = np.arange(100) / 100.0
    x = np.sin(t)[None].repeat(2, 0)
    x[0, 50] = np.nan
    out, ok = resample(x, np.isfinite(x), t, 50.0, antialias=False)
    assert np.isfinite(out).all() and ok[1].all()
    assert 1 <= (~ok[0]).sum() <= 2


def test_embedder_shapes_and_masks():
    tok = _fitted()
    rng = np.random.default_rng(4)
    items = [tok(SensorRecording(rng.normal(size=(3, n)))) for n in (30, 57, 120)]
    items[1][1][:, 20:40] = False  # a run of missing values: patches 4..6 (samples 20..39) are fully invalid
    values, valid = pad_sensor_batch(items)
    assert values.shape == (3, 3, 120) and valid.shape == (3, 3, 120)
    assert not valid[0, :, 30:].any() and valid[0, :, :30].all()
    emb = SensorEmbedder(tok.cfg, d_model=16)
    x, mask = emb(values, valid)
    n = tok.cfg.num_patches(120)  # (120 - 10) / 5 + 1 = 23
    assert n == 23 and x.shape == (3, n, 16) and mask.shape == (3, n)
    assert mask[2].all()
    assert mask[0].tolist() == [s < 30 for s in range(0, 5 * n, 5)]  # patch starting at s holds sample s
    assert mask[1, 3] and not mask[1, 4:7].any() and mask[1, 7]
    x.sum().backward()
    assert emb.proj.weight.grad is not None and torch.isfinite(emb.proj.weight.grad).all()


def test_embedder_masks_invalid_values_in_the_values():
    tok = _fitted()
    emb = SensorEmbedder(tok.cfg, d_model=8).eval()
    v = torch.randn(1, 3, 40)
    valid = torch.ones_like(v, dtype=torch.bool)
    valid[0, 1, 12] = False
    v2 = v.clone()
    v2[0, 1, 12] = float("nan")
    a, _ = emb(v, valid)
    b, _ = emb(v2, valid)
    assert torch.isfinite(b).all()
    c, _ = emb(v.masked_fill(~valid, 0), valid)
    assert torch.allclose(a, c) and torch.allclose(b, c)


@pytest.mark.parametrize("values, kwargs, match", [
    (np.zeros((4, 50)), {}, "wrong channel count"),
    (np.zeros((3, 0)), {}, "empty recording"),
    (np.full((3, 50), np.nan), {}, "all values are NaN"),
    (np.array([["1", "x", "2"]] * 3), {}, "non-numeric"),
    (np.zeros((3, 50)), {"channels": ["a", "b", "z"]}, r"missing channel\(s\) \['c'\]"),
    (np.zeros((3, 5)), {"timestamps": np.array([0, 1, 1, 2, 3.0])}, "not strictly increasing at row 2"),
    (np.zeros((3, 500)), {}, "exceed max_len"),
    (np.zeros(50), {}, "expected values"),
])
def test_bad_input_errors_name_the_record(values, kwargs, match):
    tok = _fitted()
    with pytest.raises(SensorDataError, match=match) as e:
        tok(SensorRecording(values, source="walk_042.csv", **kwargs))
    assert "walk_042.csv" in str(e.value)


def test_unfitted_tokenizer_and_bad_config():
    tok = SensorTokenizer(SensorConfig(channels=CH))
    with pytest.raises(RuntimeError, match="fit"):
        tok(SensorRecording(np.zeros((3, 10))))
    with pytest.raises(ValueError, match="patch_stride"):
        SensorConfig(patch_len=5, patch_stride=10)
    with pytest.raises(ValueError, match="mean has 2 values"):
        SensorConfig(channels=CH, mean=[0, 0], std=[1, 1])


def test_model_with_sensor_modality_encodes():
    import zoo

    tok = _fitted()
    model = zoo.create_model("test-tiny", modalities={"sensor": tok.cfg.to_dict()})
    values, valid = pad_sensor_batch([tok(SensorRecording(np.random.randn(3, n))) for n in (40, 90)])
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    memory, mask = model.encode({"sensor": (values, valid), "text": (ids, ids > 0)})
    assert memory.shape == (2, tok.cfg.num_patches(90) + 3, model.cfg.d_model)
    assert mask[0].sum() < mask[1].sum()
