"""Scale-out helpers for ``zoo-train``: FSDP2 sharding of the unified model, early checks of the
trainer config, one run directory per job under Hydra, and data preparation that ranks do not race.

Lightning does the distributed work (``trainer=ddp|fsdp|deepspeed``); this module only adapts the
model and the Hydra entry point to it.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn

#: UnifiedSeq2Seq methods that callers use instead of ``forward``; FSDP2 must gather the root's
#: parameters (embeddings, norms, modality embedders) around each of them.
ROOT_METHODS = ("encode", "decode_hidden", "logits")


def fully_shard_model(model: nn.Module, mesh: Any, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to a ``UnifiedSeq2Seq``: one unit per encoder and decoder layer, one
    per cross-attention (its ``project_memory`` is called outside the layer's forward), and the root
    for everything else. Idempotent (Lightning calls ``configure_model`` again for ``trainer.test``)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        return model
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    for layer in model.decoder:
        fully_shard(layer.cross_attn, **kw)
        register_fsdp_forward_method(layer.cross_attn, "project_memory")
    for layer in [*model.encoder, *model.decoder]:
        fully_shard(layer, **kw)
    fully_shard(model, mesh=mesh)
    for name in ROOT_METHODS:
        register_fsdp_forward_method(model, name)
    return model


def check_trainer(trainer_cfg: Any) -> None:
    """Fail early, with the fix, for strategies this machine cannot run."""
    import torch

    strategy = trainer_cfg.get("strategy")
    name = str(strategy.get("_target_", "")) if hasattr(strategy, "get") else str(strategy or "")
    if "deepspeed" in name.lower():
        if trainer_cfg.get("accelerator") not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
            raise RuntimeError("trainer=deepspeed needs CUDA GPUs (DeepSpeed ZeRO has no CPU training path here); "
                               "on the CPU use trainer=fsdp (sharded) or trainer=ddp")
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise RuntimeError("trainer=deepspeed needs the deepspeed package: pip install deepspeed") from e


def launched_externally() -> bool:
    """True when torchrun or srun started several ranks at once, each running the entry point from the
    top (ranks that Lightning starts itself begin only after rank 0 has prepared the data)."""
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    slurm = "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return torchrun or slurm


@contextmanager
def prepare_lock(folder: str | Path) -> Iterator[None]:
    """Serialise data preparation (dataset generation, BPE training) across ranks started by an external
    launcher: the first rank prepares and caches, the others wait and then read the cache. A no-op for a
    plain start (Lightning's own launcher starts the other ranks only after rank 0 has prepared)."""
    if not launched_externally():
        yield
        return
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".mmzoo-prepare.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: what Lightning's launcher sets in the launching process (restored between the jobs of a sweep)
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_ENV_BEFORE_SWEEP: dict[str, str | None] | None = None


def single_job_relaunch() -> None:
    """Under a Hydra multirun, make the ranks Lightning re-launches run *this* job in *this* job's folder.

    Lightning starts rank 1.. as ``python -m <entry> <sys.argv[1:]> hydra.run.dir=<hydra.run.dir>``. In a
    multirun that would re-run the whole sweep in a fresh clock-stamped folder; here ``sys.argv`` becomes
    this job's own overrides and ``hydra.run.dir`` this job's output folder.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    global _ENV_BEFORE_SWEEP
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    if _ENV_BEFORE_SWEEP is None:
        _ENV_BEFORE_SWEEP = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    else:  # a later job in the process that launched the previous job's ranks: start from a clean slate
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for k, v in _ENV_BEFORE_SWEEP.items():  # else Lightning takes LOCAL_RANK as an external launcher's
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    sys.argv = [sys.argv[0], *hc.overrides.task]
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir


def hold_full_params(model: nn.Module, hold: bool) -> None:
    """FSDP2 evaluation: keep every unit's parameters gathered for the whole loop (``hold=True``), then
    shard them again (``hold=False``). Generation stops when a batch's sequences have all ended, at a
    different step on each rank, so per-forward all-gathers would no longer pair up across ranks.
    Costs the full parameters' memory during evaluation, as DDP does. A no-op for unsharded models."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        if m is not model:  # the root keeps FSDP's own setting (no reshard after forward)
            m.set_reshard_after_forward(not hold, recurse=False)
    for m in units:
        if hold:
            m.unshard()
        else:
            m.reshard()
