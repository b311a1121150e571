"""A Hydra multirun of train.py: every point checked before the first job runs, and a job that fails
later recorded while the others go on.

`SweepCheck` (a Hydra callback, conf/train.yaml) composes the config of every point of a basic
sweep at its start and runs the start's config check on it (spinlab.config.check_config): a bad
point refuses the whole sweep at once, naming it, before any job runs. A job that fails later (bad
data, a busy run directory, a non-finite loss, a crash) is written to
`<sweep dir>/failures/job_<N>.json` (`record_failure`, called by spinlab.cli) and the sweep goes on;
spinlab.report.SweepReport lists the failures in the report and ends the command with a failure
status.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
FAILURES = "failures"
_FAILURE = re.compile(r"job_\d+\.json")


def failures(sweep_dir: str | Path) -> list[dict]:
    """The jobs of the last sweep in `sweep_dir` that failed, by job number."""
    folder = Path(sweep_dir) / FAILURES
    found = (
        [json.loads(p.read_text()) for p in folder.iterdir() if _FAILURE.fullmatch(p.name)]
        if folder.is_dir()
        else []
    )
    return sorted(found, key=lambda f: f["job"])


def record_failure(status: int, error: str) -> None:
    """In a multirun job: record that this job failed (exit `status`, `error` its message)."""
    from hydra.core.hydra_config import HydraConfig

    from spinlab.rundir import write_json

    hydra = HydraConfig.get()
    write_json(
        Path(hydra.sweep.dir) / FAILURES / f"job_{hydra.job.num}.json",
        {
            "job": hydra.job.num,
            "overrides": list(hydra.overrides.task),
            "run_dir": hydra.runtime.output_dir,
            "status": status,
            "error": error,
        },
    )


def sweep_points(config: DictConfig) -> list[list[str]] | None:
    """The overrides of every job a basic sweep will run, in its order; None for another sweeper
    (its points are not known in advance)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    arguments = params + list(config.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [point for batch in batches for point in batch]


def point_problem(config: DictConfig, overrides: list[str]) -> str | None:
    """What the start would refuse in the job with `overrides`: None when its config passes. What
    the config needs of a machine (a GPU, a generation engine: NotFoundError) is checked only
    where the jobs run here, with Hydra's basic launcher; a cluster's jobs run elsewhere."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from spinlab.config import check_config
    from spinlab.errors import NotFoundError, UserError

    try:
        cfg = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]  # as the job gets it
        check_config(cfg)
    except NotFoundError as err:
        return str(err) if config.hydra.launcher.get("_target_") == BASIC_LAUNCHER else None
    except (UserError, HydraException) as err:
        return str(err)
    return None


class SweepCheck(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        folder = Path(config.hydra.sweep.dir) / FAILURES
        if folder.is_dir():  # the records of an earlier sweep in the same directory
            for path in folder.iterdir():
                if _FAILURE.fullmatch(path.name):
                    path.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
        points = sweep_points(config)
        if points is None:
            return
        # A point is named by the overrides that differ between points (all, for a single one).
        varying = [i for i in range(len(points[0])) if len({p[i] for p in points}) > 1] or range(
            len(points[0])
        )
        bad = []
        for number, overrides in enumerate(points):
            problem = point_problem(config, overrides)
            if problem is not None:
                bad.append(f"  job {number} ({' '.join(overrides[i] for i in varying)}): {problem}")
        if bad:
            print(
                f"refused: {len(bad)} of the sweep's {len(points)} points cannot start, so no job was run:\n"
                + "\n".join(bad),
                file=sys.stderr,
            )
            raise SystemExit(2)


def exit_status(found: list[dict]) -> int:
    """A sweep's status from its failed jobs: 1 if any failed unexpectedly, else the first one's."""
    statuses = [f["status"] for f in found]
    return 1 if 1 in statuses else statuses[0]
