"""experiment=multitask: one model trained on all four tasks; evaluated and exported as one."""
import csv
import json

import pytest

from tests.conftest import compose
from tests.test_train import multitask_overrides


def test_merge_model_overrides_unions_and_rejects_conflicts():
    from tasks.multitask import merge_model_overrides

    merged = merge_model_overrides([{}, {"vocab": {"image_code_size": 16}},
                                    {"modalities": {"sensor": {"patch_len": 25}}}, {"vocab": {"image_code_size": 16}}])
    assert merged == {"vocab": {"image_code_size": 16}, "modalities": {"sensor": {"patch_len": 25}}}
    with pytest.raises(ValueError, match="image_code_size"):
        merge_model_overrides([{"vocab": {"image_code_size": 16}}, {"vocab": {"image_code_size": 32}}])


def test_multitask_trains_every_task_then_evaluates_and_exports_as_one(tiny_shapes, tmp_path):
    from tasks.cli.evaluate import evaluate
    from tasks.cli.train import train

    run = tmp_path / "run"
    steps = 40
    cfg = compose(["experiment=multitask", *multitask_overrides(tiny_shapes, tmp_path), f"trainer.max_steps={steps}",
                   "callbacks.time_budget=null",
                   "trainer.log_every_n_steps=1", "task.warmup_steps=5", "task.lr=3e-3"], run)
    metrics = train(cfg)
    names = ["caption", "vqa", "text_to_image", "sensor_to_text"]
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    for name in names:  # every step trains every task, and each task's loss falls
        losses = [float(r[f"train/{name}/loss"]) for r in rows if r.get(f"train/{name}/loss")]
        assert len(losses) == steps, name
        assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), (name, losses[:5], losses[-5:])
        assert any(k.startswith(f"val/{name}/") for k in metrics) and any(k.startswith(f"test/{name}/") for k in metrics)
        assert (run / f"predictions_{name}.json").is_file()
    assert len(json.loads((run / "predictions_vqa.json").read_text())) == len(
        json.loads((tiny_shapes / "vqa_questions_test.json").read_text())["questions"])
    assert (run / "samples_text_to_image.png").stat().st_size > 1000

    # zoo-eval on the multitask checkpoint evaluates every task it was trained on
    ev = tmp_path / "eval"
    eval_cfg = compose_eval([f"ckpt={run}/checkpoints/best.ckpt", f"paths.output_dir={ev}", "split=val"], ev)
    with_data = multitask_eval_data(cfg, eval_cfg)
    m = evaluate(with_data)
    for name in names:
        key = f"val/{name}/" + {"caption": "cider", "vqa": "vqa_acc", "text_to_image": "all_acc",
                                "sensor_to_text": "activity_acc"}[name]
        assert key in m
    assert m["val/caption/cider"] == pytest.approx(metrics["val/caption/cider"], abs=1e-6)
    assert m["val/vqa/vqa_acc"] == pytest.approx(metrics["val/vqa/vqa_acc"], abs=1e-6)
    # the renderer's weights come from the checkpoint too: the same layouts, the same images, the same scores
    assert m["val/text_to_image/renderer_all_acc"] == pytest.approx(metrics["val/text_to_image/renderer_all_acc"])
    assert m["val/text_to_image/probe_fd"] == pytest.approx(metrics["val/text_to_image/probe_fd"], rel=1e-4)

    # zoo-export → one folder whose Pretrained does all four tasks
    import zoo
    from tasks.cli.export import export

    out = export(f"{run}/checkpoints/best.ckpt", tmp_path / "exported")
    bundle = zoo.load(str(out))
    assert set(names) <= set(bundle.tasks)
    assert bundle.renderer is not None and bundle.image_tokenizer is None  # text-to-image: plan, then render
    images = bundle.generate_image(["a small red circle", "a large blue square left of a green cross"], output_type="pt")
    assert images.shape == (2, 3, 64, 64)
    assert len(bundle.plan_layout(["a small red circle"] * 2)) == 2


def compose_eval(overrides, out):
    from hydra import compose as hcompose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return hcompose(config_name="eval", overrides=[f"paths.log_dir={out}/logs", *overrides])


def multitask_eval_data(train_cfg, eval_cfg):
    """The training run's tiny data (the default data configs would generate full-size Shapes), with the
    VQ tokenizer the checkpoint recorded."""
    from omegaconf import OmegaConf, open_dict

    from tasks.checkpoint import read_checkpoint, vq_folder_for

    data = OmegaConf.to_container(train_cfg.data, resolve=True)
    t2i = data["tasks"]["text_to_image"]
    t2i.pop("vq", None)
    vq = vq_folder_for(read_checkpoint(eval_cfg.ckpt), eval_cfg.ckpt)  # None for the layout route
    t2i["vq_path"] = str(vq) if vq is not None else None
    with open_dict(eval_cfg):
        eval_cfg.data = OmegaConf.create(data)
    return eval_cfg


