"""The sweep report: a real tiny sweep (2 losses × 2 seeds × 2 rounds), its table checked by hand."""

import json
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

import spinlab.run
from spinlab import report
from tests.conftest import compose_cfg, made_once

LOSSES = ("hinge", "logistic")
SEEDS = (0, 1)
ROUNDS = 2
COMMON = ["debug=fast", f"rounds={ROUNDS}", "data.num_prompts=8"]


def build_sweep(root: Path) -> Path:
    """The runs `python train.py -m ... loss=hinge,logistic seed=0,1` leaves, trained in-process.

    Idempotent: a finished run does nothing when run again, so modules can share one sweep.
    """
    for loss in LOSSES:
        for seed in SEEDS:
            overrides = [*COMMON, f"loss={loss}", f"seed={seed}"]
            run_dir = root / ",".join(sorted(overrides))  # Hydra's override_dirname
            cfg = compose_cfg([*overrides, "~eval"], run_dir)  # train metrics only: eval keys are added below
            spinlab.run.run(cfg)
            # spinlab.run.run outside @hydra.main writes no .hydra/; write what Hydra would.
            (run_dir / ".hydra").mkdir(exist_ok=True)
            OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
            OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return made_once(tmp_path_factory, "tiny_sweep", build_sweep)  # shared with test_notebook


def by_hand(sweep_dir: Path, metric: str) -> dict:
    """{(loss, round): (mean, sample std, seeds)} straight from the summary.json files."""
    values = {}
    for loss in LOSSES:
        for seed in SEEDS:
            run = next(sweep_dir.glob(f"*loss={loss},*seed={seed}"))
            for entry in json.loads((run / "summary.json").read_text()):
                values.setdefault((loss, entry["round"]), []).append(entry[metric])
    return {k: (statistics.mean(v), statistics.stdev(v), len(v)) for k, v in values.items()}


def markdown_rows(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]
    ]


def test_collect_has_one_row_per_run_and_round(sweep):
    df = report.collect(sweep)
    assert len(df) == len(LOSSES) * len(SEEDS) * ROUNDS
    assert sorted(df["loss_fn"].unique()) == sorted(LOSSES)
    assert set(df["seed"]) == set(SEEDS) and set(df["round"]) == set(range(ROUNDS))
    assert set(df["lam"]) == {0.1} and df["variant"].nunique() == 1
    assert report.default_metrics(df) == ["loss", "margin", "accuracy"]


def test_report_table_is_mean_and_std_over_seeds(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    report.main([str(sweep), "--out", str(out)])
    assert "report.md" in capsys.readouterr().out
    rows = markdown_rows((out / "report.md").read_text())
    csv = pd.read_csv(out / "report.csv")
    assert len(rows) == len(csv) == len(LOSSES) * ROUNDS
    for metric in ("loss", "margin", "accuracy"):
        for (loss, rnd), (mean, std, n) in by_hand(sweep, metric).items():
            row = next(r for r in rows if r["loss fn"] == loss and r["round"] == str(rnd))
            assert row["λ"] == "0.1" and row["seeds"] == str(n) == "2"
            shown_mean, shown_std = (float(x) for x in row[metric].split("±"))
            assert shown_mean == pytest.approx(mean, rel=1e-3, abs=1e-6)
            assert shown_std == pytest.approx(std, rel=1e-3, abs=1e-6)
            exact = csv[(csv["loss_fn"] == loss) & (csv["round"] == rnd)].iloc[0]
            assert exact[f"{metric} mean"] == pytest.approx(mean, rel=1e-9)
            assert exact[f"{metric} std"] == pytest.approx(std, rel=1e-9)
    for metric in ("loss", "margin", "accuracy"):
        png = out / f"plot_{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"]({png.name})" in (out / "report.md").read_text()


