"""A CSV logger that appends: resuming in the same run directory keeps every row written before the kill."""
from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from zoo.atomic import atomic_file


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv`` and forgets its columns; this one keeps both."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(header))

    def _check_log_dir_exists(self) -> None:  # Lightning's removes metrics.csv here
        pass

    def drop_rows_from(self, step: int) -> int:
        """Remove the rows with ``step >= step`` (steps a resumed run does again); returns how many went."""
        self.metrics = [m for m in self.metrics if int(m.get("step", 0)) < step]
        if not os.path.isfile(self.metrics_file_path):
            return 0
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
        keep = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        if len(keep) != len(rows):
            with atomic_file(self.metrics_file_path) as f:
                writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\r\n")
                writer.writeheader()
                writer.writerows(keep)
        return len(rows) - len(keep)


class AppendCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` is appended to, never truncated.

    On resume (:class:`tasks.runtime.resume.ResumeState`) the rows of steps at or after the checkpoint's global step are
    dropped: the resumed run does those steps again and writes their rows afresh, so each step has one row and
    the file reads as the uninterrupted run's would. Every row up to the checkpoint is kept."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:  # type: ignore[override]
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def drop_rows_from(self, step: int) -> int:
        """See :meth:`_AppendingWriter.drop_rows_from`."""
        if rank_zero_only.rank != 0:
            return 0
        dropped = self.experiment.drop_rows_from(step)
        if dropped:
            print(f"[mmzoo] resumed at step {step}: {dropped} log rows of later steps in "
                  f"{self.experiment.metrics_file_path} will be written again")
        return dropped
