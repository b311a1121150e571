"""The run directory, the project's public output contract (README "Run directory").

Every file is written atomically: to a temporary name in the same directory, fsynced, then
renamed, so a reader never sees half a file. Only `*.partial.jsonl` files grow in place,
one fsynced line at a time, and a torn last line is dropped when they are read back.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def round_dir(self, round_index: int) -> Path:
        return self.root / "rounds" / f"round_{round_index:03d}"

    def synthetic(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "synthetic.jsonl"

    def synthetic_partial(self, round_index: int, rank: int = 0) -> Path:
        suffix = f".rank{rank}" if rank else ""
        return self.round_dir(round_index) / f"synthetic.partial{suffix}.jsonl"

    def opponent_logps(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "opponent_logps.pt"

    def round_stats(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "stats.json"

    def hf(self, round_index: int) -> Path:
        return self.root / "hf" / f"round_{round_index:03d}"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def check_writable(root: Path, need_bytes: int) -> None:
    """Fail before any work if the run directory cannot be written or the disk is too full."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise OSError(
            err.errno, f"cannot write the run directory {root}: {err.strerror}. Choose another run_dir."
        ) from err
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        raise OSError(
            errno.ENOSPC,
            f"{root} has {free} bytes free, and a round's model and checkpoint needs about {need_bytes}. "
            "Free some space or choose another run_dir.",
        )


def _atomic(path: Path, write) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append whole lines and fsync, so a kill loses at most the batch being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path, drop_torn_tail: bool = False, invalid=None) -> list:
    """Rows of a JSON Lines file; blank lines are skipped.

    A line that is not UTF-8 or not JSON raises, naming the file and the line, unless
    `invalid(line_number, error)` gives a row for it.
    """
    rows = []
    lines = path.read_bytes().split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    if tail and not drop_torn_tail:
        complete.append(tail)
    for i, raw in enumerate(complete, 1):
        try:
            line = raw.decode("utf-8")
            if line.strip():
                rows.append(json.loads(line))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if invalid is None:
                what = "UTF-8 text" if isinstance(err, UnicodeDecodeError) else f"valid JSON ({err.msg})"
                raise ValueError(f"{path}: line {i} is not {what}") from err
            rows.append(invalid(i, err))
    return rows


def replace_dir(tmp: Path, final: Path) -> None:
    """Put a fully written directory in place of `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
