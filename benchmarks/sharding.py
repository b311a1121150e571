"""Memory per process under FSDP2: 1 process against 2 on the same model and the same global batch.

Each side is a real `python train.py trainer=fsdp_cpu ...` run in its own subprocess (Lightning
starts the second process of the 2-process side itself), with one extra callback, `MemoryProbe`,
added through the config. After real optimizer steps the probe counts, on every rank, the bytes of
parameters, gradients and optimizer state that rank holds (the local shard of each DTensor) and
reads its peak RSS. One JSON line per process count, with the per-rank bytes and the ratios
2-process / 1-process (about 0.5 expected for parameters, gradients and optimizer state).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sharding.py
    .venv/bin/python benchmarks/sharding.py --hidden 512 --layers 8 --accelerator gpu   # on GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parent.parent


def local_bytes(t: torch.Tensor | None) -> int:
    """Bytes this process holds for a tensor: its own shard when the tensor is a DTensor."""
    if t is None:
        return 0
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def full_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # a DTensor reports its global shape


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class MemoryProbe(L.Callback):
    """Per-rank bytes of parameters, gradients and optimizer state, written to <out>/rank<N>.json.

    Gradients are read just before each optimizer step (Lightning frees them after it); parameters
    and optimizer state after each step. The file is rewritten after every step, so it holds the
    figures after the last one.
    """

    def __init__(self, out: str):
        self.out = Path(out)
        self.grad_bytes = 0
        self.grad_full_bytes = 0
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for p in pl_module.parameters() if p.grad is not None]
        self.grad_bytes = max(self.grad_bytes, sum(local_bytes(p.grad) for p in params))
        self.grad_full_bytes = max(self.grad_full_bytes, sum(full_bytes(p.grad) for p in params))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        params = list(pl_module.parameters())
        state = [t for opt in trainer.optimizers for s in opt.state.values() for t in s.values()]
        state = [t for t in state if isinstance(t, torch.Tensor)]
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "optimizer_steps": trainer.global_step,
            "param_count": sum(p.numel() for p in params),
            "param_bytes": sum(local_bytes(p) for p in params),
            "param_full_bytes": sum(full_bytes(p) for p in params),
            "grad_bytes": self.grad_bytes,
            "grad_full_bytes": self.grad_full_bytes,
            "optimizer_state_bytes": sum(local_bytes(t) for t in state),
            "optimizer_state_full_bytes": sum(full_bytes(t) for t in state),
            "sharded": any(type(p).__name__ == "DTensor" for p in params),
            "peak_rss_bytes": peak_rss_bytes(),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".rank{trainer.global_rank}.json"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.out / f"rank{trainer.global_rank}.json")

    def on_train_end(self, trainer, pl_module) -> None:
        path = self.out / f"rank{trainer.global_rank}.json"
        if path.exists():  # the peak RSS of the whole run, including the last round's saving
            record = json.loads(path.read_text())
            record["peak_rss_bytes"] = peak_rss_bytes()
            path.write_text(json.dumps(record))


def run_side(args, processes: int, work: Path) -> dict:
    """One `train.py` run with `processes` processes and the probe; the records of every rank."""
    probe_dir = work / f"probe_{processes}"
    batch, rem = divmod(args.global_batch, processes)
    if rem:
        raise SystemExit(f"--global-batch {args.global_batch} must divide by {processes} processes")
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "debug=fast",
        f"trainer={'fsdp' if args.accelerator == 'gpu' else 'fsdp_cpu'}",
        f"trainer.devices={processes}",
        f"trainer.precision={args.precision}",
        f"rounds={args.rounds}",
        f"data.num_prompts={args.num_prompts}",
        f"data.batch_size={batch}",
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        f"model.intermediate_size={4 * args.hidden}",
        f"model.num_heads={args.hidden // 64}",
        f"model.num_kv_heads={max(1, args.hidden // 128)}",
        f"+callbacks.memory_probe={{_target_: benchmarks.sharding.MemoryProbe, out: '{probe_dir}'}}",
        f"hydra.run.dir={work / f'run_{processes}'}",
        *args.overrides,
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-20000:])
        raise SystemExit(f"{processes}-process run failed (exit {proc.returncode}): {' '.join(cmd)}")
    ranks = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in range(processes)]
    return {"processes": processes, "wall_s": round(wall, 1), "ranks": ranks, "command": " ".join(cmd[1:])}


FIGURES = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "peak_rss_bytes")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="hidden size (heads of 64; MLP 4x hidden)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--global-batch", type=int, default=4, help="pairs per optimizer step, all processes")
    p.add_argument("--precision", default="32-true", help="trainer.precision (bf16-mixed keeps fp32 masters)")
    p.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="trainer=fsdp_cpu or fsdp")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--timeout", type=float, default=600, help="seconds per side")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for both sides")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="spinlab-sharding-") as tmp:
        sides = [run_side(args, n, Path(tmp)) for n in args.processes]
    base = sides[0]
    for side in sides:
        record = {
            "benchmark": "sharding",
            "model": {
                "hidden": args.hidden,
                "layers": args.layers,
                "params": side["ranks"][0]["param_count"],
            },
            "precision": args.precision,
            "global_batch": args.global_batch,
            **{k: side[k] for k in ("processes", "wall_s")},
            "optimizer_steps": side["ranks"][0]["optimizer_steps"],
            "sharded": side["ranks"][0]["sharded"],
            "per_rank": [{k: r[k] for k in ("rank", *FIGURES)} for r in side["ranks"]],
            "full_bytes": {k: side["ranks"][0][k.replace("_bytes", "_full_bytes")] for k in FIGURES[:3]},
        }
        if side is not base:
            record[f"ratio_vs_{base['processes']}"] = {
                k: max(r[k] for r in side["ranks"]) / max(r[k] for r in base["ranks"]) for k in FIGURES
            }
        record["torch"] = torch.__version__
        record["command"] = side["command"]
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
