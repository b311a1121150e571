"""The two choices of experiments/self_play_family, both read on the validation split:

python experiments/self_play_family/choose.py start [--tol 0.1]
    the converged SFT start: the round of runs/sft_start with the highest held-out
    log-likelihood of real responses, once the curve has plateaued (the last two rounds gain
    less than --tol nats over the best round before them); links runs/start to its weights.
python experiments/self_play_family/choose.py lr
    the learning rate of each objective: the one whose single round ends with the highest
    held-out log p(real) in runs/lrsel (ties: task accuracy); prints `objective lr` lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spinlab.report import collect

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
KEY, TIE = "eval/heldout_logp_real", "eval/task_accuracy"


def select_start(tol: float) -> int:
    run = RUNS / "sft_start"
    summary = json.loads((run / "summary.json").read_text())
    for r in summary:
        print(f"round {r['round']}: log p(real) {r[KEY]:.3f}, accuracy {r[TIE]:.3f}")
    curve = [r[KEY] for r in summary]
    if len(curve) < 3 or max(curve[-2:]) - max(curve[:-2]) >= tol:
        more = len(curve) + 4
        print(
            f"not plateaued yet (the last two rounds gain >= {tol} nats, or fewer than 3 rounds): extend the "
            f"run with python train.py experiment=converged_sft rounds={more} hydra.run.dir={run}",
            file=sys.stderr,
        )
        return 1
    best = max(range(len(curve)), key=curve.__getitem__)
    weights = run / "hf" / f"round_{best:03d}"
    link = RUNS / "start"
    link.unlink(missing_ok=True)
    link.symlink_to(weights.relative_to(RUNS))
    print(f"start: round {best} ({curve[best]:.3f}) -> {link}")
    return 0


def select_lr() -> int:
    df = collect(RUNS / "lrsel")
    last = df.sort_values("round").groupby("run").tail(1)
    for objective, group in last.groupby(last["variant"].str.extract(r"objective=(\w+)")[0].fillna("spin")):
        best = group.sort_values([KEY, TIE], ascending=False).iloc[0]
        lr = float(best["variant"].split("optimizer.lr=")[1].split(",")[0])
        print(objective, lr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("start", "lr"))
    p.add_argument("--tol", type=float, default=0.1)
    args = p.parse_args(argv)
    return select_start(args.tol) if args.what == "start" else select_lr()


if __name__ == "__main__":
    sys.exit(main())
