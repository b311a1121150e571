"""Table and plots of experiments/spin_vs_sft: every arm per round, mean ± std over seeds.

python experiments/spin_vs_sft/summarize.py  ->  experiments/spin_vs_sft/results/
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
ARMS = {  # sweep directory: label
    "spin": "SPIN",
    "spin_mix": "SPIN + previous round's data",
    "spin_lr1e-5": "SPIN, lr 1e-5 (5x the selected)",
    "sft": "continued SFT (same steps)",
    "sft_2x": "continued SFT (2 epochs/round: same tokens)",
}
METRICS = {  # summary key: column title
    "eval/task_accuracy": "test accuracy",
    "eval/heldout_logp_real": "log p(real) held-out",
    "eval/task_ngram_tv": "bigram TV (greedy vs real)",
    "eval/task_length_ratio": "length ratio (greedy / real)",
    "eval/synthetic_ngram_tv": "bigram TV (sampled vs real)",
}


def load() -> pd.DataFrame:
    frames = []
    for arm, label in ARMS.items():
        if (RUNS / arm).is_dir():
            df = collect(RUNS / arm)
            df["arm"], df["after_round"] = label, df["round"] + 1
            frames.append(df)
    for path in sorted((RUNS / "baseline" / "test").glob("seed=*/eval.json")):
        seed = int(path.parent.name.split("=")[1])
        frames.append(
            pd.DataFrame(
                [
                    {
                        **json.loads(path.read_text()),
                        "arm": "weak SFT model (start)",
                        "seed": seed,
                        "after_round": 0,
                    }
                ]
            )
        )
    if not frames:
        raise FileNotFoundError(f"no runs under {RUNS}: run experiments/spin_vs_sft/run.sh first")
    return pd.concat(frames, ignore_index=True)


def markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main() -> None:
    df = load()
    # The synthetic responses of round t are sampled at its start, by θ_t: the model after t
    # rounds. Shift them to that row (the weak model's own evaluation holds its samples).
    runs, base = df[df["round"].notna()], df[df["round"].isna()]
    sampled = runs[["arm", "seed", "round", "eval/synthetic_ngram_tv"]].rename(
        columns={"round": "after_round"}
    )
    runs = runs.drop(columns=["eval/synthetic_ngram_tv"]).merge(
        sampled, on=["arm", "seed", "after_round"], how="left"
    )
    df = pd.concat([base, runs], ignore_index=True)
    rows = []
    for arm in ["weak SFT model (start)", *ARMS.values()]:
        part = df[df["arm"] == arm] if arm != "weak SFT model (start)" else base
        for after, group in part.groupby("after_round"):
            row = {"arm": arm, "after round": int(after), "seeds": group["seed"].nunique()}
            for key, title in METRICS.items():
                values = group[key].dropna()
                row[title] = (
                    f"{values.mean():.3f} ± {values.std():.3f}"
                    if len(values) > 1
                    else (f"{values.mean():.3f}" if len(values) else "–")
                )
            if "train_tokens" in group:
                row["train tokens (M)"] = (
                    f"{group['train_tokens'].mean() / 1e6:.2f}"
                    if group["train_tokens"].notna().any()
                    else "–"
                )
            rows.append(row)
    table = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / "table.csv", index=False)
    df.to_csv(RESULTS / "all_rounds.csv", index=False)
    text = markdown(table)
    (RESULTS / "table.md").write_text(text)
    print(text)

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, key in zip(axes, list(METRICS)[:4], strict=True):
        for arm in ARMS.values():
            part = pd.concat([base.assign(arm=arm), df[df["arm"] == arm]])
            stats = part.groupby("after_round")[key].agg(["mean", "std"]).reset_index()
            if stats["mean"].notna().sum() < 2:
                continue
            ax.errorbar(
                stats["after_round"],
                stats["mean"],
                yerr=stats["std"].fillna(0),
                marker="o",
                capsize=3,
                label=arm,
            )
        ax.set_title(METRICS[key])
        ax.set_xlabel("rounds trained (0 = weak SFT model)")
        ax.set_xticks(range(5))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "rounds.png", dpi=110)


if __name__ == "__main__":
    main()
