"""Sensor-to-text task: activity metrics, the datamodule's pipeline and the task's evaluation hooks."""
import json

import numpy as np
import pytest
import torch

from modalities.sensor import IMU_CHANNELS, SensorRecording
from tasks.data.motion import MotionConfig, generate_recording
from tasks.data.sensor_formats import write_csv, write_manifest
from tasks.sensor_to_text import SensorTextDataModule, SensorToTextTask, activity_scores

SMALL = dict(n_train=24, n_val=6, n_test=6)


def test_activity_scores():
    truth = {1: ["walking", "sitting"], 2: ["running"], 3: ["lying", "standing"]}
    preds = {1: "the wearer walks, then sits down", 2: "someone walks", 3: "a person stands, then lies down"}
    s = activity_scores(preds, truth)
    assert s["activity_acc"] == pytest.approx(1 / 3)
    assert s["f1_walking"] == pytest.approx(2 / 3)  # tp 1, fp 1
    assert s["f1_sitting"] == 1.0 and s["f1_lying"] == 1.0 and s["f1_standing"] == 1.0
    assert s["f1_running"] == 0.0
    assert 0 < s["activity_f1"] < 1


@pytest.fixture()
def bound_dm(tmp_path):
    import zoo
    from tasks.cli.train import build_model
    from omegaconf import OmegaConf

    dm = SensorTextDataModule(str(tmp_path / "motion"), motion=SMALL, num_workers=0, batch_size=4,
                              descriptions_per_recording=2, tokenizer_vocab_size=300)
    dm.prepare_data()
    over = dm.model_overrides()
    model = build_model(OmegaConf.create({"name": "test-tiny", "overrides": {}}), dm.tokenizer.vocab_size, over)
    dm.bind(model.cfg, model.layout)
    dm.setup("fit")
    return dm, model


def test_datamodule_fits_statistics_and_batches(bound_dm):
    dm, model = bound_dm
    sensor = model.cfg.modalities["sensor"]
    assert sensor["channels"] == list(IMU_CHANNELS) and len(sensor["mean"]) == 6
    assert 5 < sensor["mean"][0] < 12  # acc_x carries most of gravity when upright
    b = next(iter(dm.train_dataloader()))
    values, valid = b["sensor"]
    assert values.shape[:2] == (4, 6) and valid.dtype == torch.bool and values.shape == valid.shape
    assert b["target_counts"].tolist() == [2, 2, 2, 2] and b["tgt_in"].shape[0] == 8
    assert abs(float(values[valid].mean())) < 1.0  # normalised
    ev = next(iter(dm.val_dataloader()))
    assert len(ev["ids"]) == 6 and "tgt_in" not in ev
    assert set(dm.references("val")) == set(ev["ids"]) == set(dm.activities("val"))
    task = SensorToTextTask(model, dm.tokenizer, max_new_tokens=6)
    tokens = task.generate_tokens(ev)
    texts = task.decode_outputs(tokens)
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts)
    assert task.loss(b).isfinite()


def test_other_rate_and_shuffled_columns_give_the_same_tokens(bound_dm, tmp_path):
    """A recording written at 100 Hz with shuffled columns goes through the same pipeline."""
    dm, _ = bound_dm
    rec50 = generate_recording(MotionConfig(), 1, 0)
    v = rec50["values"].astype(np.float64)
    t50 = np.arange(v.shape[1]) / 50.0
    # 100 Hz: the 50 Hz samples plus midpoints (linear), so that downsampling to 50 Hz can be checked
    t100 = np.arange(2 * v.shape[1] - 1) / 100.0
    v100 = np.stack([np.interp(t100, t50, ch) for ch in v])
    order = [4, 0, 5, 2, 1, 3]
    folder = tmp_path / "user"
    folder.mkdir()
    write_csv(folder / "r100.csv", v100[order], [IMU_CHANNELS[i] for i in order], t100)
    write_manifest(folder / "manifest_val.jsonl", [{"file": "r100.csv", "descriptions": rec50["descriptions"]}])
    user = SensorTextDataModule(str(folder), generate=None, test_file=None, num_workers=0,
                                tokenizer_path=str(dm.root / "tokenizer-bpe300.json"))
    user.bind(dm.sensor_cfg, dm.layout)
    user.setup("validate")
    (rec,) = user.recordings("val")
    assert list(rec.channels) == list(IMU_CHANNELS)  # chosen by name
    x100, ok = user.sensor_tokenizer(rec)
    x50, _ = dm.sensor_tokenizer(SensorRecording(rec50["values"]))
    assert ok.all() and x100.shape == x50.shape
    # the 3-tap box filter (anti-aliasing) over (midpoint, sample, midpoint) is [1/6, 2/3, 1/6] at 50 Hz
    k = np.array([1 / 6, 2 / 3, 1 / 6])
    smooth = np.stack([np.convolve(ch, k, mode="same") for ch in x50.numpy()])
    assert np.abs(x100.numpy() - smooth)[:, 2:-2].max() < 2e-3
    assert user.activities("val") == {"r100": [s["activity"] for s in rec50["segments"]]}


def test_predictions_format_and_samples(bound_dm, tmp_path):
    from tasks.sensor_to_text import plot_recordings

    dm, model = bound_dm
    task = SensorToTextTask(model, dm.tokenizer)
    out = task.format_predictions({"val-000001": "the wearer walks, then sits down"})
    assert out == [{"id": "val-000001", "description": "the wearer walks, then sits down",
                    "activities": ["walking", "sitting"]}]
    json.dumps(out)
    b = next(iter(dm.val_dataloader()))
    p = plot_recordings(*b["sensor"], ["a"] * 3, tmp_path / "samples.png")
    assert p.stat().st_size > 1000


def test_zoo_eval_on_user_csv_at_another_rate(tmp_path):
    """Train a few steps, then zoo-eval a folder of 100 Hz CSVs with shuffled columns (JSONL manifest)."""
    from tasks.cli.evaluate import evaluate
    from tests.conftest import compose
    from tests.test_eval import compose_eval
    from tasks.cli.train import train

    run = tmp_path / "run"
    train(compose(["experiment=sensor_motion", "model=test_tiny", "data.num_workers=0", "data.batch_size=4",
                   "data.tokenizer_vocab_size=300", f"data.root={tmp_path}/motion", "data.motion.n_train=16",
                   "data.motion.n_val=4", "data.motion.n_test=4", "task.max_new_tokens=6", "logger={}",
                   "trainer.max_epochs=1", "trainer.max_steps=2", "test=false"], run))
    folder = tmp_path / "user"
    folder.mkdir()
    rows = []
    for i in range(3):
        rec = generate_recording(MotionConfig(rate=100.0), 2, 900 + i)
        order = [3, 1, 5, 0, 4, 2]
        t = 7.0 + np.arange(rec["values"].shape[1]) / 100.0
        write_csv(folder / f"u{i}.csv", rec["values"][order], [IMU_CHANNELS[j] for j in order], t)
        rows.append({"file": f"u{i}.csv", "descriptions": rec["descriptions"], "activities": rec["segments"]})
    write_manifest(folder / "manifest_val.jsonl", rows)
    out = tmp_path / "eval"
    metrics = evaluate(compose_eval([f"ckpt={run}/checkpoints/last.ckpt", "data=motion", "data.generate=null",
                                     f"data.root={folder}", "data.test_file=null", "data.num_workers=0",
                                     "split=val"], out))
    preds = json.loads((out / "predictions.json").read_text())
    assert sorted(p["id"] for p in preds) == ["u0", "u1", "u2"]
    assert {"val/activity_acc", "val/bleu4", "val/cider"} <= set(metrics)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
