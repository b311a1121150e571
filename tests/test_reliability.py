"""Restarts that lose nothing and refuse what they cannot honour: the metrics history, one owner per
run directory, per-round overrides from the command line, leftovers of interrupted writes, damaged
checkpoints and changed settings."""

import csv
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import spinlab.run
from spinlab import cli, config, rundir
from spinlab.config import check_config, check_settings, redact
from spinlab.config import round_overrides as typed_round_overrides
from spinlab.errors import RunDirError
from spinlab.loggers import MetricsFile
from spinlab.rounds import round_settings
from tests import forked
from tests.conftest import REFERENCE, ROOT, compose_cfg
from tests.helpers import Crash
from tests.test_e2e import run


def metric_rows(run_dir):
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def shape(rows):
    """What each row is: its step and the names of the metrics it holds."""
    return [(int(r["step"]), tuple(sorted(k for k, v in r.items() if v and k != "step"))) for r in rows]


def assert_same_history(rows, reference):
    assert shape(rows) == shape(reference)
    for a, b in zip(rows, reference, strict=True):
        for key in ("train/loss", "train/margin", "eval/heldout_margin"):
            if a.get(key):
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), (a["step"], key)


def settings(cfg):
    return redact(OmegaConf.to_container(cfg, resolve=True))


def no_model(config, *args, **kwargs):
    # check_config builds the generator (settings only, no weights) to refuse a bad one at start.
    if str(config.get("_target_", "")).startswith("spinlab.generation."):
        return instantiate(config, *args, **kwargs)
    raise AssertionError("a part was built (the model loaded) although the start should have been refused")


def subprocess_env():
    # A run in a subprocess is compared with `finished`, trained in this process: both must use the
    # same number of threads. Reductions split over a different thread count round differently, and
    # a margin (a small difference of large log-probs) then moves by ~1e-5 relative on some CPUs
    # (Intel Xeon: -0.18130705 against -0.18130456), more than assert_same_history allows.
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}",
    }


@pytest.fixture(scope="module")
def finished(reference_run):
    """A finished two-round run, never interrupted (conftest's: read-only)."""
    return reference_run


# -- the metrics history -------------------------------------------------------------------------


def test_metrics_history_survives_a_crash_and_resume(finished, tmp_path):
    crash = {"_target_": "tests.helpers.CrashAtBatch", "epoch": 1, "batch": 2}
    with pytest.raises(Crash):
        run(tmp_path, "run", extra_callbacks={"crash": crash})
    before = metric_rows(tmp_path / "run")
    # The crashed attempt logged round 1's first two steps (4 and 5) after its last checkpoint.
    redone = [i for i, r in enumerate(before) if r.get("train/loss") and int(r["step"]) >= 4]
    assert [int(before[i]["step"]) for i in redone] == [4, 5]
    run(tmp_path, "run")
    after = metric_rows(tmp_path / "run")
    assert_same_history(after, metric_rows(finished))  # every row once: nothing lost, nothing twice
    assert after[: redone[0]] == before[: redone[0]]  # the rows before the checkpoint, untouched


def test_generation_speed_is_logged_once_when_a_crash_precedes_the_rounds_checkpoint(
    finished, tmp_path, monkeypatch
):
    # Killed while round 1 scores its opponent: the synthetic data is on disk and its
    # gen/tokens_per_s row was written after the last checkpoint, so the resume cuts the row and
    # reads the data back instead of generating it again; the row must come back once.
    from spinlab.rounds import SyntheticPairs

    scored = SyntheticPairs.opponent_logps

    def crash_in_round_1(self, trainer, module, rnd, run_dir):
        if rnd.index == 1:
            raise Crash("killed while scoring round 1's opponent")
        return scored(self, trainer, module, rnd, run_dir)

    monkeypatch.setattr(SyntheticPairs, "opponent_logps", crash_in_round_1)
    with pytest.raises(Crash):
        run(tmp_path, "run")
    assert (tmp_path / "run" / "rounds" / "round_001" / "synthetic.jsonl").exists()
    monkeypatch.setattr(SyntheticPairs, "opponent_logps", scored)
    run(tmp_path, "run")
    rows = metric_rows(tmp_path / "run")
    assert [float(r["round"]) for r in rows if r.get("gen/tokens_per_s")] == [0, 1]
    assert_same_history(rows, metric_rows(finished))


