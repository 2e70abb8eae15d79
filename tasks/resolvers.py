"""OmegaConf resolvers used by the configs (registered before Hydra composes)."""
from __future__ import annotations

from functools import lru_cache

from omegaconf import OmegaConf


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(accelerator: str = "cpu") -> str:
    """``bf16-mixed`` where the hardware runs bf16 natively, else ``32-true``."""
    import torch

    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("zoo.precision"):
        OmegaConf.register_new_resolver("zoo.precision", auto_precision)
