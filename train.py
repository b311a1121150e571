"""Run every SPIN round in one command: `python train.py model=tiny loss=hinge lam=0.5 rounds=3`.

Read top to bottom: check the config, build the parts by `_target_`, fit (which resumes from
the run directory's last checkpoint when there is one), print the per-round summary.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import shutil
import sys
import traceback
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from spinlab import lightning_compat
from spinlab.callbacks import AtomicCheckpointIO, RoundCheckpoint
from spinlab.config import (  # registers the schema
    build,
    check_config,
    check_settings,
    own_keys,
    record_settings,
    redact,
)
from spinlab.errors import RunDirError, UserError
from spinlab.harness import main_columns
from spinlab.rundir import (
    RunDir,
    check_last_checkpoint,
    check_not_foreign,
    check_writable,
    claim,
    global_rank,
    holds_run,
    is_launching_rank,
    release,
    remove_leftovers,
    write_bytes,
)
from spinlab.sweep import record_failure

log = logging.getLogger("spinlab")

# Exit statuses (README "Exit statuses"). 1 is an unexpected error, with its traceback; a
# spinlab.errors.UserError carries its own status (2, or 3 for a run directory in use).
EXIT_REFUSED = 2  # a user error: a value, a changed setting, the data, the checkpoint, the directory
EXIT_BUSY = 3  # another process holds the run directory
EXIT_STOPPED = 75  # stopped by a signal after saving a checkpoint: run the same command to resume


class Stopped(SystemExit):
    """The run stopped on a signal after saving the checkpoint of its last step."""

    def __init__(self, message: str):
        super().__init__(EXIT_STOPPED)
        self.message = message


def preflight(cfg: DictConfig):
    """The tokenizer, then every data split read, validated and measured, before any weights load."""
    loaded = build(cfg.model)  # a model that cannot be found fails here; its weights load on first use
    datamodule = build(own_keys(cfg, "data"), tokenizer=loaded.tokenizer, max_positions=loaded.max_positions)
    datamodule.load_rows()
    if (cfg.get("eval") or {}).get("tasks"):  # the benchmarks' tasks and data, before the weights
        build(cfg.eval).check()
    return loaded, datamodule


def run(cfg: DictConfig, accepted=None) -> dict:
    """Check, then train every round not yet done. `accepted()` is called once the start is
    accepted, before anything is written to the run directory (main: its .hydra/ and log)."""
    check_config(cfg)
    run_dir = RunDir(cfg.run_dir)
    launching = is_launching_rank()  # ranks 1.. of a multi-process run belong to rank 0's job
    had_run = holds_run(run_dir)  # before claim's run.lock: only a run's own start can leave leftovers
    if launching:
        check_not_foreign(run_dir, cfg.allow_foreign_run_dir)
        claim(run_dir)
    last = run_dir.last_checkpoint
    ckpt = last if last.exists() or last.is_symlink() else None  # a dangling link is reported below
    settings = redact(OmegaConf.to_container(cfg, resolve=True))
    done = finished_rounds(run_dir)
    rounds_done = sum(index >= 0 for index in done)  # round -1: the start model's benchmarks
    if ckpt is not None and cfg.resume == "never":
        raise RunDirError(
            f"{run_dir.root} already holds a run ({ckpt}); choose another run_dir or name, "
            "or set resume=auto to continue it"
        )
    check_settings(run_dir, settings, rounds_done, record=False)
    if ckpt is not None and rounds_done < cfg.rounds:
        # Only the launching rank reads the whole checkpoint to compare checksums, before any
        # process group exists: Lightning's launcher starts the others after its verdict, and
        # torchrun or srun stop them when it refuses. Each of the others checks the structure.
        check_last_checkpoint(run_dir, rounds_done, checksums=launching)
    if rounds_done < cfg.rounds:
        loaded, datamodule = preflight(cfg)
        check_writable(run_dir.root, need_bytes=0)
    if accepted is not None:
        accepted()
    if launching:
        if had_run:
            remove_leftovers(run_dir)
        record_settings(run_dir, settings)
    if rounds_done >= cfg.rounds:
        log.info("all %d rounds of %s are done; nothing to resume", cfg.rounds, run_dir.root)
        print_summary(done, run_dir, cfg.objective._target_)
        return done
    L.seed_everything(cfg.seed, workers=True)

    # fp32 weights in the round's HF directory, plus a checkpoint with weights and optimizer state.
    check_writable(run_dir.root, need_bytes=4 * 4 * sum(p.numel() for p in loaded.model.parameters()))
    module = build(cfg.module, policy=loaded.model)
    callbacks = [build(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [build(c) for c in cfg.logger.values() if c is not None]
    callbacks += [c for c in loggers if isinstance(c, L.Callback)]  # their state goes into checkpoints
    trainer = build(
        cfg.trainer,
        max_epochs=cfg.rounds * cfg.epochs_per_round,
        reload_dataloaders_every_n_epochs=1,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(run_dir.root),
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,  # RoundCheckpoint writes checkpoints/last.ckpt
    )
    for logger in loggers:
        logger.log_hyperparams(settings)
    if ckpt is not None:
        log.info("resuming from %s", ckpt)
    explaining = explain_child_deaths(trainer, last)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    except SIGTERMException:
        saver = next((c for c in callbacks if isinstance(c, RoundCheckpoint)), None)
        stopped = saver.stopped if saver is not None else None
        if stopped is None:
            raise Stopped(
                "stopped by a signal before a checkpoint was saved; run the same command again"
            ) from None
        raise Stopped(stop_message(stopped, cfg, run_dir)) from None
    except RuntimeError as err:
        if trainer.world_size > 1 and any(
            s in str(err) for s in ("Connection closed", "Connection reset", "timed out", "Timeout")
        ):
            raise RuntimeError(peer_stopped(trainer, last, str(err))) from err
        raise
    finally:
        logging.getLogger(LAUNCHER_LOG).removeFilter(explaining)

    summary = next(c for c in callbacks if hasattr(c, "summaries")).summaries
    if trainer.is_global_zero:
        print_summary(summary, run_dir, cfg.objective._target_)
    saver = next((c for c in callbacks if isinstance(c, RoundCheckpoint)), None)
    if saver is not None and saver.stopped is not None:  # a signal as the last round ended
        raise Stopped(stop_message(saver.stopped, cfg, run_dir))
    return summary


def stop_message(stopped: dict, cfg: DictConfig, run_dir: RunDir) -> str:
    """The one line a stopped run ends with: the signal, the step saved and where it falls."""
    index = stopped["epoch"] // cfg.epochs_per_round
    ends_round = stopped.get("epoch_end") and (stopped["epoch"] + 1) % cfg.epochs_per_round == 0
    where = f"the end of round {index}" if ends_round else f"round {index}"
    head = f"stopped by {stopped['signal']} after step {stopped['step']} ({where})"
    if ends_round and index == cfg.rounds - 1:
        return f"{head}: every round is finished and saved in {run_dir.root}; nothing is left to resume."
    return (
        f"{head}; its checkpoint is {run_dir.last_checkpoint}. Run the same command again to resume from it."
    )


def peer_stopped(trainer: L.Trainer, last: Path, detail: str) -> str:
    resume = (
        "The last checkpoint is intact: run the same command again to resume."
        if last.exists()
        else "No checkpoint was written yet: run the same command again to start over "
        "(the synthetic data already generated is reused)."
    )
    return (
        f"process rank {trainer.global_rank} of {trainer.world_size}: another process of this run "
        "stopped or stopped answering (see its train_ddp_process_<rank>.log in the run directory). "
        f"{resume} ({detail})"
    )


LAUNCHER_LOG = lightning_compat.LAUNCHER_LOG


def explain_child_deaths(trainer: L.Trainer, last: Path):
    """Lightning's launcher watches the processes it started and, when one dies, SIGKILLs every
    process of the run, often before a collective in flight on rank 0 can fail and be explained.
    Its log record is the last moment rank 0 runs, so the explanation is printed from there."""

    def explain(record: logging.LogRecord) -> bool:
        if lightning_compat.CHILD_DIED in record.getMessage():
            print(peer_stopped(trainer, last, record.getMessage()), file=sys.stderr, flush=True)
        return True

    observer = logging.getLogger(LAUNCHER_LOG)
    observer.setLevel(logging.INFO)
    observer.addFilter(explain)
    return explain  # removed again once the fit ends


def finished_rounds(run_dir: RunDir) -> dict:
    if not run_dir.summary.exists():
        return {}
    return {s["round"]: s for s in json.loads(run_dir.summary.read_text())}


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


def in_sweep() -> bool:
    """Whether this is a job of a Hydra multirun, whose failure must not end the other jobs."""
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def quiet_console() -> None:
    """Ranks 1.. of a sharded run print only warnings and errors: their info lines repeat rank 0's
    and go to their own train_ddp_process_<rank>.log in the run directory."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # not its FileHandler subclass: the log file keeps all
            handler.setLevel(logging.WARNING)


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


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_dir = RunDir(cfg.run_dir)
    if not is_launching_rank():
        own_log_file(cfg, run_dir)
        quiet_console()
    held = HeldLog()
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


if __name__ == "__main__":
    main()