@pytest.mark.slow
def test_metrics_history_survives_sigkill(finished, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *REFERENCE,
        "hydra.verbose=[spinlab.module]",
        f"hydra.run.dir={run_dir}",
    ]
    proc = forked.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env()
    )
    seen = 0
    for line in proc.stdout:
        seen += "round 1 step" in line
        if seen == 2:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    killed = metric_rows(run_dir)
    assert any(r.get("train/loss") and r["round"] == "1.0" for r in killed)  # round 1 had begun
    forked.run(command, check=True, env=subprocess_env(), capture_output=True, timeout=600)
    assert_same_history(metric_rows(run_dir), metric_rows(finished))


def test_extending_a_run_keeps_its_metrics_and_records_the_new_rounds(finished, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(finished, root)
    before = metric_rows(root)
    run(tmp_path, "run", "rounds=3")
    after = metric_rows(root)
    assert len(after) > len(before) and after[: len(before)] == before
    assert {r["round"] for r in after[len(before) :] if r.get("train/loss")} == {"2.0"}
    assert OmegaConf.load(root / "run_config.yaml").rounds == 3


def test_a_torn_last_row_is_dropped_and_the_header_kept(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("a,b,step\n1,2,0\n3,4,1\n5,")
    writer = MetricsFile(str(tmp_path))
    assert writer.rows == 2 and writer.metrics_keys == ["a", "b", "step"]
    writer.log_metrics({"a": 6.0}, step=2)
    writer.save()
    assert path.read_text() == "a,b,step\n1,2,0\n3,4,1\n6.0,,2\n"
    writer.truncate(1)
    assert path.read_text() == "a,b,step\n1,2,0\n" and writer.rows == 1


def test_wandb_continues_the_run_directorys_wandb_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(["debug=fast", "logger=wandb"], tmp_path / "run")
    first, again = instantiate(cfg.logger.wandb), instantiate(cfg.logger.wandb)
    other = instantiate(compose_cfg(["debug=fast", "logger=wandb"], tmp_path / "other").logger.wandb)
    stored = (tmp_path / "run" / "wandb_id").read_text()
    assert first.version == again.version == stored and other.version != stored
    assert first._wandb_init["resume"] == "allow"
    try:
        assert first.experiment.id == stored  # an offline W&B run starts under that id
    finally:
        wandb.finish()
    assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{stored}"))


# -- one job per run directory ---------------------------------------------------------------------


def test_a_second_start_is_refused_while_the_first_runs_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "debug=fast", "rounds=50", f"hydra.run.dir={run_dir}"]
    first = forked.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "run.lock").exists() and (run_dir / "run.lock").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = forked.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # refused while the first still runs, not after it
        assert second.returncode != 0
        assert (
            f"is in use by another run (host {socket.gethostname()}, PID {first.pid}, started"
            in second.stderr
        )
    finally:
        first.kill()
        first.wait()
    with caplog.at_level(logging.WARNING, logger="spinlab.rundir"):
        rundir.claim(rundir.RunDir(run_dir))
    try:
        assert f"taking over {run_dir / 'run.lock'}" in caplog.text and f"PID {first.pid}" in caplog.text
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        rundir.release(rundir.RunDir(run_dir))


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_lock_held_after_its_pid_died_is_refused_with_a_hint(tmp_path):
    run_dir = rundir.RunDir(tmp_path / "run")
    run_dir.root.mkdir()
    pid = dead_pid()
    run_dir.lock.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "then"}))
    with open(run_dir.lock) as orphan:  # a process the dead run started, still holding the lock
        fcntl.flock(orphan, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match=rf"PID {pid} is gone, but a process it started still holds"):
            rundir.claim(run_dir)


def test_without_flock_a_live_pid_still_refuses_and_a_dead_one_is_taken_over(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    run_dir = rundir.RunDir(tmp_path / "run")
    run_dir.root.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "started": "then"}
    run_dir.lock.write_text(json.dumps(holder))
    with pytest.raises(
        RuntimeError, match=rf"in use by another run \(host .*, PID {os.getppid()}, started then"
    ):
        rundir.claim(run_dir)
    run_dir.lock.write_text(json.dumps({**holder, "pid": dead_pid()}))
    with caplog.at_level(logging.WARNING, logger="spinlab.rundir"):
        rundir.claim(run_dir)
    rundir.release(run_dir)
    assert "cannot be locked here" in caplog.text and "taking over" in caplog.text


