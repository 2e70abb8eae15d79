"""One wall-clock budget for a whole run (``budget.total_minutes``): a short calibration of this machine's speed,
a printed plan of every phase, and a training loop that gets whatever the phases before it left.

The phases before training (data, tokenizers, backbone pretraining) take what they take; their planned minutes
(measured on a reference machine, scaled by this machine's measured matmul speed) are only printed. The training loop
then ends at ``total - evaluation``: :class:`tasks.runtime.callbacks.TimeBudget` receives that deadline, counted from the
start of the process, so a slow data phase shortens training instead of overrunning the budget. Evaluation's
reserve is scaled the same way.
"""
from __future__ import annotations

import time
from typing import Any, Collection, Mapping

#: when this module was first imported (``tasks.cli.train`` imports it at start): the run's clock starts here
RUN_START = time.monotonic()


def elapsed_s() -> float:
    """Seconds since the run started (:data:`RUN_START`)."""
    return time.monotonic() - RUN_START


def matmul_gflops(bf16: bool = False, n: int = 1024, seconds: float = 0.6) -> float:
    """This machine's matmul speed in GFLOP/s (the fastest of repeated ``n``² products for about ``seconds``: what the
    cores can do, not what another process left them at that instant), the precision training will use: a short
    calibration, not a benchmark."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(0)  # not the global stream: calibrating must not change the seeded run
    a, b = torch.randn(n, n, dtype=dtype, generator=gen), torch.randn(n, n, dtype=dtype, generator=gen)
    a @ b  # warm-up
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def decode_step_us(width: int = 256, layers: int = 4, seconds: float = 0.3) -> float:
    """Microseconds for one small decode-like step (``layers`` × LayerNorm + Linear + GELU on a 4-row batch, then a
    softmax): the latency of many small operations, which bounds generation, as :func:`matmul_gflops` bounds
    training. The fastest of repeated 20-step runs over about ``seconds``, on one thread (with two, another
    process's load on the second core made each small operation wait milliseconds for it)."""
    import torch

    with torch.random.fork_rng(devices=[]):  # the layers' init draws: keep the seeded run's stream where it was
        norms = [torch.nn.LayerNorm(width) for _ in range(layers)]
        linears = [torch.nn.Linear(width, width) for _ in range(layers)]
        x0 = torch.randn(4, 1, width)

    def step() -> torch.Tensor:
        x = x0
        for norm, linear in zip(norms, linears):
            x = x + torch.nn.functional.gelu(linear(norm(x)))
        return torch.softmax(x, dim=-1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fastest_us(step, seconds)
    finally:
        torch.set_num_threads(threads)


def _fastest_us(step: Any, seconds: float) -> float:
    import torch

    with torch.no_grad():
        step()  # warm-up
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            t0 = time.perf_counter()
            for _ in range(20):
                step()
            times.append((time.perf_counter() - t0) / 20)
    return 1e6 * min(times)


def make_plan(total_minutes: float, phases: Mapping[str, float], speed_ratio: float,
              after: tuple[str, ...] = ("evaluation",), latency_ratio: float | None = None,
              latency_bound: tuple[str, ...] = ()) -> dict[str, float]:
    """Minutes per phase on this machine: each reference phase divided by ``speed_ratio`` (this machine's matmul
    speed over the reference machine's) or, for the phases in ``latency_bound`` (generation: many small steps),
    by ``latency_ratio`` (the reference's small-step time over this machine's); ``training`` gets the rest of
    ``total_minutes``. Raises when nothing is left."""
    ratio = max(speed_ratio, 1e-3)
    lat = ratio if latency_ratio is None else max(latency_ratio, 1e-3)
    plan = {name: float(m) / (lat if name in latency_bound else ratio)
            for name, m in phases.items() if m}  # a phase of 0 / null: not in this run
    plan["training"] = total_minutes - sum(plan.values())
    if plan["training"] < 1.0:
        raise ValueError(f"budget.total_minutes={total_minutes} leaves {plan['training']:.1f} min for training on this "
                         f"machine (the other phases need {sum(v for k, v in plan.items() if k != 'training'):.1f} min "
                         f"at {ratio:.2f}x the reference speed); raise the budget or shrink the phases")
    order = [k for k in phases if k in plan and k not in after] + ["training"] + [k for k in after if k in plan]
    return {k: plan[k] for k in order}


def format_plan(total_minutes: float, plan: Mapping[str, float], gflops: float, ratio: float,
                step_us: float | None = None, latency_ratio: float | None = None) -> str:
    parts = ", ".join(f"{name.replace('_', ' ')} {m:.1f} min" for name, m in plan.items())
    latency = "" if step_us is None else f", decode step {step_us:.0f} us, {latency_ratio:.2f}x"
    return (f"[mmzoo] plan: about {total_minutes:.0f} min on this machine (matmul {gflops:.0f} GFLOP/s, {ratio:.2f}x "
            f"the reference{latency}): {parts}")


def is_slow(training_gflops: float, reference_training_gflops: float, below: float) -> bool:
    """Whether this machine trains below ``below`` times the reference machine's speed (its matmul GFLOP/s in the
    training precision over the reference's, which trains in bf16)."""
    return training_gflops / reference_training_gflops < below


def apply_overrides(cfg: Any, overrides: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
    """Set each dotted config path of ``overrides`` in ``cfg`` (each must exist: a typo is an error, not a new key;
    under ``model.overrides.``, whose keys the model's config checks when it is built, a new key is allowed),
    except those in ``keep`` (what the user set on the command line wins). Returns what was set."""
    from omegaconf import OmegaConf

    applied = {}
    for key, value in overrides.items():
        free = key.startswith("model.overrides.")
        if not free and OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise ValueError(f"budget.slow_machine.overrides: {key} is not in the config")
        if key not in keep:
            OmegaConf.update(cfg, key, value, force_add=free)
            applied[key] = value
    return applied


def plan_run(budget: Mapping[str, Any], bf16: bool, cfg: Any = None,
             user_keys: Collection[str] = ()) -> tuple[dict[str, float], float]:
    """Calibrate, print the plan and return it with the deadline of the training loop (seconds since the run
    started): ``total - the evaluation reserve``. With ``cfg``, a machine slower than ``budget.slow_machine.below``
    times the reference gets ``budget.slow_machine.overrides`` applied to ``cfg`` in place (a cheaper configuration:
    where steps are dear, each must teach more), except the keys in ``user_keys`` (set on the command line)."""
    total = float(budget["total_minutes"])
    gflops = matmul_gflops(bf16)
    reference = float(budget["reference_gflops_bf16" if bf16 else "reference_gflops"])
    ratio = gflops / reference
    latency_bound = tuple(budget.get("latency_phases") or ())
    step_us = latency_ratio = None
    if latency_bound:
        step_us = decode_step_us()
        latency_ratio = float(budget["reference_step_us"]) / step_us
    plan = make_plan(total, dict(budget["phases"]), ratio, latency_ratio=latency_ratio, latency_bound=latency_bound)
    print(format_plan(total, plan, gflops, ratio, step_us, latency_ratio), flush=True)
    slow = budget.get("slow_machine") or {}
    if cfg is not None and slow.get("overrides"):
        reference_training = float(budget["reference_gflops_bf16"])
        if is_slow(gflops, reference_training, float(slow["below"])):
            applied = apply_overrides(cfg, slow["overrides"], keep=user_keys)
            print(f"[mmzoo] this machine trains at {gflops / reference_training:.2f}x the reference (under "
                  f"{slow['below']}): the cheaper configuration for slow machines (budget.slow_machine=null: off): "
                  + ", ".join(f"{k.removeprefix('data.tasks.')}={v}" for k, v in applied.items()), flush=True)
    after = sum(m for k, m in plan.items() if k == "evaluation")
    return plan, 60.0 * (total - after)
