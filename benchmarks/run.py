"""Run every benchmark in turn: ``python benchmarks/run.py`` (results in benchmarks/results/)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["train_step", "caption_step", "generate", "dataloader", "memory", "vq_inference"]

if __name__ == "__main__":
    for name in sys.argv[1:] or NAMES:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=ROOT, check=True)