@pytest.mark.parametrize(
    "env, launching",
    [
        ({}, True),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0", "SLURM_PROCID": "0"}, True),
        ({"LOCAL_RANK": "1"}, False),  # Lightning's launcher, rank 1 of this node
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # ... rank 0 of another node
        ({"RANK": "3"}, False),  # torchrun
        ({"SLURM_PROCID": "2"}, False),  # one Slurm task per process
    ],
)
def test_only_global_rank_zero_takes_the_lock(monkeypatch, env, launching):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert rundir.is_launching_rank() is launching


@pytest.mark.parametrize(
    "env, devices, name",
    [
        ({"LOCAL_RANK": "1"}, 2, "train_ddp_process_1.log"),  # Lightning's launcher, node 0
        (
            {"NODE_RANK": "1", "LOCAL_RANK": "0"},
            1,
            "train_ddp_process_1.log",
        ),  # 2 nodes x 1: Hydra says train.log
        (
            {"NODE_RANK": "1", "LOCAL_RANK": "1"},
            2,
            "train_ddp_process_3.log",
        ),  # Hydra: node 0's rank 1's name
        (
            {"NODE_RANK": "1", "LOCAL_RANK": "0"},
            "auto",
            "train_node1_process_0.log",
        ),  # processes per node unknown
        ({"RANK": "5", "LOCAL_RANK": "1"}, 4, "train_ddp_process_5.log"),  # torchrun
        ({"SLURM_PROCID": "6", "SLURM_LOCALID": "2"}, 4, "train_ddp_process_6.log"),  # srun
    ],
)
def test_every_process_but_rank_0_logs_to_a_file_of_its_own(tmp_path, monkeypatch, env, devices, name):
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    handler = logging.FileHandler(tmp_path / "train.log", delay=True)  # as Hydra sets it up
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        cli.own_log_file(compose_cfg(["debug=fast", f"trainer.devices={devices}"]), rundir.RunDir(tmp_path))
        logging.getLogger("spinlab.test").warning("a line of this process")
    finally:
        root.removeHandler(handler)
        handler.close()
    assert (tmp_path / name).read_text() == "a line of this process\n"
    assert not (tmp_path / "train.log").exists()  # rank 0's log gets none of it


# -- per-round overrides from the command line -----------------------------------------------------


def test_round_override_from_the_command_line_reaches_its_round(tmp_path):
    summary, cfg = run(tmp_path, "run", "round_overrides.1.lr=1e-4", "round_overrides.1.lam=0.2")
    assert OmegaConf.to_container(cfg.round_overrides) == {1: {"lr": 1e-4, "lam": 0.2}}
    assert (summary[0]["lr"], summary[0]["lam"]) == (1e-3, 0.1)
    assert (summary[1]["lr"], summary[1]["lam"]) == (1e-4, 0.2)


@pytest.mark.parametrize(
    "override, setting, expected",
    [  # experiments/paper_zephyr/README.md, as written; and a command line that changes the preset
        ("round_overrides.2.lr=1.0e-7", "lr", [5e-7, 5e-7, 1e-7, 1e-7]),
        ("round_overrides.3.lam=5.0", "lam", [0.1, 0.1, 0.1, 5.0]),
        ("round_overrides.2.lr=2.0e-7", "lr", [5e-7, 5e-7, 2e-7, 2e-7]),
        ("round_overrides.3.lam=1.0", "lam", [0.1, 0.1, 0.1, 1.0]),
    ],
)
def test_paper_recipe_commands_compose_as_written(override, setting, expected):
    cfg = compose_cfg(["experiment=paper_zephyr", override])
    cfg.round_overrides = typed_round_overrides(OmegaConf.to_container(cfg.round_overrides), cfg.rounds)
    base = {"lam": cfg.lam, "lr": cfg.optimizer.lr, "mix_previous_rounds": cfg.data.mix_previous_rounds}
    overrides = OmegaConf.to_container(cfg.round_overrides)
    per_round = [round_settings(r, base, overrides) for r in range(cfg.rounds)]
    assert [s[setting] for s in per_round] == expected
    assert [s["mix_previous_rounds"] for s in per_round] == [0, 1, 0, 0]  # the preset's other entries stay


