"""One wall-clock budget for the whole run: the plan scales the reference phases by this machine's measured speed,
training gets the rest, and the training loop ends at the deadline whatever the earlier phases took."""
from types import SimpleNamespace

import pytest

from tests.conftest import compose
from tests.test_multitask import _fake_trainer


def test_plan_scales_phases_and_gives_training_the_rest():
    from tasks.runtime.budget import format_plan, make_plan

    phases = {"data": 1.0, "vq_tokenizer": 3.5, "backbone": 1.0, "evaluation": 4.0}
    fast = make_plan(27, phases, speed_ratio=1.0)
    assert list(fast) == ["data", "vq_tokenizer", "backbone", "training", "evaluation"]
    assert fast["training"] == pytest.approx(17.5)
    slow = make_plan(27, phases, speed_ratio=0.62)  # an AVX2-only CPU: 110 of 178 GFLOP/s
    assert slow["vq_tokenizer"] == pytest.approx(3.5 / 0.62) and slow["training"] < fast["training"]
    assert sum(slow.values()) == pytest.approx(27)
    assert "about 27 min" in format_plan(27, slow, 110, 0.62) and "training" in format_plan(27, slow, 110, 0.62)
    with pytest.raises(ValueError, match="leaves"):
        make_plan(10, phases, speed_ratio=0.5)


def test_latency_bound_phases_scale_by_the_decode_step_not_the_matmul():
    from tasks.runtime.budget import make_plan

    phases = {"data": 1.0, "backbone": 1.0, "evaluation": 1.25}
    # half the matmul speed, the same small-step latency (one core of an AVX2-only CPU): generation costs the same
    plan = make_plan(25, phases, speed_ratio=0.5, latency_ratio=1.0, latency_bound=("evaluation",))
    assert plan["backbone"] == pytest.approx(2.0) and plan["evaluation"] == pytest.approx(1.25)
    assert plan["training"] == pytest.approx(25 - 2.0 - 2.0 - 1.25)
    slower_steps = make_plan(25, phases, speed_ratio=0.5, latency_ratio=0.8, latency_bound=("evaluation",))
    assert slower_steps["evaluation"] == pytest.approx(1.25 / 0.8)
    assert make_plan(25, phases, speed_ratio=0.5)["evaluation"] == pytest.approx(2.5)  # no latency figure: matmul


def test_decode_step_calibration_runs_on_one_thread_and_restores_the_count():
    import torch

    from tasks.runtime.budget import decode_step_us

    before = torch.get_num_threads()
    assert 1 < decode_step_us(seconds=0.05) < 1e5
    assert torch.get_num_threads() == before


def test_batch_scale_shrinks_batches_where_steps_cost_more(tmp_path):
    from omegaconf import OmegaConf

    from tasks.runtime.budget import batch_scale, scale_batches

    assert batch_scale("auto", 440, 395) == 1.0  # the reference kind of machine: full batches
    assert batch_scale("auto", 296.25, 395) == pytest.approx(0.75)
    assert batch_scale("auto", 104, 395) == 0.5  # fp32 on an AVX2-only CPU: the floor
    assert batch_scale("auto", 104, 395, floor=0.25) == pytest.approx(104 / 395)
    assert batch_scale(None, 104, 395) == 1.0 and batch_scale(0.5, 440, 395) == 0.5
    with pytest.raises(ValueError, match="batch_scale"):
        batch_scale(2, 440, 395)
    cfg = OmegaConf.create({"data": {"tasks": {"caption": {"batch_size": 16}, "vqa": {"batch_size": 3}}}})
    sizes = scale_batches(cfg, ["data.tasks.caption.batch_size", "data.tasks.vqa.batch_size"], 0.5)
    assert sizes == {"data.tasks.caption.batch_size": 8, "data.tasks.vqa.batch_size": 2}
    assert cfg.data.tasks.caption.batch_size == 8 and cfg.data.tasks.vqa.batch_size == 2
    assert scale_batches(cfg, ["data.tasks.vqa.batch_size"], 0.1) == {"data.tasks.vqa.batch_size": 1}
    with pytest.raises(ValueError, match="data.tasks.sensor.batch_size"):
        scale_batches(cfg, ["data.tasks.sensor.batch_size"], 0.5)


def test_matmul_calibration_is_short_and_positive():
    import time

    from tasks.runtime.budget import matmul_gflops

    t0 = time.perf_counter()
    assert matmul_gflops(n=256, seconds=0.1) > 0.1
    assert time.perf_counter() - t0 < 10


def test_time_budget_deadline_counts_from_the_run_start(monkeypatch):
    from tasks.runtime import budget, callbacks

    monkeypatch.setattr(budget, "elapsed_s", lambda: 300.0)  # 5 min of data and tokenizers before training
    tb = callbacks.TimeBudget(minutes=17, deadline_s=23 * 60)
    tb.on_train_start(_fake_trainer(100), SimpleNamespace())
    assert tb.seconds == pytest.approx(18 * 60)  # the loop gets what is left before the evaluation reserve
    monkeypatch.setattr(budget, "elapsed_s", lambda: 23 * 60.0)  # nothing left: still a minimum loop
    tb = callbacks.TimeBudget(minutes=17, deadline_s=23 * 60)
    tb.on_train_start(_fake_trainer(100), SimpleNamespace())
    assert tb.seconds == 60.0


def test_main_job_has_one_budget_and_it_can_be_turned_off(tmp_path):
    from tasks.runtime.budget import make_plan

    cfg = compose(["experiment=multitask"], tmp_path)
    assert cfg.budget.total_minutes == 25 and set(cfg.budget.phases) >= {"data", "evaluation"}
    plan = make_plan(cfg.budget.total_minutes, dict(cfg.budget.phases), speed_ratio=0.62)
    assert "vq_tokenizer" not in plan and list(plan)[-2:] == ["training", "evaluation"]  # the layout route has none
    assert list(cfg.budget.latency_phases) == ["evaluation"] and cfg.budget.reference_step_us > 0
    cfg = compose(["experiment=multitask", "budget.total_minutes=null"], tmp_path)
    assert cfg.budget.total_minutes is None and cfg.callbacks.time_budget.minutes == cfg.train_minutes
    cfg = compose(["experiment=t2i_shapes"], tmp_path)
    assert cfg.budget.total_minutes is None  # single-task experiments keep their own schedules
