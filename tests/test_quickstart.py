"""experiment=quickstart: its own small data folder, every stage of a run, the artifacts a newcomer looks at."""
import json

from tests.conftest import compose


def test_quickstart_composes_small(tmp_path):
    cfg = compose(["experiment=quickstart"], tmp_path)
    assert cfg.task_name == "quickstart" and cfg.data.root.endswith("shapes_quickstart")
    assert cfg.data.shapes.n_train <= 2000 and cfg.trainer.max_steps <= 400
    assert cfg.model.image_pretrain.epochs <= 5 and cfg.model.overrides.d_model <= 128


def test_quickstart_runs_every_stage(tmp_path, capsys):
    from tasks.cli.train import train

    cfg = compose(["experiment=quickstart", f"data.root={tmp_path}/data", "data.shapes.n_train=48",
                   "data.shapes.n_val=16", "data.shapes.n_test=16", "model.image_pretrain.epochs=1",
                   "trainer.max_steps=4", "task.max_new_tokens=8"], tmp_path)
    metrics = train(cfg)
    out = capsys.readouterr().out
    assert "generating the Shapes dataset" in out and "pretraining the image backbone" in out
    assert {"val/cider", "test/cider", "test/bleu4"} <= set(metrics) and metrics["train/steps"] == 4
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert len(json.loads((tmp_path / "predictions.json").read_text())) == 16
    assert (tmp_path / "samples.png").stat().st_size > 1000
    assert (tmp_path / "data" / "tokenizer.json").is_file() or any((tmp_path / "data").glob("*tokenizer*"))