def test_round_override_values_are_typed():
    cfg = compose_cfg(["debug=fast", "round_overrides.1.lr=1", "round_overrides.1.mix_previous_rounds=1"])
    check_config(cfg)
    settings = OmegaConf.to_container(cfg.round_overrides)[1]
    assert settings == {"lr": 1.0, "mix_previous_rounds": 1}
    assert type(settings["lr"]) is float and type(settings["mix_previous_rounds"]) is int


@pytest.mark.parametrize(
    "override, message",
    [
        ("round_overrides.1.lr=abc", "round_overrides.1.lr must be a number, got 'abc'"),
        ("round_overrides.1.mix_previous_rounds=1.5", "round_overrides.1.mix_previous_rounds must be an int"),
        ("round_overrides.1.beta=1", r"round_overrides.1.beta: unknown setting"),
        ("round_overrides.5.lr=1e-4", r"round_overrides key '5' is not a round index in \[0, 2\)"),
        ("round_overrides.1.lam=0", r"round_overrides.1.lam must be a finite number in \(0, 1e\+06\]"),
    ],
)
def test_bad_round_overrides_fail_at_start_naming_them(override, message):
    cfg = compose_cfg(["debug=fast", override])
    with pytest.raises(ValueError, match=message):
        check_config(cfg)


# -- leftovers and damaged checkpoints -------------------------------------------------------------


def mkstemp_name(directory, name):
    """A temporary name as rundir._atomic makes it for `name` in `directory` (the file is created)."""
    import tempfile

    directory.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return rundir.Path(path)


def test_leftovers_of_interrupted_writes_are_removed_at_start_and_nothing_else(tmp_path, caplog):
    root = tmp_path / "run"
    ckpt = root / "checkpoints"
    files = [  # what each writer leaves when killed, where it writes it
        mkstemp_name(root, "summary.json"),
        mkstemp_name(root, "run_config.yaml"),
        mkstemp_name(root / ".hydra", "config.yaml"),
        mkstemp_name(root / "csv", "metrics.csv"),
        mkstemp_name(root / "rounds", "proto.jsonl"),
        mkstemp_name(root / "rounds" / "round_000", "synthetic.jsonl"),
        mkstemp_name(root / "rounds" / "round_001" / "mt_bench", "run-round001.jsonl"),
        mkstemp_name(ckpt, "last.ckpt.sha256"),
        mkstemp_name(ckpt / "epoch0000-step0000004-0123abcd.ckpt", rundir.CHECKSUMS),
        root / f".wandb_id.{'5f' * 16}.tmp",  # loggers.run_id
        root / ".write_probe",  # check_writable
        ckpt / f".last.ckpt.{os.getpid()}.tmp",  # AtomicCheckpointIO: a full-size checkpoint
    ]
    dirs = [  # replace_dir, interrupted: a model directory being written or being replaced
        root / "hf" / "round_001.tmp",
        root / "hf" / "round_000.old",
        root / "engine" / "policy_after_002.tmp",
    ]
    kept = [  # the user's files, with the same patterns at several depths; and the run's own
        root / ".draft.tmp",
        root / "notes.tmp",
        root / "backup.old" / "thesis.tex",
        root / "project" / ".draft.tmp",
        root / "project" / "backup.old" / "thesis.tex",
        root / "project" / "a" / "b" / "c.old" / "x.tex",
        root / "project" / "a" / "b" / ".d.tmp",
        root / "project" / ".summary.json.abcdefgh.tmp",  # a run's temporary name, another place
        root / "project" / "hf" / "round_000.old" / "model.safetensors",
        root / "project" / "checkpoints" / ".last.ckpt.123.tmp",
        root / ".notes.txt.abcdefgh.tmp",  # mkstemp-shaped, but no file a run writes at the top
        root / "rounds" / "round_000" / "draft.tmp",
        root / "rounds" / "notes" / ".x.abcdefgh.tmp",
        root / "rounds" / "round_001" / "synthetic.partial.jsonl",  # resume data, not a leftover
        root / "hf" / "round_000" / "model.safetensors",
        root / "hf" / "mine.old" / "model.safetensors",
        root / "checkpoints" / ".last.ckpt.tmp",
        root / "checkpoints" / "backup.old" / "last.ckpt",
        root / "wandb" / "run-x" / ".files.tmp",  # W&B's own
        tmp_path / "elsewhere" / ".x.abcdefgh.tmp",
    ]
    for path in files + kept + [d / "model.safetensors" for d in dirs]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    link = ckpt / ".last.ckpt.link.tmp"  # the sharded checkpoint's link, before its rename
    link.symlink_to("epoch0000-step0000004-0123abcd.ckpt")
    files.append(link)
    # A link with a leftover's name keeps what it names: the user's directory.
    (root / "hf" / "round_002.old").symlink_to(tmp_path / "elsewhere")
    kept.append(root / "hf" / "round_002.old")
    # Both rounds are finished, so the start has nothing else to do.
    (root / "summary.json").write_text(json.dumps([{"round": 0}, {"round": 1}]))
    with caplog.at_level(logging.WARNING, logger="spinlab.rundir"):
        spinlab.run.run(compose_cfg(["debug=fast"], root))
    assert [p for p in files + dirs if p.exists() or p.is_symlink()] == []
    assert [p for p in kept if not p.exists()] == []
    for path in files + dirs:
        assert f"removed {path}, left by an interrupted write" in caplog.text
    assert caplog.text.count("left by an interrupted write") == len(files + dirs)


