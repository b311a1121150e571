"""One run: check the config, build the parts by `_target_`, fit every round not yet done (from
the run directory's last checkpoint when there is one), print the per-round summary.

`run(cfg)` is what `python train.py ...` does once Hydra has composed the config (spinlab.cli
wraps it with the logs and the exit statuses); tests and benchmarks call it on a composed config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import lightning as L
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
from spinlab.errors import RunDirError, Stopped
from spinlab.report import print_summary
from spinlab.rundir import (
    RunDir,
    check_last_checkpoint,
    check_not_foreign,
    check_writable,
    claim,
    holds_run,
    is_launching_rank,
    remove_leftovers,
)

log = logging.getLogger("spinlab")


def preflight(cfg: DictConfig):
    """The tokenizer, then every data split read, validated and measured, before any weights load."""
    loaded = build(cfg.model)  # a model that cannot be found fails here; its weights load on first use
    datamodule = build(own_keys(cfg, "data"), tokenizer=loaded.tokenizer, max_positions=loaded.max_positions)
    datamodule.load_rows()
    benchmarks = (cfg.get("eval") or {}).get("benchmarks")
    if benchmarks is not None:  # the benchmarks' tasks and data, before the weights
        build(benchmarks).check()
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
    with explained_child_deaths(trainer, last) as explaining:
        try:
            trainer.fit(
                module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True
            )
        except SIGTERMException:
            saver = next((c for c in callbacks if isinstance(c, RoundCheckpoint)), None)
            stopped = saver.stopped if saver is not None else None
            if stopped is None:
                raise Stopped(
                    "stopped by a signal before a checkpoint was saved; run the same command again"
                ) from None
            raise Stopped(stop_message(stopped, cfg, run_dir)) from None
        except RuntimeError as err:
            if trainer.world_size > 1 and any(s in str(err) for s in PEER_GONE):
                message = peer_stopped(trainer, last, str(err))
                # Said now: the launcher's observer may SIGKILL this process before Hydra prints
                # the error, and its own record must not say it again.
                if not explaining.said:
                    print(message, file=sys.stderr, flush=True)
                explaining.said = True
                raise RuntimeError(message) from err
            raise

    summary = next(c for c in callbacks if hasattr(c, "summaries")).summaries
    if trainer.is_global_zero:
        print_summary(summary, run_dir, cfg.objective._target_)
    saver = next((c for c in callbacks if isinstance(c, RoundCheckpoint)), None)
    if saver is not None and saver.stopped is not None:  # a signal as the last round ended
        raise Stopped(stop_message(saver.stopped, cfg, run_dir))
    return summary


def finished_rounds(run_dir: RunDir) -> dict:
    if not run_dir.summary.exists():
        return {}
    return {s["round"]: s for s in json.loads(run_dir.summary.read_text())}


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


# -- a process of a multi-process run that stopped ------------------------------------------------
# What a collective raises on the process whose peer died (gloo, NCCL): the socket closed or reset
# while reading, broken while writing, or no answer in time.
PEER_GONE = ("Connection closed", "Connection reset", "Broken pipe", "timed out", "Timeout")


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


@contextlib.contextmanager
def explained_child_deaths(trainer: L.Trainer, last: Path):
    """Lightning's launcher watches the processes it started and, when one dies, SIGKILLs every
    process of the run, often before a collective in flight on rank 0 can fail and be explained.
    Its log record is the last moment rank 0 runs, so the explanation is printed from there. A
    multi-process fit that failed keeps it: the record may come after the error has left the fit."""

    def explain(record: logging.LogRecord) -> bool:
        if lightning_compat.CHILD_DIED in record.getMessage() and not explain.said:
            explain.said = True
            print(peer_stopped(trainer, last, record.getMessage()), file=sys.stderr, flush=True)
        return True

    explain.said = False
    observer = logging.getLogger(lightning_compat.LAUNCHER_LOG)
    observer.setLevel(logging.INFO)
    observer.addFilter(explain)
    try:
        yield explain
    except BaseException:
        if trainer.world_size == 1:
            observer.removeFilter(explain)
        raise
    observer.removeFilter(explain)