def test_eval_keys_join_the_table_and_other_overrides_split_cells(sweep, tmp_path, capsys):
    """Per-round evaluation keys are picked up by name; a run with another override is its own cell."""
    copy = shutil.copytree(
        sweep, tmp_path / "sweep", ignore=shutil.ignore_patterns("hf", "checkpoints", "rounds")
    )
    for i, summary in enumerate(sorted(copy.glob("*/summary.json"))):
        entries = json.loads(summary.read_text())
        for entry in entries:
            entry["eval/task_accuracy"] = 0.25 * i + 0.01 * entry["round"]
            entry["eval"] = {"nested": 1.0}
            entry["note"] = "text is skipped"
        summary.write_text(json.dumps(entries))
    odd = next(copy.glob("*loss=hinge,*seed=1"))
    (odd / ".hydra" / "overrides.yaml").write_text(
        json.dumps([*COMMON, "loss=hinge", "seed=1", "optimizer.lr=0.1"])
    )

    df = report.collect(copy)
    assert report.default_metrics(df) == ["loss", "margin", "accuracy", "eval/nested", "eval/task_accuracy"]
    table = report.summarise(df, ["eval/task_accuracy"])
    assert len(table) == 3 * ROUNDS  # hinge splits into two cells of one seed each
    single = table[table["variant"].str.contains("optimizer.lr=0.1")]
    assert list(single["seeds"]) == [1] * ROUNDS and single["eval/task_accuracy std"].isna().all()

    report.main([str(copy), "--metrics", "accuracy,eval/task_accuracy"])
    rows = markdown_rows((copy / "report.md").read_text())
    assert list(rows[0]) == ["loss fn", "λ", "variant", "round", "seeds", "accuracy", "eval/task_accuracy"]
    assert (copy / "plot_eval_task_accuracy.png").exists()
    with pytest.raises(SystemExit):
        report.main([str(copy), "--metrics", "no_such_metric"])
    assert "unknown metrics ['no_such_metric']" in capsys.readouterr().err


def test_benchmarks_are_plotted_per_round_with_the_start_model_first(sweep, tmp_path):
    """lm-eval results (bench/...) join the defaults, their stderr does not; round -1 is the start."""
    copy = shutil.copytree(
        sweep, tmp_path / "sweep", ignore=shutil.ignore_patterns("hf", "checkpoints", "rounds")
    )
    for i, summary in enumerate(sorted(copy.glob("*/summary.json"))):
        entries = json.loads(summary.read_text())
        start = {"round": -1, "bench/arc": 0.25, "bench/arc/acc": 0.25, "bench/arc/acc_stderr": 0.1}
        for entry in entries:
            entry.update({"bench/arc": 0.5 + 0.1 * i + 0.01 * entry["round"], "bench/arc/acc_stderr": 0.1})
            entry["bench/seconds"] = 3.0
        summary.write_text(json.dumps([start, *entries]))
    df = report.collect(copy)
    assert [m for m in report.default_metrics(df) if m.startswith("bench/")] == ["bench/arc", "bench/arc/acc"]
    report.main([str(copy), "--metrics", "bench/arc"])
    rows = markdown_rows((copy / "report.md").read_text())
    by_round = {(r["loss fn"], r["round"]): r["bench/arc"] for r in rows}
    assert by_round[("hinge", "start")] == "0.25 ± 0"
    assert by_round[("hinge", "0")] == f"{0.55:.4g} ± {statistics.stdev([0.5, 0.6]):.4g}"
    assert (copy / "plot_bench_arc.png").exists()


def test_empty_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "summary.json").write_text("[]")  # no .hydra/config.yaml: not a run dir
    with pytest.raises(FileNotFoundError, match="no run directories"):
        report.collect(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tmp_path)])
    assert exit_.value.code == 2
    assert f"no run directories (a summary.json next to .hydra/config.yaml) under {tmp_path}" in (
        capsys.readouterr().err
    )


# A core install: finding matplotlib or pandas fails as it does when they are not installed.
BLOCK_ANALYSIS = (
    "import sys\n"
    "class NoAnalysis:\n"
    "    def __init__(self, finder):\n"
    "        self.finder = finder\n"
    "    def __getattr__(self, name):\n"
    "        return getattr(self.finder, name)\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('matplotlib', 'pandas'):\n"
    "            return None\n"
    "        return self.finder.find_spec(name, path, target)\n"
    "    def find_distributions(self, *args, **kwargs):\n"
    "        found = getattr(self.finder, 'find_distributions', lambda *a, **k: [])(*args, **kwargs)\n"
    "        return [d for d in found if d.metadata['Name'].lower() not in ('matplotlib', 'pandas')]\n"
    "sys.meta_path[:] = [NoAnalysis(f) for f in sys.meta_path]\n"
)


def test_a_core_install_trains_and_the_report_names_the_extra(tmp_path):
    """Without the analysis extra (matplotlib, pandas blocked) a run trains; a report says what to install."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}  # this checkout's spinlab
    run = (
        BLOCK_ANALYSIS
        + "import runpy; sys.argv = ['train.py', 'debug=fast', 'data.num_prompts=8', 'rounds=1', "
        f"'hydra.run.dir={tmp_path / 'run'}']; runpy.run_path('train.py', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", run], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()

    report_code = BLOCK_ANALYSIS + f"from spinlab import report; report.write_report({str(tmp_path)!r})"
    done = subprocess.run(
        [sys.executable, "-c", report_code], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert 'pip install -e ".[analysis]"' in done.stderr
