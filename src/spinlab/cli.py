"""What `python train.py ...` does around the run (spinlab.run): its logs, its record of the
config in <run_dir>/.hydra/, and its exit status (spinlab.errors: 0 done, 1 an unexpected error
with its traceback, 2 a user error, at start or later, 3 run directory in use, 75 stopped by a signal).

A refused start leaves the run directory as it was: Hydra's log file is held back and .hydra/ is
written only once the start is accepted. In a Hydra multirun a failed job is recorded
(spinlab.sweep) and the next one runs.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import sys
import traceback

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spinlab.config import check_renamed, picked_choices
from spinlab.errors import ConfigError, Stopped, UserError
from spinlab.run import run
from spinlab.rundir import RunDir, global_rank, is_launching_rank, release, write_bytes
from spinlab.sweep import record_failure

log = logging.getLogger("spinlab")


def check_command_line(args: list[str]) -> None:
    """Before Hydra composes the config: an override of a renamed key is refused (status 2),
    naming its new name."""
    try:
        check_renamed(args)
    except ConfigError as err:
        print(f"refused: {err}", file=sys.stderr)
        raise SystemExit(err.exit_status) from None


def main(cfg: DictConfig) -> None:
    """Run `cfg` (composed by Hydra) and end with the run's exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_dir = RunDir(cfg.run_dir)
    if not is_launching_rank():
        own_log_file(cfg, run_dir)
        quiet_console()
    held = HeldLog()
    record_picks(cfg)
    # Hydra makes the run directory before this runs: empty now means this start made it.
    made_here = not any(run_dir.root.iterdir()) if run_dir.root.is_dir() else False

    started = False

    def accepted() -> None:
        nonlocal started
        started = True
        held.accept()
        if is_launching_rank():
            save_hydra_config(cfg, run_dir)

    try:
        run(cfg, accepted)
    except Stopped as stop:
        if is_launching_rank():
            print(stop.message, file=sys.stderr)
        raise
    except UserError as err:
        if not started:  # refused: the run directory stays as it was
            held.drop()
            release(run_dir, restore=True)
            if made_here and {p.name for p in run_dir.root.iterdir()} <= {run_dir.lock.name}:
                shutil.rmtree(run_dir.root)  # a refused first start leaves no directory behind
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        message = f"{'error' if started else 'refused'}: {err}"
        print(message, file=sys.stderr)
        if not in_sweep():
            raise SystemExit(err.exit_status) from None
        record_failure(err.exit_status, message)  # and the sweep's next job runs
    except Exception as err:
        if not in_sweep():
            raise  # Hydra prints it with its traceback: status 1
        traceback.print_exc()
        record_failure(1, f"{type(err).__name__}: {err}")
    finally:
        release(run_dir)  # in a multirun, the next jobs run in this process


def record_picks(cfg: DictConfig) -> None:
    """A group's choice made by another group's config (conf/trainer/gpu.yaml picks
    generation=static) is said in one line at start and recorded in the run's config under
    `picked`: {group: {choice, by}}, written to run_config.yaml and .hydra/config.yaml."""
    if not HydraConfig.initialized():
        return
    from hydra.core.global_hydra import GlobalHydra

    hydra_cfg = HydraConfig.get()
    picks = picked_choices(hydra_cfg.job.config_name, list(hydra_cfg.overrides.task))
    loader = GlobalHydra.instance().config_loader()
    for group, pick in picks.items():
        where = os.path.relpath(pick["file"])
        options = ", ".join(loader.get_group_options(group))
        log.info(
            "%s=%s, picked by %s (%s); set %s=... on the command line to choose another (%s)",
            group,
            pick["choice"],
            pick["by"],
            pick["file"] if where.startswith("..") else where,
            group,
            options,
        )
    cfg.picked = {group: {"choice": p["choice"], "by": p["by"]} for group, p in picks.items()}


def in_sweep() -> bool:
    """Whether this is a job of a Hydra multirun, whose failure must not end the other jobs."""
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def save_hydra_config(cfg: DictConfig, run_dir: RunDir) -> None:
    """What Hydra writes to <run_dir>/.hydra/ before the task runs (conf/train.yaml turns that
    off), written here once the start is accepted."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    out = run_dir.root / ".hydra"
    write_bytes(out / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    write_bytes(out / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}).encode())
    write_bytes(out / "overrides.yaml", OmegaConf.to_yaml(list(hydra_cfg.overrides.task)).encode())


# -- logs -----------------------------------------------------------------------------------------
class HeldLog:
    """Hydra's log file (train.log in the run directory) held back until the start is accepted:
    a refused start writes no line into the log of the run that owns the directory."""

    def __init__(self):
        root = logging.getLogger()
        self.swaps = []
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            memory = logging.handlers.MemoryHandler(10**6, flushLevel=logging.CRITICAL + 1, target=handler)
            root.removeHandler(handler)
            root.addHandler(memory)
            self.swaps.append((memory, handler))

    def accept(self) -> None:
        root = logging.getLogger()
        for memory, handler in self.swaps:
            root.removeHandler(memory)
            memory.flush()
            root.addHandler(handler)
        self.swaps = []

    def drop(self) -> None:
        root = logging.getLogger()
        for memory, handler in self.swaps:
            root.removeHandler(memory)
            memory.buffer.clear()
            root.addHandler(handler)
        self.swaps = []


def own_log_file(cfg: DictConfig, run_dir: RunDir) -> None:
    """A process other than global rank 0 logs to train_ddp_process_<global rank>.log. Hydra names
    the file after the job: train.log for the first process of another node, which would write
    into rank 0's log on a shared file system, and train_ddp_process_<local rank>.log for the
    processes Lightning's launcher starts, a name every node would share."""
    devices = cfg.trainer.get("devices")
    per_node = devices if isinstance(devices, int) and devices > 0 else None
    if per_node is None and os.environ.get("WORLD_SIZE"):
        per_node = int(os.environ["WORLD_SIZE"]) // max(1, int(cfg.trainer.get("num_nodes") or 1))
    rank = global_rank(per_node)
    name = (
        f"train_ddp_process_{rank}.log"
        if rank is not None
        else f"train_node{os.environ.get('NODE_RANK', 0)}_process_{os.environ.get('LOCAL_RANK', 0)}.log"
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()  # opened on the first record (delay: true), now under the new name
            handler.baseFilename = str((run_dir.root / name).absolute())


def quiet_console() -> None:
    """Ranks 1.. of a sharded run print only warnings and errors: their info lines repeat rank 0's
    and go to their own train_ddp_process_<rank>.log in the run directory."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # not its FileHandler subclass: the log file keeps all
            handler.setLevel(logging.WARNING)
