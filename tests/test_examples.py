"""The examples run: one end to end in a fresh process (micro model trained in seconds, then zoo.load + caption);
every example script has a main() and a usage docstring; the train-step benchmark skips bf16 without native bf16."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


def test_every_task_has_an_example_with_usage():
    names = {p.stem for p in EXAMPLES}
    assert {"caption", "vqa", "sensor_to_text", "text_to_image"} <= names
    for p in EXAMPLES:
        tree = ast.parse(p.read_text())
        assert f"python examples/{p.name}" in (ast.get_docstring(tree) or "")
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def test_caption_example_runs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "caption.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.split(":")[0].endswith(".png")]
    assert len(lines) == 4  # four Shapes test images, each with its caption


def test_train_step_benchmark_skips_bf16_when_asked():
    pytest.importorskip("transformers")
    from benchmarks.train_step import make_steps

    steps, precision = make_steps(2, 8, 4, bf16=False)
    assert set(steps) == {"hf_fp32", "mmzoo_fp32"} and set(precision.values()) == {"fp32"}
    steps["mmzoo_fp32"]()  # one real step
