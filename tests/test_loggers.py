"""logger=csv|tensorboard|wandb|mlflow|comet|aim|many_loggers: configs compose, write under the run directory and
receive the sample grids (tested for those that install offline: TensorBoard, MLflow file store, W&B offline)."""
import pytest

from tests.conftest import compose
from tests.test_train import TINY, _data


@pytest.mark.parametrize("name,keys", [("csv", {"csv"}), ("tensorboard", {"tensorboard"}), ("wandb", {"wandb"}),
                                       ("mlflow", {"mlflow"}), ("comet", {"comet"}), ("aim", {"aim"}),
                                       ("many_loggers", {"csv", "tensorboard", "wandb", "mlflow"})])
def test_logger_configs_compose_under_the_run_directory(name, keys, tmp_path):
    cfg = compose(["experiment=caption_shapes", f"logger={name}"], tmp_path)
    assert set(cfg.logger) == keys
    for entry in cfg.logger.values():
        where = entry.get("save_dir") or entry.get("tracking_uri") or entry.get("repo") or entry.get("offline_directory")
        assert str(tmp_path) in str(where)
    if "wandb" in keys:
        assert cfg.logger.wandb.offline is True


def test_many_loggers_get_metrics_and_sample_grids(tiny_shapes, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tasks.cli.train import train

    monkeypatch.setenv("WANDB_SILENT", "true")
    train(compose(["experiment=caption_shapes", *TINY, *_data(tiny_shapes), "model.image_pretrain=null",
                   "logger=many_loggers", "trainer.max_steps=2", "trainer.max_epochs=-1",
                   "trainer.log_every_n_steps=1"], tmp_path))
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert {"val/samples", "test/samples"} <= set(events.Tags()["images"])
    pngs = list((tmp_path / "mlruns").rglob("artifacts/samples/**/samples.png"))
    assert pngs and any((tmp_path / "mlruns").rglob("metrics/train/loss"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].rglob("media/images/**/*.png"))
    # samples.png prints each image's reference caption (green) under the prediction
    from PIL import Image

    grid = Image.open(tmp_path / "samples.png")
    assert grid.height % (160 + 6 * 12 + 6) == 0  # cells of 4 prediction lines + 2 reference lines


def test_sample_grid_references(tmp_path):
    import torch
    from PIL import Image

    from tasks.visualize import save_grid

    imgs = [torch.zeros(3, 16, 16) for _ in range(2)]
    plain = Image.open(save_grid(imgs, ["a red circle", "a cross"], tmp_path / "a.png"))
    with_ref = Image.open(save_grid(imgs, ["a red circle", "a cross"], tmp_path / "b.png",
                                    references=["a small red circle", "a blue cross"]))
    green = [p for p in with_ref.convert("RGB").getdata() if p[1] > 90 and p[0] < 60 and p[2] < 60]
    assert with_ref.height > plain.height and green  # the reference is written in green
    with pytest.raises(ValueError, match="references"):
        save_grid(imgs, ["a", "b"], tmp_path / "c.png", references=["only one"])