def test_a_directory_with_files_but_no_run_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    root = tmp_path / "mine"
    (root / "project" / "backup.old").mkdir(parents=True)
    (root / "project" / "backup.old" / "thesis.tex").write_text("x")
    (root / ".draft.tmp").touch()
    monkeypatch.setattr(config, "instantiate", no_model)
    with pytest.raises(
        RunDirError, match=rf"^{root} is not empty \(.draft.tmp, project\) and holds no spinlab run"
    ):
        spinlab.run.run(compose_cfg(["debug=fast"], root))
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        ".draft.tmp",
        "project",
        "project/backup.old",
        "project/backup.old/thesis.tex",
    ]
    rundir.check_not_foreign(rundir.RunDir(root), allow_foreign=True)  # said explicitly: accepted
    rundir.check_not_foreign(rundir.RunDir(tmp_path / "empty"), allow_foreign=False)  # not made yet
    (tmp_path / "empty").mkdir()
    rundir.check_not_foreign(rundir.RunDir(tmp_path / "empty"), allow_foreign=False)  # as Hydra makes it
    (root / "run.lock").touch()  # a run's directory: its files and the user's may live together
    rundir.check_not_foreign(rundir.RunDir(root), allow_foreign=False)


def checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"global_step": 4, "state_dict": {"w": torch.arange(4000.0)}}, buffer)
    return buffer.getvalue()


def test_checkpoint_problems_found_without_loading(tmp_path, finished):
    import torch.distributed.checkpoint as dcp

    assert rundir.checkpoint_problem(finished / "checkpoints" / "last.ckpt") is None
    whole = tmp_path / "whole.ckpt"
    whole.write_bytes(checkpoint_bytes())
    assert rundir.checkpoint_problem(whole) is None
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(checkpoint_bytes()[:-200])
    assert "BadZipFile" in rundir.checkpoint_problem(cut)
    sharded = tmp_path / "sharded.ckpt"
    dcp.save({"w": torch.arange(4000.0)}, checkpoint_id=str(sharded))
    assert (
        rundir.checkpoint_problem(sharded) == "its meta.pt (Lightning's loop and callback state) is missing"
    )
    (sharded / "meta.pt").write_bytes(checkpoint_bytes())
    assert rundir.checkpoint_problem(sharded) is None
    (shard,) = sharded.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    assert rundir.checkpoint_problem(sharded) == f"{shard.name} is missing or shorter than its metadata says"
    (sharded / ".metadata").unlink()
    assert rundir.checkpoint_problem(sharded) == "its .metadata file is missing"


