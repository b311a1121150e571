"""Faults: non-finite values, unwritable or full disks, secrets, kills at any phase."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spinlab import rundir
from spinlab.steps import NonFiniteError
from tests import forked
from tests.conftest import REFERENCE, ROOT
from tests.test_e2e import NUM_PROMPTS, assert_same_run, run, weights


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nonfinite_stops_with_round_and_step_and_keeps_the_last_checkpoint(tmp_path, what):
    poison = {"_target_": "tests.helpers.PoisonRound", "round_index": 1, "what": what}
    with pytest.raises(NonFiniteError, match=rf"round 1, step 4: the {what} is not finite"):
        run(tmp_path, "run", extra_callbacks={"poison": poison})
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 4  # the end of round 0, intact
    assert (tmp_path / "run" / "hf" / "round_000").exists()
    assert not (tmp_path / "run" / "hf" / "round_001").exists()


def test_nonfinite_stop_between_logging_steps_names_the_first_bad_step_and_saves_nothing_after(tmp_path):
    # Rounds of 4 steps (0-3, 4-7); with log_every_n_steps=3 the host reads the device's record
    # after steps 2, 5 and 8, and at each epoch's end. A NaN loss at step 4 is noticed after
    # step 5, mid-round: 1 step late, at most log_every_n_steps - 1.
    poison = {"_target_": "tests.helpers.PoisonStep", "step": 4}
    with pytest.raises(
        NonFiniteError, match=r"round 1, step 4: the loss is not finite .*noticed after step 5 "
    ):
        run(tmp_path, "run", "trainer.log_every_n_steps=3", extra_callbacks={"poison": poison})
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 4  # steps 0-3 only: before the bad one
    assert not (tmp_path / "run" / "hf" / "round_001").exists()


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nonfinite_skip_counts_and_does_not_update(tmp_path, what):
    poison = {"_target_": "tests.helpers.PoisonRound", "round_index": 1, "what": what}
    summary, _ = run(tmp_path, "run", "module.on_nonfinite=skip", extra_callbacks={"poison": poison})
    assert summary[0]["skipped_batches"] == 0
    assert summary[1]["skipped_batches"] == NUM_PROMPTS // 4  # every batch of round 1
    r0, r1 = weights(tmp_path / "run" / "hf" / "round_000"), weights(tmp_path / "run" / "hf" / "round_001")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


def test_unwritable_run_dir_fails_early_naming_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=rf"cannot write the run directory {blocker}/run"):
        rundir.check_writable(blocker / "run", need_bytes=0)


def test_full_disk_fails_early_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: rundir.shutil._ntuple_diskusage(10, 9, 1))
    with pytest.raises(OSError, match=rf"{tmp_path}.*1 bytes free.*needs about 1000"):
        rundir.check_writable(tmp_path, need_bytes=1000)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "synthetic.jsonl"
    rundir.write_bytes(target, b"old\n")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", no_space)
    with pytest.raises(OSError, match=rf"cannot write {target}: No space left on device"):
        rundir.write_bytes(target, b"new\n")
    assert target.read_bytes() == b"old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic.jsonl"]


def test_a_checkpoint_write_failing_inside_torch_save_names_the_path(tmp_path, monkeypatch):
    from spinlab import callbacks

    target = tmp_path / "last.ckpt"
    callbacks.AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    old = target.read_bytes()

    def full_disk(obj, f):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(callbacks.torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"cannot write {target} \(\d+ bytes free there\): \[enforce fail"):
        callbacks.AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


def test_no_secret_reaches_the_run_directory(tmp_path, monkeypatch):
    secrets = {
        "WANDB_API_KEY": "wandb-secret-7781",
        "HF_TOKEN": "hf_secret_5512",
        "OPENAI_API_KEY": "sk-secret-9930",
    }
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    run(tmp_path, "run")
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in secrets.values():
                assert value.encode() not in data, (path, value)


def test_torn_partial_line_is_dropped(tmp_path):
    partial = tmp_path / "synthetic.partial.jsonl"
    partial.write_text('{"index": 0, "synthetic": "a"}\n{"index": 1, "synth')
    assert rundir.read_jsonl(partial, drop_torn_tail=True) == [{"index": 0, "synthetic": "a"}]


# -- SIGKILL at several phases of a real training process -------------------------------
# `python train.py` forked from the test process (tests/forked.py): a process of its own that the
# signal kills, without importing the libraries again.

COMMAND = [*REFERENCE, "hydra.verbose=[spinlab.module]"]  # per-step log lines to aim the kill at
# In the order a run reaches them (see the test below).
PHASES = {
    "round model save": ("round 0: saving the policy", 1),
    "checkpoint save": ("saving checkpoint", 1),
    "round 1 generation": ("round 1: generation batch written", 2),
    "round 1 mid-epoch": ("round 1 step", 2),
}


def train_command(run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *COMMAND, f"hydra.run.dir={run_dir}"]


def env():
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}",
    }


def run_and_kill(run_dir: Path, marker: str, occurrence: int) -> list[str]:
    """Start training, SIGKILL it when the marker shows up for the n-th time."""
    seen, lines = 0, []
    with open(run_dir.parent / f"{run_dir.name}.stderr", "w") as err:
        proc = forked.Popen(train_command(run_dir), stdout=subprocess.PIPE, stderr=err, text=True, env=env())
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen += 1
                if seen == occurrence:
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.wait(timeout=120)
    assert seen == occurrence, f"marker {marker!r} seen {seen} times:\n{''.join(lines[-20:])}"
    assert proc.returncode == -signal.SIGKILL
    return lines


@pytest.fixture(scope="module")
def uninterrupted(reference_run):
    return reference_run  # made with COMMAND's settings, in-process (conftest)


@pytest.mark.slow
def test_sigkill_at_every_phase_then_rerun_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    """One run directory killed at each phase in turn, as a job preempted again after each restart:
    each kill lands in the rerun of the one before (the round model save and the checkpoint save
    in round 0 trained again, round 1's generation resumed from its partial file, then round 1's
    training); the last rerun finishes. A rerun after each kill alone would redo the same phases."""
    run_dir = tmp_path / "run"
    killed = {phase: "".join(run_and_kill(run_dir, *PHASES[phase])) for phase in PHASES}
    assert "round 1 generate: resuming generation, 8 of 16 prompts done" in killed["round 1 mid-epoch"]
    forked.run(train_command(run_dir), check=True, env=env(), capture_output=True, timeout=600)
    assert_same_run(uninterrupted, run_dir)
    for r in ("round_000", "round_001"):
        rows = [json.loads(x) for x in (run_dir / "rounds" / r / "synthetic.jsonl").read_text().splitlines()]
        assert len(rows) == NUM_PROMPTS and len({x["prompt"] for x in rows}) == NUM_PROMPTS
    final = load_file(str(run_dir / "hf" / "round_001" / "model.safetensors"))
    assert final.keys() == load_file(str(uninterrupted / "hf" / "round_001" / "model.safetensors")).keys()
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.slow
def test_a_cached_evaluation_is_reused_only_for_the_weights_it_measured(tmp_path):
    """Killed between round 0's evaluation and its checkpoint, then resumed on another thread
    count: round 0 is trained again and comes out with other weights (reductions split over
    another number of threads round differently), so its cached eval.json is not theirs."""
    from tests.test_e2e import weights

    run_dir = tmp_path / "run"
    command = [*train_command(run_dir), "eval.heldout_pairs=8", "eval.task_prompts=0"]
    kill = "+callbacks.kill={_target_: tests.helpers.KillBeforeCheckpoint, epoch: 0}"
    killed = forked.run([*command, kill], env={**env(), "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    stale = json.loads((run_dir / "rounds" / "round_000" / "eval.json").read_text())
    stale_weights = weights(run_dir / "hf" / "round_000")
    assert [s["round"] for s in json.loads((run_dir / "summary.json").read_text())] == [0]

    rerun = forked.run(command, env={**env(), "OMP_NUM_THREADS": "2"}, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = weights(run_dir / "hf" / "round_000")
    assert any(not torch.equal(final[k], stale_weights[k]) for k in final)  # round 0 trained again
    fresh = json.loads((run_dir / "rounds" / "round_000" / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())[0]
    assert fresh["weights_sha256"] != stale["weights_sha256"]
    assert {k: v for k, v in summary.items() if k.startswith("eval/")} == {
        k: v for k, v in fresh.items() if k.startswith("eval/")
    }
    # The margin, a small difference of large log-probs, shows the weights' change (a few ulps
    # of float32 in the log-probs themselves).
    assert fresh["eval/heldout_margin"] != stale["eval/heldout_margin"]
    # ... which are these: the policy's mean log-likelihood of the held-out real responses,
    # recomputed here from hf/round_000 and the held-out pairs.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import response_logp

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf" / "round_000")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf" / "round_000")
    pairs = [
        json.loads(x) for x in (run_dir / "rounds" / "round_000" / "heldout.jsonl").read_text().splitlines()
    ]
    mean = sum(response_logp(model, tokenizer, p["prompt"], p["real"]) for p in pairs) / len(pairs)
    assert summary["eval/heldout_logp_real"] == pytest.approx(mean, rel=1e-4)


# -- stop signals (preemption): the step is saved, the status says so, the rerun continues ---------

EXIT_STOPPED = 75


def stop_at(command: list[str], run_dir: Path, marker: str, occurrence: int, signum: int, **popen):
    """Start training, send `signum` when the marker shows up for the n-th time; return the
    process and its stderr (written to a file, so that a full pipe cannot stall it)."""
    seen, lines = 0, []
    err_path = run_dir.parent / f"{run_dir.name}.stderr"
    with open(err_path, "w") as err:
        proc = forked.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env(), **popen)
        for line in proc.stdout:
            lines.append(line)
            seen += marker in line
            if seen == occurrence:
                proc.send_signal(signum)
                break
        lines += proc.stdout.readlines()
        proc.wait(timeout=300)
    assert seen == occurrence, f"marker {marker!r} seen {seen} times:\n{''.join(lines[-20:])}"
    return proc, "".join(lines), err_path.read_text()


def metric_history(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, marker, occurrence",
    [(signal.SIGTERM, "round 1 step", 2), (signal.SIGUSR1, "round 0 step", 1)],
    ids=["SIGTERM mid-round-1", "SIGUSR1 mid-round-0"],
)
def test_a_stop_signal_saves_the_step_and_the_rerun_matches_an_uninterrupted_run(
    uninterrupted, tmp_path, signum, marker, occurrence
):
    from tests.test_reliability import assert_same_history

    run_dir = tmp_path / "run"
    proc, _, err = stop_at(train_command(run_dir), run_dir, marker, occurrence, signum)
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    name = signal.Signals(signum).name
    stop_lines = [line for line in err.splitlines() if line.startswith(f"stopped by {name} after step")]
    assert len(stop_lines) == 1 and "Run the same command again to resume" in stop_lines[0], err[-2000:]
    # The checkpoint holds the step the signal arrived in, inside the round, not the round's start.
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    self_play = next(v for k, v in state["callbacks"].items() if "SelfPlayCallback" in k)
    step = int(stop_lines[0].split("after step ")[1].split()[0])
    assert state["global_step"] == step and self_play["epoch_batches"] >= 1
    summary = run_dir / "summary.json"
    finished = json.loads(summary.read_text()) if summary.exists() else []
    assert len(finished) == int(marker.split()[1])  # the round the signal arrived in is not finished
    rerun = forked.run(train_command(run_dir), env=env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # The resume after a step is exact, and said once, without Lightning's "not resumable" warning.
    assert "not resumable" not in rerun.stderr + rerun.stdout
    assert (rerun.stderr + rerun.stdout).count("of its epoch; the epoch's remaining batches follow") == 1
    assert_same_run(uninterrupted, run_dir)  # synthetic data and round weights bit-identical
    assert_same_history(metric_history(run_dir), metric_history(uninterrupted))  # every row once
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.slow
def test_a_stop_signal_as_a_round_ends_keeps_the_finished_round_and_generates_nothing_more(
    uninterrupted, tmp_path
):
    """The checkpoint at a round's end holds the finished round; the next round starts (and
    generates) only in the next epoch's loader, where an agreed stop ends the run first. The rerun
    is stopped as the last round ends: every round is finished, and the run still says it stopped."""
    from tests.test_reliability import assert_same_history

    run_dir = tmp_path / "run"
    proc, _, err = stop_at(train_command(run_dir), run_dir, "round 0: saving the policy", 1, signal.SIGTERM)
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    # The step saved is round 0's last: round 1 never started.
    assert (
        err.strip().splitlines()[-1].startswith("stopped by SIGTERM after step 4 (the end of round 0); its ")
    )
    assert [s["round"] for s in json.loads((run_dir / "summary.json").read_text())] == [0]
    assert not (run_dir / "rounds" / "round_001").exists()  # nothing of round 1 was generated
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    self_play = next(v for k, v in state["callbacks"].items() if "SelfPlayCallback" in k)
    assert sorted(self_play["rounds"]) == [0] and self_play["epoch_batches"] == 0
    assert state["global_step"] == self_play["rounds"][0]["total_steps"]
    rerun, out, err = stop_at(
        train_command(run_dir), run_dir, "round 1: saving the policy", 1, signal.SIGUSR1
    )
    assert rerun.returncode == EXIT_STOPPED, err[-3000:]
    assert "SPIN rounds" in out  # the table of the finished rounds, then the stop line
    assert err.strip().splitlines()[-1] == (
        f"stopped by SIGUSR1 after step 8 (the end of round 1): every round is finished and saved in "
        f"{run_dir}; nothing is left to resume."
    )
    assert_same_run(uninterrupted, run_dir)
    assert_same_history(metric_history(run_dir), metric_history(uninterrupted))
