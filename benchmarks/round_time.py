"""One whole SPIN round of spinlab, with its breakdown: generation, opponent scoring,
training, saving.

    python benchmarks/round_time.py                       # tiny model, 32 prompts, CPU
    python benchmarks/round_time.py --prompts 64 -- generation.max_new_tokens=48
    python benchmarks/round_time.py -- trainer=gpu model=smollm2_135m   # any train.py overrides

Runs the real `train.py` (Hydra config, Lightning fit, SelfPlayCallback, run directory) in a
subprocess with `debug=fast rounds=1` into a temporary run directory, with timers wrapped
around the framework's own methods:

- generation: `Generator.generate`, whichever backend is configured (the opponent's synthetic responses)
- opponent scoring: `SyntheticPairs.opponent_logps` (the cached opponent's log-probs)
- training: first training batch start to last training batch end
- saving: `SelfPlayCallback.finish_round` without the evaluation in it (the Hugging Face
  directory, summary.json) and `Trainer.save_checkpoint` (the Lightning checkpoint)
- evaluation: `RoundEvaluator.prepare` and `.evaluate` (the per-round held-out margin and task
  accuracy, on by default; its own generation and scoring count here, not above)
- pairs and files: the rest of `SelfPlayCallback.start_round`; the round's remainder is
  Lightning's loop, and process start-up (imports) is reported separately.

It also reads the run directory's rounds/round_000/stats.json and summary.json back and
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

PROCESS_STARTED = time.perf_counter()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="prompts in the round (data.num_prompts)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--keep", default=None, help="write the run directory here instead of a temporary one")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    return p.parse_args(argv)


class Phases:
    """Wall seconds per phase, summed over calls.

    A wrapped call nested in another wrapped call is taken out of the outer call's own time
    (generation inside `start_round` counts as generation, not as round start); inside an
    `absorbing` phase (evaluation) nested calls stay part of it.
    """

    def __init__(self, absorbing: tuple[str, ...] = ("evaluation",)):
        self.absorbing = absorbing
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[list] = []  # [phase, seconds spent in nested recorded calls]
        self.first_batch: float | None = None
        self.last_batch: float | None = None
        self.batches = 0
        self.tokens = 0

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)
        phases = self

        def timed(*a, **kw):
            if any(frame[0] in phases.absorbing for frame in phases.stack):
                return original(*a, **kw)
            frame = [phase, 0.0]
            phases.stack.append(frame)
            started = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                elapsed = time.perf_counter() - started
                phases.stack.pop()
                phases.seconds[phase] = phases.seconds.get(phase, 0.0) + elapsed - frame[1]
                phases.calls[phase] = phases.calls.get(phase, 0) + 1
                if phases.stack:
                    phases.stack[-1][1] += elapsed

        setattr(owner, name, timed)

    def wrap_batches(self, owner) -> None:
        start, end = owner.on_train_batch_start, owner.on_train_batch_end
        phases = self

        def on_start(module, batch, batch_idx):
            if phases.first_batch is None:
                phases.first_batch = time.perf_counter()
            return start(module, batch, batch_idx)

        def on_end(module, outputs, batch, batch_idx):
            out = end(module, outputs, batch, batch_idx)
            phases.last_batch = time.perf_counter()
            phases.batches += 1
            phases.tokens += int(batch["attention_mask"].sum())
            return out

        owner.on_train_batch_start, owner.on_train_batch_end = on_start, on_end


def child(args) -> None:
    import lightning as L
    import torch

    from spinlab import callbacks, generation, module, rounds

    if args.threads:
        torch.set_num_threads(args.threads)
    phases = Phases()
    phases.wrap(generation.Generator, "generate", "generation")
    phases.wrap(rounds.SyntheticPairs, "opponent_logps", "opponent_scoring")
    phases.wrap(callbacks.SelfPlayCallback, "start_round", "round_start_other")
    phases.wrap(callbacks.SelfPlayCallback, "finish_round", "saving_hf")
    phases.wrap(L.Trainer, "save_checkpoint", "saving_checkpoint")
    try:
        from spinlab import evaluation
    except ImportError:  # an older tree without per-round evaluation
        evaluation = None
    if evaluation is not None:
        phases.wrap(evaluation.RoundEvaluator, "prepare", "evaluation")
        phases.wrap(evaluation.RoundEvaluator, "evaluate", "evaluation")
    phases.wrap_batches(module.PolicyModule)

    overrides = [
        "debug=fast",
        "rounds=1",
        f"data.num_prompts={args.prompts}",
        f"hydra.run.dir={args.run_dir}",
        *args.overrides,
    ]
    sys.argv = ["train.py", *overrides]
    fit_started = time.perf_counter()
    # As `python train.py ...`: Hydra finds conf/ next to the script.
    runpy.run_path(str(common.REPO / "train.py"), run_name="__main__")
    ended = time.perf_counter()

    run_dir = Path(args.run_dir)
    stats = json.loads((run_dir / "rounds" / "round_000" / "stats.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())[0]
    training = (phases.last_batch - phases.first_batch) if phases.batches else 0.0
    seconds = phases.seconds
    breakdown = {
        "generation_s": seconds.get("generation", 0.0),
        "opponent_scoring_s": seconds.get("opponent_scoring", 0.0),
        "training_s": training,
        "saving_s": seconds.get("saving_hf", 0.0) + seconds.get("saving_checkpoint", 0.0),
        "evaluation_s": seconds.get("evaluation", 0.0),
        # start_round's own time: reading rows, building and tokenising pairs, writing files.
        "pairs_and_files_s": seconds.get("round_start_other", 0.0),
    }
    round_s = summary.get("seconds")
    result = {
        "overrides": overrides,
        "torch_threads": torch.get_num_threads(),
        "breakdown": breakdown,
        "saving_detail": {
            "hf_directory_s": seconds.get("saving_hf", 0.0),
            "lightning_checkpoint_s": seconds.get("saving_checkpoint", 0.0),
        },
        "calls": phases.calls,
        # The round's own clock (summary.json) runs from start_round to the end of finish_round,
        # before the Lightning checkpoint; what it holds beyond the phases is Lightning's loop.
        "round_s_from_summary": round_s,
        "other_in_round_s": None
        if round_s is None
        else round_s - sum(breakdown.values()) + seconds.get("saving_checkpoint", 0.0),
        "fit_wall_s": ended - fit_started,
        "startup_s": fit_started - PROCESS_STARTED,  # Python start and imports
        "process_wall_s": ended - PROCESS_STARTED,
        "training_batches": phases.batches,
        "training_tokens": phases.tokens,
        "training_tokens_per_s": phases.tokens / training if training else None,
        "generation_stats": stats,
        "summary": summary,
        "peak_rss_gib": common.peak_rss_bytes() / 2**30,
    }
    common.write_result(args.result_file, result)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="spinlab-round-") as tmp:
        run_dir = args.keep or str(Path(tmp) / "run")
        argv = ["--child", "--prompts", str(args.prompts), "--run-dir", run_dir]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        argv += ["--", *args.overrides]
        result = common.run_child(Path(__file__).resolve(), argv, args.timeout)
    common.emit({"benchmark": "round_time", "prompts": args.prompts, **result, "machine": common.machine()})


if __name__ == "__main__":
    main()