def test_a_changed_byte_is_found_by_the_checksum_saved_with_the_checkpoint(tmp_path, finished):
    import torch.distributed.checkpoint as dcp

    from spinlab.callbacks import AtomicCheckpointIO

    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.arange(4000.0)}, ckpt)
    first = rundir.sha256_file(ckpt)
    AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.arange(4000.0)}, ckpt)
    # The newest digest and the one before: a kill between the sidecar's rename and the file's
    # leaves the previous file, which still matches.
    assert json.loads(rundir.checksum_sidecar(ckpt).read_text()) == {
        "sha256": [rundir.sha256_file(ckpt), first]
    }
    assert rundir.checkpoint_problem(ckpt) is None
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 1  # inside the tensor data: the zip index and the pickle stay whole
    ckpt.write_bytes(bytes(data))
    assert rundir.checkpoint_problem(ckpt) == (
        "its content does not match the checksum saved with it (sha256): it changed after it was written"
    )
    assert rundir.checkpoint_problem(finished / "checkpoints" / "last.ckpt") is None  # a run's own

    sharded = tmp_path / "sharded.ckpt"
    dcp.save({"w": torch.arange(4000.0)}, checkpoint_id=str(sharded))
    (sharded / "meta.pt").write_bytes(checkpoint_bytes())
    files = [p for p in sharded.iterdir() if p.is_file()]
    (sharded / rundir.CHECKSUMS).write_text(json.dumps({p.name: rundir.sha256_file(p) for p in files}))
    assert rundir.checkpoint_problem(sharded) is None
    (shard,) = sharded.glob("*.distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert rundir.checkpoint_problem(sharded) == (
        f"{shard.name} does not match the checksum saved with it (sha256): it changed after it was written"
    )


