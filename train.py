"""Run every SPIN round in one command: `python train.py model=tiny loss=hinge lam=0.5 rounds=3`.

Read top to bottom: check the config, build the parts by `_target_`, fit (which resumes from
the run directory's last checkpoint when there is one), print the per-round summary.
"""

from __future__ import annotations

import json
import logging
import os

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from spinlab.callbacks import AtomicCheckpointIO
from spinlab.config import check_settings, check_targets, redact, round_overrides  # registers the schema
from spinlab.harness import main_columns
from spinlab.rundir import (
    RunDir,
    check_last_checkpoint,
    check_writable,
    claim,
    is_launching_rank,
    release,
    remove_leftovers,
)

log = logging.getLogger("spinlab")


def check_config(cfg: DictConfig) -> None:
    """Reject impossible values before anything slow starts."""
    if cfg.lam <= 0:
        raise ValueError(f"lam must be > 0 (the KL strength λ), got {cfg.lam}")
    if cfg.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {cfg.rounds}")
    if cfg.epochs_per_round < 1:
        raise ValueError(f"epochs_per_round must be >= 1, got {cfg.epochs_per_round}")
    if cfg.resume not in ("auto", "never"):
        raise ValueError(f"resume must be 'auto' or 'never', got {cfg.resume!r}")
    lengths = cfg.data.get("max_prompt_length"), cfg.data.get("max_length")
    if None not in lengths and lengths[0] >= lengths[1]:
        raise ValueError(
            f"data.max_prompt_length ({lengths[0]}) must be below data.max_length ({lengths[1]}), "
            "or leave both null to measure them from the data"
        )
    cfg.round_overrides = round_overrides(OmegaConf.to_container(cfg.round_overrides), cfg.rounds)
    check_targets(cfg)
    # A bad generation setting, or an engine its interpreter lacks (generation=vllm), fails here.
    try:
        instantiate(cfg.generation)
    except InstantiationException as err:
        raise err.__cause__ or err from None
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        raise RuntimeError(
            "this config trains on GPUs (trainer.accelerator=gpu) but torch sees no CUDA device: "
            "run it on a GPU machine, or use trainer=cpu"
        )


def preflight(cfg: DictConfig):
    """The tokenizer, then every data split read, validated and measured, before any weights load."""
    loaded = instantiate(cfg.model)  # the weights load on first use of loaded.model
    datamodule = instantiate(cfg.data, tokenizer=loaded.tokenizer, max_positions=loaded.max_positions)
    datamodule.load_rows()
    if (cfg.get("eval") or {}).get("tasks"):  # the benchmarks' tasks and data, before the weights
        instantiate(cfg.eval).check()
    return loaded, datamodule


def run(cfg: DictConfig) -> dict:
    check_config(cfg)
    run_dir = RunDir(cfg.run_dir)
    if is_launching_rank():  # ranks 1.. of a multi-process run belong to rank 0's job
        claim(run_dir)
        remove_leftovers(run_dir)
    ckpt = run_dir.last_checkpoint if run_dir.last_checkpoint.exists() else None
    if ckpt is not None and cfg.resume == "never":
        raise FileExistsError(
            f"{run_dir.root} already holds a run ({ckpt}); choose another run_dir or name, "
            "or set resume=auto to continue it"
        )
    done = finished_rounds(run_dir)
    rounds_done = sum(index >= 0 for index in done)  # round -1: the start model's benchmarks
    check_settings(
        run_dir, redact(OmegaConf.to_container(cfg, resolve=True)), rounds_done, record=is_launching_rank()
    )
    if rounds_done >= cfg.rounds:
        log.info("all %d rounds of %s are done; nothing to resume", cfg.rounds, run_dir.root)
        print_summary(done, run_dir, cfg.objective._target_)
        return done
    if ckpt is not None:
        check_last_checkpoint(run_dir, rounds_done)
    loaded, datamodule = preflight(cfg)
    check_writable(run_dir.root, need_bytes=0)
    L.seed_everything(cfg.seed, workers=True)

    # fp32 weights in the round's HF directory, plus a checkpoint with weights and optimizer state.
    check_writable(run_dir.root, need_bytes=4 * 4 * sum(p.numel() for p in loaded.model.parameters()))
    module = instantiate(cfg.module, policy=loaded.model)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    callbacks += [c for c in loggers if isinstance(c, L.Callback)]  # their state goes into checkpoints
    trainer = instantiate(
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
        logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))
    if ckpt is not None:
        log.info("resuming from %s", ckpt)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    except RuntimeError as err:
        if trainer.world_size > 1 and any(
            s in str(err) for s in ("Connection closed", "Connection reset", "timed out", "Timeout")
        ):
            raise RuntimeError(
                f"process rank {trainer.global_rank} of {trainer.world_size}: another process of this run "
                "stopped or stopped answering (see its train_ddp_process_<rank>.log in the run directory). "
                f"The last checkpoint is intact: run the same command again to resume. ({err})"
            ) from err
        raise

    summary = next(c for c in callbacks if hasattr(c, "summaries")).summaries
    if trainer.is_global_zero:
        print_summary(summary, run_dir, cfg.objective._target_)
    return summary


def finished_rounds(run_dir: RunDir) -> dict:
    if not run_dir.summary.exists():
        return {}
    return {s["round"]: s for s in json.loads(run_dir.summary.read_text())}


def print_summary(summaries: dict, run_dir: RunDir, objective: str) -> None:
    nan = float("nan")
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
        cells = (  # a missing count ("pairs" of the start row) prints as nan too
            f"{s.get(k, nan):>{w}{f if k in s or f != 'd' else ''}}"
            for (_, k, f), w in zip(columns, widths, strict=True)
        )
        lines.append(f"{'start' if index < 0 else index:>5} " + " ".join(cells))
    method = get_class(objective).name
    if any("margin" in s for s in summaries.values()):
        print(f"\n{method} rounds (accuracy = share of pairs with real over synthetic, margin > 0)")
    else:
        print(f"\n{method} rounds (loss = mean negative log-likelihood per response token)")
    print("\n".join(lines))
    print(f"run directory: {run_dir.root}")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run(cfg)
    finally:
        release(RunDir(cfg.run_dir))  # in a multirun, the next jobs run in this process


if __name__ == "__main__":
    main()
