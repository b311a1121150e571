"""A multirun checks every point before its first job, and a job that fails later is recorded in the
report while the others run."""

import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from spinlab.sweep import SweepCheck, failures
from tests import forked
from tests.conftest import CONF, ROOT
from tests.test_reliability import subprocess_env


def sweep_config(sweep_dir, task_overrides):
    """The multirun's config as Hydra hands it to on_multirun_start, for these command-line overrides."""
    cfg = compose(
        config_name="train",
        overrides=["debug=fast", f"hydra.sweep.dir={sweep_dir}"],
        return_hydra_config=True,
    )
    with open_dict(cfg):
        cfg.hydra.overrides.task = task_overrides
    return cfg


def test_every_point_of_a_sweep_is_checked_before_any_job_runs(tmp_path, capsys):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        SweepCheck().on_multirun_start(sweep_config(tmp_path, ["debug=fast", "lam=0.1,0.5", "seed=0,1"]))
        assert capsys.readouterr().err == ""
        cfg = sweep_config(tmp_path, ["debug=fast", "~eval", "rounds=1", "lam=-1,0.1", "seed=0,-1"])
        with pytest.raises(SystemExit) as refused:
            SweepCheck().on_multirun_start(cfg)
    assert refused.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "refused: 3 of the sweep's 4 points cannot start, so no job was run:"
    assert lines[1].startswith("  job 0 (lam=-1 seed=0): lam must be a finite number")
    assert lines[2].startswith("  job 1 (lam=-1 seed=-1): lam must be")
    assert lines[3].startswith("  job 3 (lam=0.1 seed=-1): seed must be an int")
    assert len(lines) == 4 and not list(tmp_path.iterdir())  # no job ran, nothing was written


@pytest.mark.slow
def test_a_job_that_fails_is_reported_and_the_others_run(tmp_path):
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "failures").mkdir(parents=True)
    (sweep_dir / "failures" / "job_7.json").write_text("{}")  # an earlier sweep's record
    (sweep_dir / "failures" / "notes.txt").write_text("mine")
    models = "tests.helpers.broken_model,tests.helpers.missing_model,spinlab.models.tiny_model"
    out = forked.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "debug=fast", "~eval", "rounds=1",
         "data.num_prompts=8", f"model._target_={models}", f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]  # a job failed unexpectedly
    assert "RuntimeError: a bug inside model loading" in out.stderr and "Traceback" in out.stderr
    assert "refused: cannot load model 'no/such-model'" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("sweep: 2 job(s) failed: 0 (debug=fast")
    (finished,) = [p.parent for p in sweep_dir.rglob("summary.json")]  # job 2 ran after both
    assert "spinlab.models.tiny_model" in finished.name
    recorded = failures(sweep_dir)
    assert [(f["job"], f["status"]) for f in recorded] == [(0, 1), (1, 2)]
    assert (sweep_dir / "failures" / "notes.txt").read_text() == "mine"
    report = (sweep_dir / "report.md").read_text()
    assert "## Failed jobs (2)" in report and "Runs: 1;" in report
    assert (
        "| 0 | `debug=fast ~eval=null rounds=1 data.num_prompts=8 model._target_=tests.helpers.broken_model` | 1 | "
        "InstantiationException: Error in call to target 'tests.helpers.broken_model': RuntimeError('a bug inside "
        "model loading')" in report
    )
    assert (
        "| 1 | `debug=fast ~eval=null rounds=1 data.num_prompts=8 model._target_=tests.helpers.missing_model` | 2 | "
        "refused: cannot load model 'no/such-model'" in report
    )