def test_a_sharded_save_hashes_each_file_as_it_writes_it(tmp_path, monkeypatch):
    from spinlab.strategy import FSDP2Strategy

    read = []
    monkeypatch.setattr(rundir, "sha256_file", lambda path: read.append(path))  # no read-back
    strategy = FSDP2Strategy()
    optimizer = {"state": {0: {"square_avg": torch.rand(300)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    target = tmp_path / "epoch0000-step0000004-0123abcd.ckpt"
    strategy.save_checkpoint(
        {"state_dict": {"w": torch.rand(4000)}, "optimizer_states": [optimizer], "epoch": 0}, target
    )
    monkeypatch.undo()
    path, digests = strategy.saved_digests
    assert path == target and read == []
    assert (
        sorted(digests)
        == sorted(p.name for p in target.iterdir())
        == [".metadata", "__0_0.distcp", "meta.pt"]
    )
    assert digests == {name: rundir.sha256_file(target / name) for name in digests}  # the bytes on disk
    (target / rundir.CHECKSUMS).write_text(json.dumps(digests))
    assert rundir.checkpoint_problem(target) is None


def test_a_dangling_last_checkpoint_link_is_refused_not_ignored(tmp_path, monkeypatch):
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").symlink_to("epoch0000-step0000004-0123abcd.ckpt")
    monkeypatch.setattr(config, "instantiate", no_model)
    with pytest.raises(
        RuntimeError, match="it is a link to epoch0000-step0000004-0123abcd.ckpt, which does not"
    ):
        spinlab.run.run(compose_cfg(["debug=fast"], root))


@pytest.mark.parametrize("damage", ["truncated", "empty", "sharded, no metadata"])
def test_a_damaged_checkpoint_is_refused_before_the_model_loads(tmp_path, monkeypatch, damage):
    root = tmp_path / "run"
    ckpt = root / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    if damage == "truncated":
        ckpt.write_bytes(checkpoint_bytes()[:5000])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    else:
        ckpt.mkdir()
        (ckpt / "__0_0.distcp").write_bytes(b"x" * 100)
    (root / "summary.json").write_text(json.dumps([{"round": 0}]))  # round 0 finished, round 1 not
    monkeypatch.setattr(config, "instantiate", no_model)
    with pytest.raises(RuntimeError) as err:
        spinlab.run.run(compose_cfg(["debug=fast"], root))
    message = str(err.value)
    assert f"the checkpoint {ckpt} is damaged" in message
    assert f"model.name_or_path={root / 'hf' / 'round_000'}" in message  # where to go on from
    assert f"mv {ckpt} {ckpt}.damaged" in message


# -- changed settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("lam=0.5", r"lam: 0.1 when the run was started, 0.5 now"),
        ("data.batch_size=2", r"data.batch_size: 4 when the run was started, 2 now"),
        ("loss=hinge", r"loss._target_: 'spinlab.losses.logistic' when the run was started"),
        (
            "round_overrides.1.lr=1e-4",
            r"round_overrides.1.lr: '<unset>' when the run was started, 0.0001 now",
        ),
        ("~eval", r"eval"),
        ("rounds=1", r"rounds=1, but this run has already finished 2 rounds"),
    ],
)
def test_changed_settings_are_refused_naming_the_setting(finished, tmp_path, monkeypatch, override, message):
    shutil.copytree(finished, tmp_path / "run")
    monkeypatch.setattr(config, "instantiate", no_model)
    with pytest.raises(ValueError, match=message):
        run(tmp_path, "run", override)


def test_settings_a_restart_may_change(finished, tmp_path, caplog):
    root = tmp_path / "run"
    shutil.copytree(finished, root)

    def check(*overrides):
        cfg = compose_cfg([*REFERENCE, *overrides], root)
        check_config(cfg)
        check_settings(rundir.RunDir(root), settings(cfg), finished=2, record=False)

    check("rounds=4", "round_overrides.2.lr=1e-4", "round_overrides.3.lam=1.0", "logger=wandb")
    check("resume=never", "callbacks.progress.refresh_rate=5", "name=renamed")
    with caplog.at_level(logging.WARNING, logger="spinlab.config"):
        check("trainer.devices=2")
    assert "trainer.devices changed from 1 to 2" in caplog.text


def test_a_start_that_made_nothing_may_change_its_settings(tmp_path):
    root = tmp_path / "run"
    first = compose_cfg(["debug=fast"], root)
    check_config(first)
    check_settings(rundir.RunDir(root), settings(first), finished=0, record=True)
    second = compose_cfg(["debug=fast", "lam=0.5"], root)
    check_settings(rundir.RunDir(root), settings(second), finished=0, record=True)
    assert OmegaConf.load(root / "run_config.yaml").lam == 0.5
    (root / "rounds").mkdir()  # now something was made with lam=0.5
    with pytest.raises(ValueError, match="lam: 0.5 when the run was started, 0.1 now"):
        check_settings(rundir.RunDir(root), settings(first), finished=0, record=True)


DIED = "[rank: 1] Child process with PID 4242 terminated with code -9. Forcefully ..."


def observed(world_size: int, last, fit) -> None:
    """`fit` inside `explained_child_deaths`, then Lightning's observer reporting a dead child."""
    from types import SimpleNamespace

    observer = logging.getLogger("lightning.fabric.strategies.launchers.subprocess_script")
    filters = list(observer.filters)
    try:
        try:
            with spinlab.run.explained_child_deaths(
                SimpleNamespace(global_rank=0, world_size=world_size), last
            ) as e:
                fit(e)
        except RuntimeError:
            pass
        observer.info(DIED)
        observer.info(DIED)
        observer.info("an unrelated record")
    finally:
        observer.filters[:] = filters


def test_a_dead_child_process_is_explained_before_lightning_kills_rank_0(tmp_path, capsys):
    """Lightning's launcher SIGKILLs the whole run within 5 s of a child's death, often before
    rank 0's collective fails: its log record is where rank 0 says what happened and what to do,
    once, whether the fit is still running or has already failed (the record can come after)."""

    def running(explaining):
        logging.getLogger("lightning.fabric.strategies.launchers.subprocess_script").info(DIED)

    def failed(explaining):
        raise RuntimeError("an error of rank 0's that names no peer")

    for fit in (running, failed):
        observed(2, tmp_path / "last.ckpt", fit)
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1, fit.__name__
        assert err[0].startswith("process rank 0 of 2: another process of this run stopped")
        assert "No checkpoint was written yet" in err[0] and "PID 4242 terminated with code -9" in err[0]

    def said(explaining):  # the collective's error named the dead peer already
        explaining.said = True
        raise RuntimeError("...")

    observed(2, tmp_path / "last.ckpt", said)
    observed(2, tmp_path / "last.ckpt", lambda explaining: None)  # a fit that ended: no filter left
    observed(1, tmp_path / "last.ckpt", failed)  # one process: nothing to watch
    assert capsys.readouterr().err == ""
