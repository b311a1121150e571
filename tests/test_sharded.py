"""Sharded rounds: FSDP2 over 2 CPU processes (gloo) through every phase of a round.

Every run here is a real `python train.py ... trainer=fsdp_cpu` with two processes: rank 0 forked
from the test process (tests/forked.py), rank 1 started by Lightning's launcher and forked from rank
0 (the README's `trainer=fsdp_cpu` command starts it as a fresh interpreter). One global batch of 4 pairs per step either way: one process at batch 4 (conftest's
reference run), or 2 processes at batch 2.
"""

import builtins
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spinlab import rundir
from spinlab.models import tiny_model
from tests import forked
from tests.conftest import REFERENCE, made_once
from tests.test_e2e import NUM_PROMPTS, rows, weights
from tests.test_faults import ROOT, env

pytestmark = pytest.mark.slow

BASE = [*REFERENCE, "hydra.verbose=[spinlab.module]"]
SHARDED = ["trainer=fsdp_cpu", "data.batch_size=2"]


def command(run_dir, *overrides):
    return [sys.executable, str(ROOT / "train.py"), *BASE, *overrides, f"hydra.run.dir={run_dir}"]


def train(run_dir, *overrides, environ=None):
    """A finished run (rank 0 forked)."""
    out = forked.run(
        command(run_dir, *overrides),
        env=environ or env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SPIN rounds" in out.stdout
    # Every process measures the data at start; rank 1's info lines go to its
    # train_ddp_process_1.log only, so the console shows one copy.
    assert out.stdout.count("measured from the data)") == 1, out.stdout[-3000:]
    return out


def step_losses(run_dir) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def start(run_dir, *overrides) -> subprocess.Popen:
    """A run in its own session (so that all its processes can be killed together), output piped."""
    return forked.Popen(
        command(run_dir, *overrides),
        env=env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_all_at(run_dir, marker: str, *overrides) -> None:
    """Start a sharded run in its own session and SIGKILL every process of it at the marker."""
    proc = start(run_dir, *overrides)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            os.killpg(proc.pid, signal.SIGKILL)  # a preempted job: every rank at once
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference_run):
    """The sharded run, made once per session (every test here compares with it), and the
    single-process run of the same settings (conftest's reference run). Both read-only."""

    def make(path):
        started = time.perf_counter()
        train(path / "sharded", *SHARDED)
        (path / "seconds").write_text(f"{time.perf_counter() - started:.1f}")

    tmp = made_once(tmp_path_factory, "sharded_run", make)
    return {"sharded": tmp / "sharded", "single": reference_run, "seconds": (tmp / "seconds").read_text()}


def test_two_processes_match_one_process(runs):
    print(f"two-process fsdp_cpu run: {runs['seconds']} s")
    sharded, single = runs["sharded"], runs["single"]
    for r in ("round_000", "round_001"):
        assert (sharded / "rounds" / r / "synthetic.jsonl").read_bytes() == (
            single / "rounds" / r / "synthetic.jsonl"
        ).read_bytes()
    a, b = step_losses(sharded), step_losses(single)
    assert sorted(a) == sorted(b) == list(range(8))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-4), step
    wa, wb = weights(sharded / "hf" / "round_001"), weights(single / "hf" / "round_001")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-4)
    assert not list((sharded / "rounds").rglob("synthetic.partial*"))


def test_saved_model_holds_full_trained_tensors(runs):
    initial = tiny_model(seed=0).model.state_dict()
    saved = weights(runs["sharded"] / "hf" / "round_001")
    assert saved and all(saved[k].shape == initial[k].shape for k in saved)  # whole tensors, not shards
    moved = [k for k in saved if not torch.equal(saved[k], initial[k])]
    assert len(moved) == len(saved)
    model = AutoModelForCausalLM.from_pretrained(runs["sharded"] / "hf" / "round_001")
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in tiny_model(seed=0).model.parameters()
    )


def test_sharded_checkpoint_is_a_directory_behind_a_link(runs):
    last = runs["sharded"] / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and last.resolve().name.startswith("epoch0001-step0000008-")
    assert sorted(p.name for p in last.resolve().iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "checksums.json",  # the sha256 of every other file, checked before a resume
        "meta.pt",
    ]
    assert [p for p in last.parent.iterdir() if p.name.startswith("epoch")] == [last.resolve()]


