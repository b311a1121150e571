"""The run directory, the project's public output contract (docs/run-directory.md).

Every file is written atomically: to a temporary name in the same directory, fsynced, then
renamed, so a reader never sees half a file. Only `*.partial.jsonl` files grow in place,
one fsynced line at a time, and a torn last line is dropped when they are read back.
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

from spinlab.errors import CheckpointError, RunDirError, RunDirInUse

log = logging.getLogger(__name__)


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

    @property
    def proto(self) -> Path:
        """T-SPIN's proto-synthetic responses: samples of the initial policy θ_0, kept for every round."""
        return self.root / "rounds" / "proto.jsonl"

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

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def run_config(self) -> Path:
        return self.root / "run_config.yaml"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb_id"


def check_writable(root: Path, need_bytes: int) -> None:
    """Fail before any work if the run directory cannot be written or the disk is too full."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise RunDirError(
            f"cannot write the run directory {root}: {err.strerror}. Choose another run_dir.", err.errno
        ) from err
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        raise RunDirError(
            f"{root} has {free} bytes free, and a round's model and checkpoint needs about {need_bytes}. "
            "Free some space or choose another run_dir.",
            errno.ENOSPC,
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
        raise RunDirError(f"cannot write {path}: {err.strerror}", err.errno) from err
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
    `invalid(line_number, error)` gives a row for it. A UTF-8 byte order mark at the start (files
    saved by Windows tools and Excel) is skipped.
    """
    rows = []
    lines = path.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n")
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


# -- one job per run directory ----------------------------------------------------------------

_held: dict[Path, int] = {}  # run directory -> file descriptor holding its lock, in this process
_before: dict[Path, bytes] = {}  # run directory -> what its run.lock held before this process took it


def is_launching_rank() -> bool:
    """Whether this process is global rank 0 of its job, judged from the environment before any
    process group exists: Lightning's launcher starts ranks 1.. with LOCAL_RANK (and NODE_RANK
    on other nodes), torchrun sets RANK, Slurm SLURM_PROCID. Only rank 0 has every one at 0."""
    return all(
        int(os.environ.get(v, "0") or 0) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    )


