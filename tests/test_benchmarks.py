"""Every script in benchmarks/ runs at toy size, as its command line (benchmarks/README.md, "Toy
size"), so a renamed module, option, config file or test file breaks here and not unseen. Nothing
is measured: the figures are checked to be there and finite, never compared.

The sides of a benchmark run in its own process (SPINLAB_BENCH_INLINE=1: one process per script,
not per side); the scripts that start processes of their own run two at a time in the background
while the others run here, each a fork of a zygote of this process (tests/forked.py), gpu_check.sh's
steps too (its $PYTHON is the zygote's shim): none imports torch again.
"""

import json
import math
import os
import runpy
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests import forked
from tests.conftest import ROOT

BENCH = ROOT / "benchmarks"
PY = sys.executable
TRAIN_TOY = ["--device", "cpu", "--shape", "toy", "--batch", "2", "--prompt-len", "8", "--response-len", "8"]
TRAIN_TOY += ["--steps", "1", "--warmup", "1", "--threads", "1", "--timeout", "120"]
# Each generation backend but vllm, whose engine start alone takes ~30 s (tests/test_vllm.py runs it).
GEN_BACKENDS = "hf,static,static@eager,static@generate"


def env(zygote: forked.Zygote) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "SPINLAB_BENCH_INLINE": "1",
        "OMP_NUM_THREADS": "1",  # two jobs at a time on two cores: no thread pools fighting
        "PYTHON": str(zygote.python),
        "GEN_BACKENDS": GEN_BACKENDS,
    }


def run(cmd: list[str], zygote: forked.Zygote, timeout: float = 300) -> tuple[int, str, str]:
    """A command in its own process group, killed whole (gpu_check.sh's children too) on timeout;
    `python` commands through the zygote's shim."""
    if cmd[0] == PY:
        cmd = [str(zygote.python), *cmd[1:]]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(zygote),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\ntimed out after {timeout} s"
    return proc.returncode, out, err


def records(stdout: str) -> list[dict]:
    """The benchmark's JSON lines (other libraries' printed dicts left out)."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "benchmark" in row:
                rows.append(row)
    return rows


def finite(*values) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


# test name -> its command, run in the background; the longest first.
def background_jobs(tmp) -> dict:
    return {
        "test_gpu_check_runs_every_step_on_the_cpu": [
            "bash", str(BENCH / "gpu_check.sh"), "--device", "cpu", str(tmp / "gpu_check")
        ],
        "test_sharding": [
            PY, str(BENCH / "sharding.py"), "--hidden", "64", "--layers", "1", "--rounds", "1",
            "--num-prompts", "4", "--global-batch", "2", "--timeout", "120", "~eval", "generation.max_new_tokens=4",
        ],
        "test_train_throughput_cpu_command": [PY, str(BENCH / "train_throughput.py"), *TRAIN_TOY, "--bare-loop"],
        "test_round_footprint": [
            PY, str(BENCH / "round_footprint.py"), "--json", str(tmp / "footprint.json"),
            "data.num_prompts=4", "generation.max_new_tokens=4", "eval.heldout_pairs=2", "eval.task_prompts=2",
        ],
        "test_round_time": [
            PY, str(BENCH / "round_time.py"), "--prompts", "4", "--threads", "1", "--timeout", "120",
            "--", "~eval", "generation.max_new_tokens=4",
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
    """The selected tests' background commands, started at the first one, two at a time."""
    tmp = tmp_path_factory.mktemp("bench")
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    # Forked here, before the pool has threads; with what the benchmark scripts import.
    with forked.Zygote(preload=("lightning", "transformers", "trl", "spinlab.run")) as zygote:
        pool = ThreadPoolExecutor(max_workers=2)
        jobs = background_jobs(tmp).items()
        started = {name: pool.submit(run, cmd, zygote) for name, cmd in jobs if name in selected}
        yield tmp, started
        pool.shutdown(wait=True, cancel_futures=True)


def finished(jobs, name) -> str:
    returncode, out, err = jobs[1][name].result()
    assert returncode == 0, err[-5000:]
    return out


def in_process(script: str, *args: str, capsys, monkeypatch) -> list[dict]:
    """`python benchmarks/<script> args...` run here (no interpreter start), its JSON lines."""
    monkeypatch.setenv("SPINLAB_BENCH_INLINE", "1")
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), *args])
    monkeypatch.setattr(sys, "path", list(sys.path))
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    return records(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("script", "extra", "rows"),
    [("compile.py", ["--backend", "eager"], 1), ("packing.py", [], 1), ("output_layer.py", [], 2)],
)
def test_lever(script, extra, rows, capsys, monkeypatch, jobs):
    # First, and with `jobs`: the background commands start, then this runs beside them.
    found = in_process(script, *TRAIN_TOY, *extra, capsys=capsys, monkeypatch=monkeypatch)
    assert len(found) == rows
    for row in found:
        sides = [v for v in row.values() if isinstance(v, dict) and "side" in v]
        assert len(sides) == 2 and all("error" not in s for s in sides), sides
        for side in sides:
            assert finite(side["tokens_per_s"], side["peak_memory_gib"], side["last_loss"])
        assert finite(row["tokens_per_s_ratio"], row["peak_memory_ratio"])
        assert row["last_loss_abs_diff"] < 1e-4  # the lever changes the speed, not the step
        if script == "output_layer.py":  # the full output layer ran once on the chunked side: its check
            assert (
                row["chunked"]["chunked_matches"] is True and row["chunked"]["full_output_layer_calls"] == 1
            )
    torch._dynamo.reset()


