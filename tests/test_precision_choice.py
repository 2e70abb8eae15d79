"""Training precision follows what this CPU does natively, measured, not read from the flags alone."""
import os
import subprocess
import sys

import pytest

from tasks.runtime import resolvers

CHECK = "from tasks.runtime.resolvers import auto_precision; print(auto_precision('cpu'))"


def _precision(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", CHECK], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def _flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def test_the_override_wins_both_ways():
    assert _precision({"MMZOO_CPU_BF16": "0"}) == "32-true"
    assert _precision({"MMZOO_CPU_BF16": "1"}) == "bf16-mixed"


@pytest.mark.skipif("avx512_bf16" not in _flags(), reason="needs a CPU whose flags list avx512_bf16")
def test_bf16_hidden_by_the_isa_cap_falls_back_to_fp32():
    """oneDNN capped at AVX2 emulates bf16 (as on an AVX2-only CPU): the flags still say avx512_bf16, the
    measurement says slow, training runs in fp32."""
    assert _precision({"ONEDNN_MAX_CPU_ISA": "AVX2", "MMZOO_CPU_BF16": ""}) == "32-true"
    assert _precision({"MMZOO_CPU_BF16": ""}) == "bf16-mixed"


def test_no_flags_means_fp32(monkeypatch, tmp_path):
    monkeypatch.delenv("MMZOO_CPU_BF16", raising=False)
    resolvers.cpu_has_bf16.cache_clear()
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/proc/cpuinfo":
            path = tmp_path / "cpuinfo"
            path.write_text("flags\t\t: fpu sse2 avx2\n")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    try:
        assert resolvers.cpu_has_bf16() is False
    finally:
        resolvers.cpu_has_bf16.cache_clear()
