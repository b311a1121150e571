"""The family's table and plot: every method per round on the test split, mean ± std over seeds,
with the converged SFT start as round 0.

python experiments/self_play_family/summarize.py  ->  experiments/self_play_family/results/
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from spinlab.report import collect

HERE = Path(__file__).resolve().parent
RUNS, RESULTS = HERE / "runs", HERE / "results"
METHODS = {"spin": "SPIN", "tspin": "T-SPIN", "sft": "continued SFT"}
METRICS = {  # summary key: column title
    "eval/task_accuracy": "test accuracy",
    "eval/heldout_logp_real": "log p(real), held-out",
    "eval/task_ngram_tv": "bigram TV (greedy vs real)",
    "eval/heldout_margin": "held-out margin",
}
START = "converged SFT model (start)"


def load() -> pd.DataFrame:
    frames = []
    for key, label in METHODS.items():
        if (RUNS / "family" / key).is_dir():
            df = collect(RUNS / "family" / key)
            frames.append(df.assign(method=label, after_round=df["round"] + 1))
    for path in sorted((RUNS / "baseline" / "test").glob("seed=*/eval.json")):
        row = {**json.loads(path.read_text()), "seed": int(path.parent.name.split("=")[1])}
        frames.append(pd.DataFrame([{**row, "method": START, "after_round": 0}]))
    if not frames:
        raise FileNotFoundError(f"no runs under {RUNS}: run experiments/self_play_family/run.sh first")
    return pd.concat(frames, ignore_index=True)


def cell(values: pd.Series) -> str:
    values = values.dropna()
    if len(values) == 0:
        return "–"
    return f"{values.mean():.3f} ± {values.std():.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def main() -> None:
    df = load()
    rows = []
    for method in [START, *METHODS.values()]:
        for after, group in df[df["method"] == method].groupby("after_round"):
            row = {"method": method, "after round": int(after), "seeds": group["seed"].nunique()}
            row.update({title: cell(group[key]) for key, title in METRICS.items() if key in group})
            rows.append(row)
    table = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / "table.csv", index=False)
    df.to_csv(RESULTS / "all_rounds.csv", index=False)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    (RESULTS / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    start = df[df["method"] == START]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ["eval/task_accuracy", "eval/heldout_logp_real"], strict=True):
        for method in METHODS.values():
            part = pd.concat([start, df[df["method"] == method]])
            stats = part.groupby("after_round")[key].agg(["mean", "std"]).reset_index()
            ax.errorbar(
                stats["after_round"],
                stats["mean"],
                yerr=stats["std"].fillna(0),
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set_title(METRICS[key] + " (test, ± std over seeds)")
        ax.set_xlabel("rounds trained (0 = converged SFT model)")
        ax.set_xticks(range(int(df["after_round"].max()) + 1))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "rounds.png", dpi=110)


if __name__ == "__main__":
    main()
