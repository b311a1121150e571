"""Tables of a run and of a sweep.

`print_summary`: the per-round table a run ends with. `python -m spinlab.report multirun/spin
[--out DIR] [--metrics ...]`: the tables and plots of a sweep. A run directory is any directory under the sweep holding `summary.json` (one entry per finished
round) and `.hydra/config.yaml`. Runs are grouped into cells by loss, λ and their other
overrides (the variant; e.g. `optimizer.lr=...` in a sweep over it), and each cell's per-round
metrics are averaged over seeds. `collect` and `summarise` are the same steps for a notebook.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from hydra.experimental.callback import Callback
from hydra.utils import get_class

from spinlab.rundir import RunDir
from spinlab.sweep import exit_status, failures

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CELL = ["loss_fn", "lam", "variant"]
DEFAULT_METRICS = ("loss", "margin", "accuracy")
# Per-round evaluations join the default columns whatever their names (bench/: lm-eval tasks,
# whose round -1 is the start model).
EVAL_PREFIXES = ("eval/", "val/", "bench/")
# Overrides that name the cell or the seed, or only say where the run goes: not part of the variant.
NOT_VARIANT = {"loss", "lam", "seed", "resume", "name", "run_dir", "run_name"}


# -- a run's table --------------------------------------------------------------------------------
def main_columns(summaries: dict) -> list[str]:
    """Summary keys of the benchmarks' main metrics (`bench/<task>`, the average), in order."""
    keys: dict[str, None] = {}
    for s in summaries.values():
        keys.update({k: None for k in s if k.startswith("bench/") and k.count("/") == 1})
    keys.pop("bench/seconds", None)
    return list(keys)


def print_summary(summaries: dict, run_dir: RunDir, objective: str) -> None:
    columns = [  # (header, summary key, format)
        ("loss", "loss", ".4f"),
        ("margin", "margin", ".4f"),
        ("accuracy", "accuracy", ".3f"),
        ("heldout_acc", "eval/heldout_accuracy", ".3f"),
        ("task_acc", "eval/task_accuracy", ".3f"),
        ("lam", "lam", "g"),
        ("pairs", "pairs", "d"),
        ("seconds", "seconds", ".1f"),
    ]
    columns += [(k.removeprefix("bench/"), k, ".3f") for k in main_columns(summaries)]  # lm-eval tasks
    columns = [c for c in columns if any(c[1] in s for s in summaries.values())]
    widths = [max(11, len(h)) for h, _, _ in columns]
    lines = [f"{'round':>5} " + " ".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, widths, strict=True))]
    for index in sorted(summaries):
        s = summaries[index]
        cells = (  # "-": not measured for this row (the start model has no training loss)
            f"{s[k]:>{w}{f}}" if k in s else f"{'-':>{w}}"
            for (_, k, f), w in zip(columns, widths, strict=True)
        )
        lines.append(f"{'start' if index < 0 else index:>5} " + " ".join(cells))
    method = get_class(objective).name
    if any("margin" in s for s in summaries.values()):
        title = f"\n{method} rounds (accuracy = share of pairs with real over synthetic, margin > 0)"
    else:
        title = f"\n{method} rounds (loss = mean negative log-likelihood per response token)"
    lines.insert(0, title)
    lines.append(f"run directory: {run_dir.root}")
    # One write: the other processes of a sharded run share this stream, and a table cut by
    # their lines is unreadable.
    sys.stdout.flush()
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


# -- a sweep's tables and plots -------------------------------------------------------------------
def _pandas():
    """pandas, imported when a report is made: a core install (no `analysis` extra) still trains."""
    try:
        import pandas
    except ImportError as err:
        raise ImportError(
            f'a sweep report needs pandas and matplotlib: pip install -e ".[analysis]" ({err})'
        ) from err
    return pandas


def find_runs(sweep_dir: Path) -> list[Path]:
    return sorted(
        p.parent for p in sweep_dir.rglob("summary.json") if (p.parent / ".hydra" / "config.yaml").is_file()
    )


def _variant(run: Path) -> str:
    path = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(path.read_text()) if path.is_file() else []
    kept = [o for o in overrides or [] if o.lstrip("+~").split("=", 1)[0] not in NOT_VARIANT]
    return ",".join(sorted(kept))


