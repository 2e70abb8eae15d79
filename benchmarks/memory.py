"""memory: peak RSS of the default experiment (``zoo-train``), over a short run of N steps.

Reports the peak resident set size of the training process and of the largest DataLoader worker
(``getrusage(RUSAGE_CHILDREN)`` covers descendants that were waited for).

    python -m benchmarks.memory [--steps 100]
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile

from benchmarks.common import save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # the multi-task job: N steps instead of its time budget, and 64 validation records per task
        limits = [f"data.tasks.{t}.val_limit=64" for t in ("caption", "vqa", "text_to_image", "sensor_to_text")]
        cmd = [sys.executable, "-m", "tasks.cli.train", "callbacks.time_budget=null", f"trainer.max_steps={args.steps}",
               "test=false", *limits, f"hydra.run.dir={tmp}/run"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS of the default experiment ({args.steps} steps): {peak_mb:.0f} MiB")
    print(f"saved {save('memory', {'args': vars(args), 'peak_rss_mib': peak_mb})}")


if __name__ == "__main__":
    main()