def test_gpu_check_runs_every_step_on_the_cpu(jobs):
    finished(jobs, "test_gpu_check_runs_every_step_on_the_cpu")
    out = jobs[0] / "gpu_check"
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert {name for name, _, _ in steps} >= {
        "generation_throughput",
        "train_135m",
        "train_1b",
        "families",
        "pytest_gpu",
    }
    assert all(status == "0" for _, status, _ in steps), steps
    assert "--device cpu" in (out / "machine.txt").read_text()
    generation = records((out / "generation_throughput.jsonl").read_text())
    assert [r["backend"] for r in generation] == GEN_BACKENDS.split(",")
    for r in generation:
        assert (
            finite(r["new_tokens_per_s"], r["plain_new_tokens_per_s"], r["peak_memory_ratio"])
            and r["shape"] == "toy"
        )
        assert r["greedy_check"]["float32"]["prompts"] == 2
        # the profile hook: one batch under torch.profiler, its operators in a file of their own
        assert r["profile"]["top"] and finite(r["profile"]["seconds_per_decode_step"])
        assert "Self CPU" in (out / f"profile_{r['backend'].replace('@', '_')}.txt").read_text()
    train = records((out / "train_throughput.jsonl").read_text())
    assert [sorted(r["ours_variants"]) for r in train] == [
        sorted(["default", "eager", "sync", "chunk256", "chunk1024", "unchunked", "fsdp1"]),
        ["default"],
    ]
    for r in train:
        assert r["device"] == "cpu" and all(
            "error" not in r["peer"][s] for s in ("precompute_ref_log_probs", "fastest")
        )
        for name, variant in r["ours_variants"].items():
            assert "error" not in variant, (name, variant.get("error"))
            assert finite(
                variant["tokens_per_s"],
                variant["peak_memory_gib"],
                r["variant_ratios"][name]["tokens_per_s_ratio"],
            )
    families = records((out / "families_check.jsonl").read_text())
    assert [r["family"] for r in families] == ["qwen3", "gemma2"]
    assert all(r["training"]["ok"] and r["static"]["ok"] for r in families), families
    suite = ET.parse(out / "pytest_gpu.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and suite.get("failures") == suite.get("errors") == "0"


def test_train_throughput_cpu_command(jobs):
    [row] = records(finished(jobs, "test_train_throughput_cpu_command"))
    for side in (row["ours"], row["ours_bare_loop"], *row["peer"].values()):
        assert "error" not in side, side.get("error")
        assert finite(side["tokens_per_s"], side["tokens_per_cpu_s"], side["peak_memory_gib"])
    assert sorted(row["peer"]) == ["fastest", "precompute_ref_log_probs", "ref_model"]
    # TRL's speed options: Liger's kernels need triton (absent here), and TRL 1.16 turns padding-free off
    fastest = row["peer"]["fastest"]["trl_settings"]
    assert fastest["precompute_ref_log_probs"] is True and fastest["padding_free"] is False
    assert fastest["use_liger_kernel"].startswith("asked for, not available here")
    assert finite(row["tokens_per_s_ratio"], row["peak_memory_ratio"], row["bare_loop_tokens_per_s_ratio"])
    print(f"ours/TRL at toy size (not a measurement): {row['tokens_per_s_ratio']:.2f}x tokens/s")


def test_round_time(jobs):
    [row] = records(finished(jobs, "test_round_time"))
    assert "error" not in row, row.get("stderr_tail")
    assert finite(*row["breakdown"].values(), row["summary"]["loss"]) and row["training_batches"] > 0
    assert row["generation_stats"]["generation"]["responses"] == 4 == row["generation_stats"]["pairs"]


def test_round_footprint(jobs):
    out = finished(jobs, "test_round_footprint")
    listed = json.loads((jobs[0] / "footprint.json").read_text())
    assert (
        "run" in listed["files"]["src/spinlab/run.py"]
        and "PolicyModule.training_step" in listed["files"]["src/spinlab/module.py"]
    )
    assert listed["lines_src"] > 1000 and f"src/spinlab/**/*.py: {listed['lines_src']} lines" in out
    # A function's lines are within its file's, and a round runs a part of the files it touches.
    assert all(listed["lines_run"][f] > 0 for f in listed["files"])
    assert sum(listed["lines_run"].values()) < listed["lines_files"] < listed["lines_src"]


def test_sharding(jobs):
    one, two = records(finished(jobs, "test_sharding"))
    assert (one["processes"], two["processes"]) == (1, 2) and two["sharded"]
    assert len(two["per_rank"]) == 2 and finite(*two["ratio_vs_1"].values())