def _numbers(entry: dict, prefix: str = "") -> dict:
    """Numeric values of a summary entry, nested dicts flattened to `a/b` names."""
    out = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run × finished round: run, loss_fn, lam, seed, variant, round, then the metrics.

    The run's λ is the config's `lam`; the λ in effect in a round (it differs under
    `round_overrides`) is the metric `round_lam`.
    """
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(
            f"no run directories (a summary.json next to .hydra/config.yaml) under {sweep_dir}"
        )
    rows = []
    for run in runs:
        cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        try:
            ident = {
                "run": str(run.relative_to(sweep_dir)),
                "loss_fn": cfg["loss"]["_target_"].rsplit(".", 1)[-1],
                "lam": float(cfg["lam"]),
                "seed": int(cfg["seed"]),
                "variant": _variant(run),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{run / '.hydra' / 'config.yaml'}: no usable loss._target_, lam or seed ({e})"
            ) from e
        for entry in json.loads((run / "summary.json").read_text()):
            values = _numbers(entry)
            values["round_lam"] = values.pop("lam", math.nan)
            rows.append({**ident, "round": int(values.pop("round")), **values})
    if not rows:
        raise ValueError(f"the {len(runs)} run directories under {sweep_dir} have no finished round yet")
    return _pandas().DataFrame(rows)


def metric_names(df: pd.DataFrame) -> list[str]:
    fixed = {"run", "seed", "round", *CELL}
    return [c for c in df.columns if c not in fixed and df[c].notna().any()]


def default_metrics(df: pd.DataFrame) -> list[str]:
    names = metric_names(df)
    return [m for m in DEFAULT_METRICS if m in names] + sorted(
        m
        for m in names
        # timing is not a result; a stderr is lm-eval's, within one run
        if m.startswith(EVAL_PREFIXES) and not m.endswith(("seconds", "_stderr"))
    )


def summarise(df: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per cell × round: seeds (how many), then `<metric> mean` and `<metric> std`.

    std is the sample standard deviation over seeds (ddof=1), NaN for a single seed.
    """
    metrics = list(metrics) if metrics is not None else default_metrics(df)
    unknown = [m for m in metrics if m not in metric_names(df)]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; the runs have {metric_names(df)}")
    grouped = df.groupby([*CELL, "round"], sort=True)
    table = grouped["seed"].nunique().rename("seeds").to_frame()
    for m in metrics:
        table[f"{m} mean"] = grouped[m].mean()
        table[f"{m} std"] = grouped[m].std()
    return table.reset_index()


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.4g}" if math.isnan(std) else f"{mean:.4g} ± {std:.4g}"


