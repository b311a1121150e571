"""Loggers that keep one history per run directory across restarts.

Lightning's CSVLogger deletes `metrics.csv` when it opens a run directory that has one, so a
resumed run kept only what it logged itself. Here the file is kept, and cut back to the rows
that existed when the checkpoint the run resumes from was written: the rows logged after it
are logged again by the redone steps, so every row appears once. The logger is also a callback
so that its row count travels inside the checkpoint (spinlab.run lists it among the callbacks).

W&B: the run id is kept in `<run_dir>/wandb_id`, so every start of a run directory continues
the same W&B run (`resume="allow"`).
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from pathlib import Path

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from spinlab.rundir import RunDir, write_bytes


class MetricsFile(ExperimentWriter):
    """`metrics.csv` opened for appending: its rows and header are kept, a torn last line dropped."""

    def _check_log_dir_exists(self) -> None:  # the parent deletes the file here
        self.rows_on_disk = 0
        if not os.path.isfile(self.metrics_file_path):
            return
        text = Path(self.metrics_file_path).read_text()
        torn = text and not text.endswith("\n")  # a kill while appending: the last row is incomplete
        self.metrics_keys, rows = self._parse(text[: text.rfind("\n") + 1] if torn else text)
        if torn:
            self._write(self.metrics_keys, rows)
        self.rows_on_disk = len(rows)

    @staticmethod
    def _parse(text: str) -> tuple[list[str], list[dict]]:
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
        return list(reader.fieldnames or []), rows

    def _write(self, keys: list[str], rows: list[dict]) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        write_bytes(Path(self.metrics_file_path), out.getvalue().encode())

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # The parent rewrites the file in place, so a kill in the middle would lose it.
        _, rows = self._parse(Path(self.metrics_file_path).read_text())
        self._write(fieldnames, rows)

    def save(self) -> None:
        self.rows_on_disk += len(self.metrics)
        super().save()

    @property
    def rows(self) -> int:
        return self.rows_on_disk + len(self.metrics)

    def sync(self) -> None:
        self.save()
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, "rb+") as f:
                os.fsync(f.fileno())

    def truncate(self, rows: int) -> None:
        """Keep the first `rows` rows on disk; rows not yet flushed are kept too."""
        if not os.path.isfile(self.metrics_file_path) or rows >= self.rows_on_disk:
            return
        keys, kept = self._parse(Path(self.metrics_file_path).read_text())
        self._write(keys, kept[:rows])
        self.rows_on_disk = rows


class CSVLogger(_CSVLogger, L.Callback):
    """Lightning's CSVLogger, whose `metrics.csv` survives a resume without duplicates.

    `checkpoint`: the checkpoint a restart resumes from. Without one, a restart redoes
    everything, so the file starts empty; with one, the file is cut back to the row count
    saved in it (`state_dict`).
    """

    def __init__(self, save_dir: str, checkpoint: str, name: str = "csv", version: str = "", **kwargs):
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)
        self.fresh = not Path(checkpoint).exists()

    @property
    @rank_zero_experiment
    def experiment(self) -> MetricsFile:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = MetricsFile(log_dir=self.log_dir)
            if self.fresh:
                self._experiment.truncate(0)
        return self._experiment

    # Callback side: the number of rows written when the checkpoint is, flushed to disk first.
    def state_dict(self) -> dict:
        rows = 0
        if rank_zero_only.rank == 0:
            self.experiment.sync()
            rows = self.experiment.rows
        return {"rows": rows}

    def load_state_dict(self, state: dict) -> None:
        if rank_zero_only.rank == 0:
            self.experiment.truncate(state["rows"])


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger; without an explicit `id`, the run directory's own W&B run id."""

    def __init__(self, save_dir: str, id: str | None = None, **kwargs):
        super().__init__(save_dir=save_dir, id=id or run_id(RunDir(save_dir).wandb_id), **kwargs)


def run_id(path: Path) -> str:
    """The id stored at `path`, created on first use. A random id rather than a hash of the path:
    a run directory deleted and started again must not continue the deleted run's W&B run."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(uuid.uuid4().hex[:16])
        try:
            os.link(tmp, path)  # atomic and fails if another process made it first: one id wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()