def test_time_budget_sets_the_step_total_and_the_schedule_decays_within_it(tiny_shapes, tmp_path, monkeypatch):
    """A real training run under TimeBudget on a fake clock (every optimiser step takes 1 s, whatever the machine's
    load): a 30-s budget timed over steps 3..8 gives 30 steps, the rechecks keep them, and the warm-up + cosine
    schedule completes inside them."""
    import time
    from types import SimpleNamespace

    from tasks.cli.train import train
    from tasks.runtime import callbacks
    from tests.test_train import TINY, _data

    step = [0]  # the fake clock reads the trainer's step, recorded as each TimeBudget hook is entered
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=lambda: 1.0 * step[0], time=time.time))

    def entered(hook):
        def run(self, trainer, *args):
            step[0] = trainer.global_step
            return hook(self, trainer, *args)
        return run

    for name in ("on_train_start", "on_train_batch_start", "on_train_batch_end"):
        monkeypatch.setattr(callbacks.TimeBudget, name, entered(getattr(callbacks.TimeBudget, name)))
    cfg = compose(["experiment=caption_shapes", *TINY, *_data(tiny_shapes), "trainer.max_epochs=-1",
                   "trainer.max_steps=100000", "+callbacks.time_budget._target_=tasks.runtime.callbacks.TimeBudget",
                   "+callbacks.time_budget.minutes=0.5", "+callbacks.time_budget.start=3",
                   "+callbacks.time_budget.window=5", "+callbacks.time_budget.min_steps=10",
                   "trainer.log_every_n_steps=1", "task.warmup_steps=2", "test=false"], tmp_path)
    metrics = train(cfg)
    # 1 s/step over steps 3..8; 8 s spent at step 8, 22 s left → 30 steps, i.e. the run ends on the budget
    assert int(metrics["train/steps"]) == 30 == step[0]
    assert "val/cider" in metrics  # validated after the loop
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    lrs = [float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")]
    assert len(lrs) == 30 and lrs[-1] < 0.2 * max(lrs)  # the cosine decay completed inside the budget


def _fake_trainer(num_training_batches: int):
    """What TimeBudget reads of a single-process Lightning trainer."""
    from types import SimpleNamespace

    return SimpleNamespace(global_step=0, num_training_batches=num_training_batches, accumulate_grad_batches=1,
                           is_global_zero=False, strategy=SimpleNamespace(broadcast=lambda x, src=0: x),
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=-1)))


def test_time_budget_whole_epochs_rounds_the_total_down_to_epochs(monkeypatch):
    from types import SimpleNamespace

    from tasks.runtime import callbacks

    clock = iter(())
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    for whole, expected in ((False, 120), (True, 100)):  # 10 steps in 10 s, 110 s left: 120 steps = 4.8 epochs
        clock = iter([0.0, 0.0, 10.0])  # fit start, timing start, then after step 10
        budget = callbacks.TimeBudget(minutes=2.0, start=0, window=10, whole_epochs=whole)
        trainer = _fake_trainer(num_training_batches=25)
        module = SimpleNamespace()
        budget.on_train_start(trainer, module)
        budget.on_train_batch_start(trainer, module, None, 0)
        trainer.global_step = 10
        budget.on_train_batch_end(trainer, module, None, None, 9)
        assert budget.total == expected == trainer.fit_loop.epoch_loop.max_steps == module.budget_steps


def test_time_budget_re_estimates_when_steps_slow_down(monkeypatch):
    from types import SimpleNamespace

    from tasks.runtime import callbacks

    now = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now[0])
    budget = callbacks.TimeBudget(minutes=2.0, start=0, window=10, rechecks=(0.25, 0.5))
    trainer = _fake_trainer(num_training_batches=1000)
    module = SimpleNamespace()
    budget.on_train_start(trainer, module)
    budget.on_train_batch_start(trainer, module, None, 0)
    pace = 1.0
    while trainer.global_step < trainer.fit_loop.epoch_loop.max_steps or trainer.global_step < 10:
        if trainer.global_step == 10:
            assert budget.total == 120  # 1 s/step: 110 s left at step 10
            pace = 2.0  # then every step takes twice as long
        now[0] += pace
        trainer.global_step += 1
        budget.on_train_batch_end(trainer, module, None, None, trainer.global_step - 1)
    # rechecked at step 30 (a quarter of 120): 50 s spent, 70 s left at 2 s/step → 65 steps; the run ends in budget
    assert budget.total == module.budget_steps == trainer.global_step == 65
    assert now[0] == 120.0
    with pytest.raises(ValueError, match="fractions"):
        callbacks.TimeBudget(minutes=1.0, rechecks=(0.5, 1.5))