def markdown(table: pd.DataFrame, metrics: Sequence[str]) -> str:
    with_variant = table["variant"].nunique() > 1
    head = ["loss fn", "λ", *(["variant"] if with_variant else []), "round", "seeds", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.itertuples(index=False):
        r = dict(zip(table.columns, row, strict=True))
        cells = [r["loss_fn"], f"{r['lam']:g}", *([f"`{r['variant']}`"] if with_variant else [])]
        cells += ["start" if r["round"] < 0 else str(r["round"]), str(r["seeds"])]
        cells += [_cell(r[f"{m} mean"], r[f"{m} std"]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metric(table: pd.DataFrame, metric: str, ax) -> None:
    """Per-round mean of one metric, a line per (loss, λ[, variant]) with a ±std band."""
    with_variant = table["variant"].nunique() > 1
    for (loss_fn, lam, variant), cell in table.groupby(CELL, sort=True):
        label = f"{loss_fn} λ={lam:g}" + (f" {variant}" if with_variant else "")
        mean, std = cell[f"{metric} mean"], cell[f"{metric} std"]
        (line,) = ax.plot(cell["round"], mean, marker="o", label=label)
        ax.fill_between(cell["round"], mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_title(f"{metric}: mean ± std over seeds")
    ax.set_xlabel("round (-1: the start model)" if (table["round"] < 0).any() else "round")
    ax.set_ylabel(metric)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_file(metric: str) -> str:
    return "plot_" + re.sub(r"[^\w.-]+", "_", metric) + ".png"


def write_report(
    sweep_dir: str | Path, out: str | Path | None = None, metrics: Sequence[str] | None = None
) -> Path:
    """report.md (table + plots), report.csv (the table at full precision) and one PNG per metric."""
    _pandas()
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            f'a sweep report needs pandas and matplotlib: pip install -e ".[analysis]" ({err})'
        ) from err
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out is not None else sweep_dir
    failed = failures(sweep_dir)
    try:
        df = collect(sweep_dir)
    except (FileNotFoundError, ValueError):
        if not failed:
            raise
        df = None  # every job failed before finishing a round: the report lists them
    out.mkdir(parents=True, exist_ok=True)
    text = [f"# SPIN sweep: {sweep_dir}", ""]
    if df is not None:
        metrics = list(metrics) if metrics else default_metrics(df)
        table = summarise(df, metrics)
        table.to_csv(out / "report.csv", index=False)
        for m in metrics:
            # Figure without pyplot: no global backend state, so importing this module leaves a notebook's alone.
            fig = Figure(figsize=(6, 4), layout="constrained")
            plot_metric(table, m, fig.subplots())
            fig.savefig(out / plot_file(m), dpi=120)
        variants = sorted(df["variant"].unique())
        shared = f" Shared overrides: `{variants[0]}`." if len(variants) == 1 and variants[0] else ""
        text += [
            f"Runs: {df['run'].nunique()}; losses {', '.join(sorted(df['loss_fn'].unique()))}; "
            f"λ {', '.join(f'{v:g}' for v in sorted(df['lam'].unique()))}; "
            f"seeds {', '.join(str(s) for s in sorted(df['seed'].unique()))}.{shared}",
            "Each cell: mean ± sample standard deviation (ddof=1) over seeds of the round's summary.json "
            "entry; a single seed shows the mean alone.",
            "",
            markdown(table, metrics),
            "",
            *(f"![{m}]({plot_file(m)})" for m in metrics),
            "",
        ]
    if failed:
        text += [
            f"## Failed jobs ({len(failed)})",
            "",
            "A failed job's finished rounds, if any, are in the table above; its run directory keeps "
            "everything it made. Fix what the error names and run the sweep's command again: finished "
            "jobs have nothing left to do.",
            "",
            "| job | overrides | exit status | error |",
            "|---|---|---|---|",
            *(
                f"| {f['job']} | `{' '.join(f['overrides'])}` | {f['status']} | "
                f"{' '.join(f['error'].split())[:400].replace('|', '/')} |"
                for f in failed
            ),
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m spinlab.report", description=__doc__.split("\n")[0])
    parser.add_argument(
        "sweep_dir", type=Path, help="directory searched for run directories (e.g. multirun/spin)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where report.md and the plots go (default: sweep_dir)"
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help="summary.json keys to tabulate and plot (space- or comma-separated; "
        f"default: {', '.join(DEFAULT_METRICS)} and every {' and '.join(p + '...' for p in EVAL_PREFIXES)} key)",
    )
    args = parser.parse_args(argv)
    metrics = [m for item in args.metrics for m in item.split(",") if m] if args.metrics else None
    try:
        path = write_report(args.sweep_dir, args.out, metrics)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(path.read_text())
    print(f"report: {path}")


class SweepReport(Callback):
    """Hydra callback: after a multirun, the sweep-level report lands in the sweep directory. When
    jobs failed (spinlab.sweep.record_failure), it lists them and the command ends with status 1
    (a job failed unexpectedly) or that of the first refused job (2, 3)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failures(sweep_dir)
        try:
            path = write_report(sweep_dir)
        except (
            FileNotFoundError,
            ValueError,
            ImportError,
        ) as err:  # e.g. every run failed, or no analysis extra
            log.warning("no sweep report for %s: %s", sweep_dir, err)
            path = None
        else:
            log.info("sweep report: %s", path)
        if failed:
            jobs = ", ".join(f"{f['job']} ({' '.join(f['overrides'])})" for f in failed)
            where = f"; see {path}" if path else ""
            print(f"sweep: {len(failed)} job(s) failed: {jobs}{where}", file=sys.stderr)
            raise SystemExit(exit_status(failed))


if __name__ == "__main__":
    main()