def global_rank(processes_per_node: int | None) -> int | None:
    """This process's global rank, from the environment, before any process group exists: torchrun's
    RANK, Slurm's SLURM_PROCID, or NODE_RANK × processes per node + LOCAL_RANK (Lightning's
    launcher); None where the processes per node are not known."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name):
            return int(os.environ[name])
    node, local = (int(os.environ.get(v, "0") or 0) for v in ("NODE_RANK", "LOCAL_RANK"))
    if node == 0:
        return local
    return node * processes_per_node + local if processes_per_node else None


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    return f"host {h.get('host', '?')}, PID {h.get('pid', '?')}, started {h.get('started', '?')}"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def _in_use(run_dir: RunDir, holder: dict, hint: str) -> RunDirInUse:
    return RunDirInUse(
        f"{run_dir.root} is in use by another run ({_describe(holder)}){hint}; two processes on one "
        "run directory would overwrite each other's files. Wait for it to end or stop it, or choose "
        "another run directory."
    )


def claim(run_dir: RunDir) -> None:
    """Make this process the run directory's only owner until it exits or `release`s it.

    An flock on `run.lock`, which the kernel drops when the holder dies, so the lock of a killed
    run is free and taken over. The file names its holder (host, PID, start time) for the message
    a second start gets. Claiming a directory this process already holds is a no-op.
    """
    root = run_dir.root.resolve()
    if root in _held:
        return
    path = run_dir.lock
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(
            f"cannot write the run directory {run_dir.root}: {err.strerror}. Choose another run_dir.",
            err.errno,
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _holder(path)
        gone = holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
        hint = f" (PID {holder.get('pid')} is gone, but a process it started still holds the lock: `fuser {path}`)"
        raise _in_use(run_dir, holder, hint if gone else "") from None
    except OSError as err:  # a file system without flock (some network mounts): only the PID is left
        holder = _holder(path)
        here = holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid()
        if here and _alive(holder.get("pid")):
            os.close(fd)
            raise _in_use(run_dir, holder, "") from None
        log.warning("%s cannot be locked here (%s); a start on another host would not be stopped", path, err)
    before = os.pread(fd, 1 << 16, 0)
    previous = _holder(path)
    if previous.get("pid") is not None:
        log.warning("taking over %s, left by a run that has ended (%s)", path, _describe(previous))
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    _held[root] = fd
    _before[root] = before


def release(run_dir: RunDir, restore: bool = False) -> None:
    """Give the run directory up before this process ends (a sweep's next job runs in it).
    restore: put back what `run.lock` held before the claim (a refused start changes nothing)."""
    root = run_dir.root.resolve()
    fd = _held.pop(root, None)
    before = _before.pop(root, b"")
    if fd is not None:
        os.ftruncate(fd, 0)
        if restore and before:
            os.pwrite(fd, before, 0)
        os.close(fd)


# -- a directory that holds a run; what an interrupted write leaves behind ------------------------

# Files a spinlab run writes at its directory's top, one of which every run that got past its
# start holds (run.lock is taken first, run_config.yaml written once the start is accepted).
RUN_MARKERS = ("run.lock", "run_config.yaml", "summary.json")


def holds_run(run_dir: RunDir) -> bool:
    last = run_dir.last_checkpoint
    return last.exists() or last.is_symlink() or any((run_dir.root / m).exists() for m in RUN_MARKERS)


def check_not_foreign(run_dir: RunDir, allow_foreign: bool) -> None:
    """Refuse a directory with files in it but no spinlab run: a run writes (and, at its next
    start, tidies) its own files there, which must never meet someone else's."""
    root = run_dir.root
    if allow_foreign or not root.is_dir() or holds_run(run_dir):
        return
    names = sorted(p.name for p in root.iterdir())
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise RunDirError(
            f"{root} is not empty ({shown}) and holds no spinlab run (no {' or '.join(RUN_MARKERS)}): "
            "choose a new or empty run directory, or set allow_foreign_run_dir=true to write the run "
            "among these files"
        )


# The temporary names of the writers below, each matched only where its writer puts it.
_ATOMIC = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")  # _atomic: mkstemp's 8 random characters
_CHECKPOINT_TMP = re.compile(r"\.last\.ckpt\.(\d+|link)\.tmp")  # AtomicCheckpointIO (PID), the sharded link
_WANDB_ID_TMP = re.compile(r"\.wandb_id\.[0-9a-f]{32}\.tmp")  # loggers.run_id
_ROUND = re.compile(r"round_\d{3,}")
_MODEL_TMP = {  # replace_dir's `<name>.tmp` (being written) and `<name>.old` (being replaced)
    "hf": re.compile(r"round_\d{3,}\.(tmp|old)"),  # collective.save_policy
    "engine": re.compile(r"policy_after_\d{3,}\.(tmp|old)"),  # collective.policy_weights
}


def leftovers(run_dir: RunDir) -> list[Path]:
    """The temporary files and directories that interrupted writes of this run left behind:
    exactly the names spinlab's writers use, in the places they write them, nothing else."""
    root = run_dir.root
    found: list[Path] = []

    def atomic_files(directory: Path, names: Iterable[str] | None = None) -> None:
        for path in _entries(directory):
            match = _ATOMIC.fullmatch(path.name)
            if match and _is_file(path) and (names is None or match["name"] in names):
                found.append(path)

    atomic_files(root, ("summary.json", "run_config.yaml"))
    found += [p for p in _entries(root) if _WANDB_ID_TMP.fullmatch(p.name) and _is_file(p)]
    if _is_file(root / ".write_probe"):  # check_writable
        found.append(root / ".write_probe")
    atomic_files(root / ".hydra", ("config.yaml", "hydra.yaml", "overrides.yaml"))
    atomic_files(root / "csv", ("metrics.csv",))
    atomic_files(root / "rounds", ("proto.jsonl",))
    for round_dir in _entries(root / "rounds"):
        if _ROUND.fullmatch(round_dir.name) and _is_dir(round_dir):
            atomic_files(round_dir)
            atomic_files(round_dir / "mt_bench")
    checkpoints = run_dir.checkpoints
    atomic_files(checkpoints, ("last.ckpt.sha256",))
    for path in _entries(checkpoints):
        if _CHECKPOINT_TMP.fullmatch(path.name) and (_is_file(path) or path.is_symlink()):
            found.append(path)
        elif path.name.endswith(".ckpt") and _is_dir(path):  # a sharded checkpoint
            atomic_files(path, (CHECKSUMS,))
    for folder, pattern in _MODEL_TMP.items():
        found += [p for p in _entries(root / folder) if pattern.fullmatch(p.name) and _is_dir(p)]
    return found


def _entries(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if _is_dir(directory) else []


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def remove_leftovers(run_dir: RunDir) -> list[Path]:
    """Delete `leftovers`, logging each. Call it only while owning the run directory (`claim`)."""
    removed = leftovers(run_dir)
    for path in removed:
        if _is_dir(path):
            shutil.rmtree(path)
        else:
            path.unlink()
        log.warning("removed %s, left by an interrupted write", path)
    return removed


def checkpoint_problem(path: Path, checksums: bool = True) -> str | None:
    """What is wrong with a checkpoint, found without loading it; None when it looks whole.

    A file is a zip archive (torch.save) whose index sits at its end, so a truncated file has
    none; its pickle (the small part) is read to check its CRC. A directory (a sharded save:
    torch.distributed.checkpoint shards plus Lightning's `meta.pt`) needs its `.metadata`, every
    shard that names, as long as the byte ranges listed there, and a whole `meta.pt`.
    """
    if path.is_symlink() and not path.exists():
        return f"it is a link to {os.readlink(path)}, which does not exist (deleted or moved)"
    problem = _structure_problem(path)
    return problem if problem is not None or not checksums else _checksum_problem(path)


def _structure_problem(path: Path) -> str | None:
    if not path.is_dir():
        return _archive_problem(path)
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / ".metadata").is_file():
        return "its .metadata file is missing"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # whatever makes it unreadable, the checkpoint cannot be resumed
        return f"its .metadata cannot be read ({type(err).__name__}: {err})"
    for info in (metadata.storage_data or {}).values():
        shard = path / info.relative_path
        if not shard.is_file() or shard.stat().st_size < info.offset + info.length:
            return f"{shard.name} is missing or shorter than its metadata says"
    if not (path / "meta.pt").is_file():
        return "its meta.pt (Lightning's loop and callback state) is missing"
    problem = _archive_problem(path / "meta.pt")
    return f"meta.pt: {problem}" if problem else None


# -- checksums written with every checkpoint ---------------------------------------------------

CHECKSUMS = "checksums.json"  # in a sharded checkpoint directory: sha256 of each of its files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class HashingStream:
    """A binary file, written through, with the sha256 of what was written: a checkpoint's digest
    without reading it back."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.f.tell()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def checksum_sidecar(path: Path) -> Path:
    """The sha256 of a checkpoint file: `<name>.sha256`, a JSON list of the newest file's digest
    and the one before, written before the file is renamed into place, so that the file on disk
    matches one of them whenever a kill falls between the two renames."""
    return path.with_name(path.name + ".sha256")


def record_checksum(path: Path, digest: str) -> None:
    sidecar = checksum_sidecar(path)
    try:
        before = json.loads(sidecar.read_text()).get("sha256", [])[:1]
    except (OSError, ValueError, AttributeError):
        before = []
    write_json(sidecar, {"sha256": [digest, *before]})


def _checksum_problem(path: Path) -> str | None:
    """Reads the whole checkpoint: run it in one process of a job (check_last_checkpoint)."""
    changed = "does not match the checksum saved with it (sha256): it changed after it was written"
    if path.is_dir():
        listed = path / CHECKSUMS
        if not listed.is_file():
            return None  # saved by a version that wrote none
        for name, digest in json.loads(listed.read_text()).items():
            if sha256_file(path / name) != digest:
                return f"{name} {changed}"
        return None
    sidecar = checksum_sidecar(path)
    if not sidecar.is_file():
        return None
    if sha256_file(path) not in json.loads(sidecar.read_text()).get("sha256", []):
        return f"its content {changed}"
    return None


def _archive_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if not pickles:
                return "it is a zip archive but not a PyTorch checkpoint"
            archive.read(pickles[0])
            size = path.stat().st_size
            if any(i.header_offset + i.compress_size > size for i in archive.infolist()):
                return "it is shorter than its own index says"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return None


def check_last_checkpoint(run_dir: RunDir, finished_rounds: int, checksums: bool = True) -> None:
    """Refuse to resume from a damaged `last.ckpt`, saying what is intact and how to go on.

    `checksums`: also compare every file with the digests saved with it, which reads the whole
    checkpoint; one process of a job does that (see spinlab.run.run), the others check its structure."""
    path = run_dir.last_checkpoint
    problem = checkpoint_problem(path, checksums)
    if problem is None:
        return
    redo = (
        f"move it away (`mv {path} {path}.damaged`; a link keeps the directory it names) and run the "
        "same command again: training starts over from round 0 and reuses the synthetic data and "
        "opponent log-probs already on disk"
    )
    if finished_rounds:
        last = run_dir.hf(finished_rounds - 1)
        advice = (
            f"Rounds 0..{finished_rounds - 1} are finished and intact: the policy after round "
            f"{finished_rounds - 1} is in {last} and each round's synthetic data in {run_dir.root / 'rounds'}. "
            f"Either continue from that policy as a new run (model=hf model.name_or_path={last}, "
            f"the remaining rounds, another run directory), or {redo}."
        )
    else:
        advice = f"No round is finished yet; {redo}."
    raise CheckpointError(f"cannot resume: the checkpoint {path} is damaged ({problem}). {advice}")
