"""Sweeps through hydra-submitit-launcher: the Slurm preset as sbatch text. Local subprocess jobs run
for real in tests/test_readme.py (the `hydra/launcher=submitit_local` command of docs/sweeps.md)."""

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.conftest import CONF

submitit = pytest.importorskip("submitit")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


class Submitted(Exception):
    """Raised instead of submitting, carrying the executor the launcher built."""


def test_slurm_preset_becomes_the_expected_sbatch_script(tmp_path, monkeypatch):
    # submitit refuses to build a Slurm executor without srun on PATH; a stub is enough to render the script.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    def capture(executor, *args, **kwargs):
        raise Submitted(executor)

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    sweep = tmp_path / "sweep"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "debug=fast", f"hydra.sweep.dir={sweep}"],
            return_hydra_config=True,
        )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg  # what Hydra's setup() would set; launch() needs nothing else before submitting
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["loss=hinge"]], initial_job_idx=0)
    executor = submitted.value.args[0]._executor  # every key of slurm.yaml was accepted by submitit
    assert executor.max_num_timeout == 3
    script = executor._make_submission_file_text("python -u job.py", "uid")
    for line in (
        "--time=720",
        "--gpus-per-node=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=8",
        "--mem=64GB",
        "--job-name=spin",
        f"--output={sweep}/.submitit/%j/",
    ):
        assert f"#SBATCH {line}" in script, line
    assert "--partition" not in script  # null: the cluster's default
