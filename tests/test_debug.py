"""Debugging switches on data bigger than one batch: fast_dev_run, limit_*_batches, the debug config group, and a
dataset without a test split."""
import json

import pytest

from tests.conftest import compose
from tests.test_train import TINY


@pytest.fixture(scope="module")
def shapes_40(tmp_path_factory):
    """Shapes whose val/test splits (40 images) take three eval batches of 16."""
    from tasks.data.shapes import ShapesConfig, ensure_shapes

    root = tmp_path_factory.mktemp("data") / "shapes"
    ensure_shapes(root, ShapesConfig(n_train=48, n_val=40, n_test=40))
    return root


def _caption(root, *extra):
    return ["experiment=caption_shapes", *TINY, f"data.root={root}", "data.shapes.n_train=48", "data.shapes.n_val=40",
            "data.shapes.n_test=40", "model.image_pretrain=null", "logger={}", *extra]


@pytest.mark.parametrize("name", ["default", "fdr", "overfit", "limit"])
def test_debug_configs_compose(name, tmp_path):
    cfg = compose(["experiment=caption_shapes", f"debug={name}"], tmp_path)
    assert cfg.task_name == "debug" and cfg.trainer.devices == 1 and cfg.trainer.accelerator == "cpu"
    expect = {"fdr": ("fast_dev_run", True), "overfit": ("overfit_batches", 3), "limit": ("limit_val_batches", 2),
              "default": ("detect_anomaly", True)}[name]
    assert cfg.trainer[expect[0]] == expect[1]


def test_fast_dev_run_scores_only_the_batches_it_ran(shapes_40, tmp_path):
    from tasks.cli.train import train

    metrics = train(compose(_caption(shapes_40, "debug=fdr"), tmp_path))
    # one eval batch of 16 of the 40 images: scored, not "24 val images got no prediction"
    assert "val/cider" in metrics and "test/cider" in metrics
    assert metrics["train/steps"] == 1


def test_limit_batches_and_overfit(shapes_40, tmp_path):
    from tasks.cli.train import train

    metrics = train(compose(_caption(shapes_40, "debug=limit", "trainer.limit_train_batches=2"), tmp_path))
    assert {"val/cider", "test/cider"} <= set(metrics) and metrics["train/steps"] == 4  # 2 epochs x 2 batches
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert len(preds) == 32  # two test batches of 16, not the 40 records
    metrics = train(compose(_caption(shapes_40, "debug=overfit", "trainer.max_epochs=2",
                                     "trainer.check_val_every_n_epoch=1"), tmp_path / "overfit"))
    assert metrics["train/steps"] == 6 and "val/cider" in metrics


def test_a_full_pass_that_misses_records_still_fails(shapes_40, tmp_path):
    from tasks.caption import CaptionTask

    task = CaptionTask.__new__(CaptionTask)
    task.__dict__["_trainer"] = None  # not attached: no partial pass
    with pytest.raises(RuntimeError, match="2 val images got no prediction"):
        CaptionTask.scored_references(task, "val", {1: ["a"], 2: ["b"], 3: ["c"]}, {1: "a"}, "images")


def test_no_test_split_skips_testing(shapes_40, tmp_path, capsys):
    from tasks.cli.train import train

    metrics = train(compose(_caption(shapes_40, "data.test_file=null", "trainer.max_steps=2", "trainer.max_epochs=-1"),
                            tmp_path))
    assert "no test split" in capsys.readouterr().out
    assert "val/cider" in metrics and not any(k.startswith("test/") for k in metrics)
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