def test_bf16_mixed_sharded_round_finishes_and_loads(tmp_path):
    train(tmp_path / "bf16", *SHARDED, "trainer.precision=bf16-mixed", "rounds=1")
    losses = step_losses(tmp_path / "bf16")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "hf" / "round_000")
    loaded = dict(model.named_parameters())
    initial = dict(tiny_model(seed=0).model.named_parameters())
    assert loaded.keys() == initial.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32, name  # fp32 master weights are what is saved
        assert tensor.shape == initial[name].shape, name  # whole tensors, not one process's shard
        assert torch.isfinite(tensor).all(), name
        assert not torch.equal(tensor, initial[name]), name  # every tensor trained
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


def test_sigkill_of_every_process_in_generation_then_in_training_then_rerun_matches(runs, tmp_path):
    """Every process killed in round 1's generation, then again in the rerun's training (a job
    preempted again after its restart); the last rerun finishes."""
    sharded = runs["sharded"]
    run_dir = tmp_path / "run"
    kill_all_at(run_dir, "round 1: generation batch written", *SHARDED)
    kill_all_at(run_dir, "round 1 step 5", *SHARDED)
    train(run_dir, *SHARDED)
    for r in ("round_000", "round_001"):
        synthetic = rows(run_dir / "rounds" / r / "synthetic.jsonl")
        assert len(synthetic) == NUM_PROMPTS and len({x["prompt"] for x in synthetic}) == NUM_PROMPTS
        assert (run_dir / "rounds" / r / "synthetic.jsonl").read_bytes() == (
            sharded / "rounds" / r / "synthetic.jsonl"
        ).read_bytes()
    final, reference = weights(run_dir / "hf" / "round_001"), weights(sharded / "hf" / "round_001")
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-4)
    # Every step, the redone ones included, saw the same pairs and weights as the uninterrupted run.
    resumed, uninterrupted = step_losses(run_dir), step_losses(sharded)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(8))
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step
    assert load_file(str(run_dir / "hf" / "round_000" / "model.safetensors")).keys() == reference.keys()


def test_one_process_dying_alone_stops_the_other_naming_its_rank(tmp_path):
    proc = start(tmp_path / "run", *SHARDED, "data.num_prompts=64")
    for line in proc.stdout:
        if "round 0 step 5" in line:
            (child,) = subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
            os.kill(int(child), signal.SIGKILL)  # rank 1 alone
            killed = time.perf_counter()
            break
    try:
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode not in (0, None) and time.perf_counter() - killed < 120
    assert "process rank 0 of 2: another process of this run stopped" in rest, rest[-3000:]


def test_generation_on_the_shards_in_lockstep_gives_the_same_synthetic_data(runs, tmp_path):
    """module.gather_for_generation=false: the fallback when a model's full weights do not fit."""
    sharded = runs["sharded"]
    train(tmp_path / "lockstep", *SHARDED, "module.gather_for_generation=false", "rounds=1", "~eval")
    assert (tmp_path / "lockstep" / "rounds" / "round_000" / "synthetic.jsonl").read_bytes() == (
        sharded / "rounds" / "round_000" / "synthetic.jsonl"
    ).read_bytes()


# Every process of a run counts the bytes the checksum code reads (spinlab.rundir's file reads),
# one line per read: PID, bytes, file. `counting_open` stands in for spinlab.rundir's open.
class Counted:
    def __init__(self, f, name):
        self.f, self.name = f, name

    def read(self, n=-1):
        data = self.f.read(n)
        with builtins.open(os.environ["SPINLAB_TEST_READS"], "a") as log:
            log.write(f"{os.getpid()} {len(data)} {self.name}\n")
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def counting_open(path, mode="r", *args, **kwargs):
    f = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115  (closed by Counted or its caller)
    return Counted(f, str(path)) if "r" in mode else f


def bytes_read(log) -> dict[int, int]:
    """Bytes read by the checksum code, by process."""
    per_process: dict[int, int] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        pid, size, _ = line.split(" ", 2)
        per_process[int(pid)] = per_process.get(int(pid), 0) + int(size)
    return per_process


