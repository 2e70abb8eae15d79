"""OmegaConf resolvers used by the configs (registered before Hydra composes)."""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from omegaconf import OmegaConf


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively: the flags say so (AVX512-BF16 or AMX) and a short
    measurement agrees (a VM or ``ONEDNN_MAX_CPU_ISA`` can hide the instructions the flags list, and emulated
    bf16 is about 100x slower than fp32). ``MMZOO_CPU_BF16=0|1`` overrides both."""
    forced = os.environ.get("MMZOO_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    return bf16_matmul_is_fast()


def bf16_matmul_is_fast(n: int = 256, seconds: float = 0.03) -> bool:
    """Whether a bf16 ``n``-square matmul takes at most 1.5x the fp32 one here (each the fastest of repeats over
    about ``seconds``), on one thread so that another process busy on the other cores cannot stall it."""
    import torch

    from tasks.runtime.budget import matmul_gflops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return matmul_gflops(bf16=True, n=n, seconds=seconds) * 1.5 >= matmul_gflops(n=n, seconds=seconds)
    finally:
        torch.set_num_threads(threads)


def auto_precision(accelerator: str = "cpu") -> str:
    """``bf16-mixed`` where the hardware runs bf16 natively, else ``32-true``."""
    import torch

    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def _cuda_accelerator(accelerator: str) -> bool:
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def ddp_backend(accelerator: str = "cpu") -> str:
    """Process-group backend for ``accelerator``: ``nccl`` on CUDA GPUs, ``gloo`` on the CPU."""
    return "nccl" if _cuda_accelerator(accelerator) else "gloo"


def world_size(devices: Any = 1, num_nodes: Any = 1, accelerator: str = "cpu") -> int:
    """Processes in the run as Lightning counts them: ``devices`` per node (an int, ``"auto"``/-1 or a
    list of device ids) times ``num_nodes``. Used for FSDP2's data-parallel mesh size."""
    import torch

    if isinstance(devices, str) and devices not in ("auto", "-1"):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        per_node = len(devices)
    elif devices in ("auto", -1, "-1"):
        per_node = torch.cuda.device_count() if _cuda_accelerator(accelerator) else 1
    else:
        per_node = int(devices)
    return max(1, per_node) * int(num_nodes)


def run_stamp() -> str:
    """Name of a run's directory, the same on every rank of one job.

    Ranks started by a launcher (torchrun, SLURM's srun) resolve the config independently, so a clock
    stamp could differ between them and split the run over several directories. They share the job's
    id instead: ``MMZOO_RUN_ID`` if set, else ``slurm-<job>.<step>``, else torchrun's rendezvous id;
    a plain start gets the clock (processes Lightning starts itself are handed the parent's run dir).
    """
    import os
    from datetime import datetime

    if os.environ.get("MMZOO_RUN_ID"):
        return os.environ["MMZOO_RUN_ID"]
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if rdzv != "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"torchrun-{rdzv}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def launcher_rank() -> int:
    """Global rank given by an external launcher (torchrun ``RANK``, srun ``SLURM_PROCID``), else 0."""
    import os

    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def rank_zero_subdir(subdir: str = ".hydra") -> str | None:
    """Hydra's ``output_subdir`` on rank 0 only (``null``: the other ranks do not write the config)."""
    return subdir if launcher_rank() == 0 else None


def rank_suffix() -> str:
    """``""`` on rank 0, ``_rank<N>`` elsewhere: per-rank job log files."""
    rank = launcher_rank()
    return f"_rank{rank}" if rank else ""


def _t2i_target(*args: Any) -> Any:
    from tasks.registry import t2i_target  # a task-level table: read when a config resolves it, not at import

    return t2i_target(*args)


def register_resolvers() -> None:
    """Register the ``zoo.*`` resolvers the configs use (once per process)."""
    resolvers = {"zoo.precision": auto_precision, "zoo.ddp_backend": ddp_backend, "zoo.world_size": world_size,
                 "zoo.rank_zero_subdir": rank_zero_subdir, "zoo.rank_suffix": rank_suffix,
                 "zoo.t2i_target": _t2i_target, "zoo.run_stamp": run_stamp}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "zoo.run_stamp")  # one stamp per run
