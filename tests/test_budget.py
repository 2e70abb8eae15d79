"""One wall-clock budget for the whole run: the plan scales the reference phases by this machine's measured speed,
training gets the rest, and the training loop ends at the deadline whatever the earlier phases took."""
from types import SimpleNamespace

import pytest

from omegaconf import OmegaConf

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


def test_a_slow_machine_gets_the_cheaper_configuration(tmp_path, monkeypatch, capsys):
    from tasks.runtime import budget
    from tasks.runtime.budget import apply_overrides, is_slow, plan_run

    assert not is_slow(440, 395, 0.5) and is_slow(104, 395, 0.5)  # bf16 Zen 5 / fp32 on an AVX2-only CPU
    cfg = compose(["experiment=multitask"], tmp_path)
    slow = cfg.budget.slow_machine
    assert 0 < slow.below < 1 and slow.overrides
    full = {k: OmegaConf.select(cfg, k) for k in slow.overrides}
    monkeypatch.setattr(budget, "decode_step_us", lambda: 175.0)
    for gflops, expected_slow in ((440.0, False), (104.0, True)):
        monkeypatch.setattr(budget, "matmul_gflops", lambda bf16, g=gflops: g)
        run = compose(["experiment=multitask"], tmp_path)
        plan_run(run.budget, bf16=expected_slow is False, cfg=run)
        got = {k: OmegaConf.select(run, k) for k in slow.overrides}
        assert got == (dict(slow.overrides) if expected_slow else full)
        assert ("cheaper configuration" in capsys.readouterr().out) == expected_slow
    with pytest.raises(ValueError, match="data.tasks.captions.batch_size is not in the config"):
        apply_overrides(cfg, {"data.tasks.captions.batch_size": 8})
    # the model's field overrides take new keys (ModelConfig names a wrong one when the model is built)
    apply_overrides(cfg, {"model.overrides.ffn_dim": 512})
    assert cfg.model.overrides.ffn_dim == 512
    # what the user set on the command line wins over the slow machine's configuration
    run = compose(["experiment=multitask", "data.tasks.caption.batch_size=12"], tmp_path)
    applied = apply_overrides(run, slow.overrides, keep={"data.tasks.caption.batch_size"})
    assert run.data.tasks.caption.batch_size == 12 and "data.tasks.caption.batch_size" not in applied
    assert run.data.tasks.sensor_to_text.batch_size == slow.overrides["data.tasks.sensor_to_text.batch_size"]


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


def test_command_line_keys_are_what_the_user_set():
    from hydra import compose as hcompose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from tasks.cli.train import command_line_keys
    from tasks.runtime.resolvers import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        cfg = hcompose(config_name="train", return_hydra_config=True,
                       overrides=["experiment=multitask", "data.tasks.caption.batch_size=12", "+foo.bar=1"])
    HydraConfig.instance().set_config(cfg)
    try:
        assert command_line_keys() == {"experiment", "data.tasks.caption.batch_size", "foo.bar"}
    finally:
        HydraConfig.instance().cfg = None


def test_calibrations_leave_the_seeded_random_stream_alone():
    """The bf16 probe and the budget's calibrations run before training (the bf16 probe only on a run's first call,
    e.g. not at all when backbone pretraining already asked): a draw from the global RNG there made a run that
    pretrained its stem differ from the same seed's run that read it from the cache."""
    import torch

    from tasks.runtime.budget import decode_step_us, matmul_gflops
    from tasks.runtime.resolvers import bf16_matmul_is_fast

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    bf16_matmul_is_fast(n=32, seconds=0.001)
    matmul_gflops(n=32, seconds=0.001)
    decode_step_us(width=16, layers=1, seconds=0.001)
    assert torch.equal(torch.rand(4), expected)