def test_extending_a_finished_sharded_run_matches_a_longer_run(runs, tmp_path, monkeypatch):
    """Sharded strategies restore weights and callback state only after on_fit_start: the round
    that a resumed or extended run starts with must still begin from the restored state.

    Also counts the bytes the checksum code reads (not the time it takes): a save hashes what it
    writes as it writes it and reads nothing back; a two-process restart reads each file of the
    checkpoint once, in one process, not once per process."""
    sharded = runs["sharded"]
    # Both ranks, forked from this process, count with the open put into spinlab.rundir here.
    monkeypatch.setattr(rundir, "open", counting_open, raising=False)
    counted = env()
    train(
        tmp_path / "extended",
        *SHARDED,
        "rounds=1",
        environ={**counted, "SPINLAB_TEST_READS": str(tmp_path / "save")},
    )
    assert bytes_read(tmp_path / "save") == {}  # the save of round 0: digests from the stream written
    last = (tmp_path / "extended" / "checkpoints" / "last.ckpt").resolve()
    listed = json.loads((last / "checksums.json").read_text())
    assert sorted(listed) == sorted(p.name for p in last.iterdir() if p.name != "checksums.json")
    size = sum((last / name).stat().st_size for name in listed)
    train(
        tmp_path / "extended",
        *SHARDED,
        "rounds=2",
        environ={**counted, "SPINLAB_TEST_READS": str(tmp_path / "restart")},
    )
    read = bytes_read(tmp_path / "restart")
    print(f"checkpoint {size} bytes; read at the restart: {read}")
    assert list(read.values()) == [size]  # one process read the checkpoint, once
    r1 = "rounds/round_001/synthetic.jsonl"
    assert (tmp_path / "extended" / r1).read_bytes() == (sharded / r1).read_bytes()
    a, b = weights(tmp_path / "extended" / "hf" / "round_001"), weights(sharded / "hf" / "round_001")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4)


def stop(run_dir, signum, marker, whole_group) -> None:
    """Start the sharded run, send `signum` at the marker (to every process, or to rank 1 alone),
    and check that every process saved the step the signal arrived in and exited with 75."""
    proc = start(run_dir, *SHARDED)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            if whole_group:
                os.killpg(proc.pid, signum)  # a preempted job: every rank at once
            else:  # rank 0 learns it at the step's end, and names this signal, not another
                (child,) = subprocess.run(
                    ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
                ).stdout.split()
                os.kill(int(child), signum)
            break
    try:
        seen += proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(seen)
    assert proc.returncode == 75, out[-3000:]
    name = signal.Signals(signum).name
    assert out.count(f"stopped by {name} after step") == 1, out[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    step = int(out.split(f"stopped by {name} after step ")[1].split()[0])
    assert last.is_symlink() and f"-step{step:07d}-" in last.resolve().name
    assert step % 4  # inside a round (4 steps each), not at its end


def test_stop_signals_save_the_step_on_every_process_and_the_rerun_matches(runs, tmp_path):
    """SIGUSR1 to rank 1 alone in round 0, then SIGTERM to every process in the rerun's round 1
    (a job preempted again after its restart); the last rerun finishes."""
    sharded = runs["sharded"]
    run_dir = tmp_path / "run"
    stop(run_dir, signal.SIGUSR1, "round 0 step 1", whole_group=False)
    stop(run_dir, signal.SIGTERM, "round 1 step 5", whole_group=True)
    train(run_dir, *SHARDED)
    for r in ("round_000", "round_001"):
        assert (run_dir / "rounds" / r / "synthetic.jsonl").read_bytes() == (
            sharded / "rounds" / r / "synthetic.jsonl"
        ).read_bytes()
        final, reference = weights(run_dir / "hf" / r), weights(sharded / "hf" / r)
        assert final.keys() == reference.keys()
        for key in reference:
            assert torch.equal(final[key], reference[key]), (r, key)
    with open(run_dir / "csv" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == list(range(8))  # every step's row once
    assert step_losses(run_dir) == step_losses(sharded)
