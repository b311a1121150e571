"""SelfPlayCallback: drives the rounds inside one Lightning fit.

Round t spans epochs [t·E, (t+1)·E) with E = epochs_per_round. At a round's start the callback
fixes the round's settings (a `Round`, which it owns and checkpoints), has the configured pair
builder make the round's rows (SPIN: the opponent, i.e. the policy as it stands now, generates one
synthetic response per prompt; SFT: the real responses; T-SPIN: SPIN's pairs plus the
proto-synthetic responses of round 0) and, where the method caches them, the
opponent's log-probs. At a round's end it saves the policy as a Hugging Face directory and runs the
evaluation. Everything a round produces goes to disk first, and is read back on resume instead of
being made again. Every process takes part in every step (see spinlab.rounds).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from spinlab.config import round_overrides as typed_round_overrides
from spinlab.rounds import Round, round_settings, save_policy
from spinlab.rundir import RunDir, write_json

log = logging.getLogger(__name__)


def _check_finite(pl_module) -> None:
    """The module's deferred non-finite check (PolicyModule.check_finite): callbacks run before
    the module's own epoch-end hook, so each one that saves calls it first."""
    check = getattr(pl_module, "check_finite", None)
    if check is not None:
        check()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints streamed to a temporary file in the same directory, fsynced, then
    renamed into place: a kill while saving leaves the previous checkpoint whole, and the
    checkpoint is never held in memory a second time as bytes."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class RoundCheckpoint(L.Callback):
    """Saves `last.ckpt` at every epoch end, after SelfPlayCallback has prepared the next round.

    Place it after SelfPlayCallback. One file (AtomicCheckpointIO) for unsharded runs; for sharded
    ones (trainer=fsdp, fsdp_cpu) a distributed checkpoint, a directory in which every process
    writes its own shards, written under a new name and then swapped in by renaming a link, so a
    kill while saving leaves the previous checkpoint whole.
    """

    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        _check_finite(pl_module)
        log.info("saving checkpoint %s (epoch %d)", self.path, trainer.current_epoch)
        if getattr(pl_module, "sharded", False):
            self._save_sharded(trainer)
        else:
            trainer.save_checkpoint(self.path, weights_only=False)
        log.info("checkpoint saved (epoch %d)", trainer.current_epoch)

    def _save_sharded(self, trainer: L.Trainer) -> None:
        name = f"epoch{trainer.current_epoch:04d}.ckpt"
        target = self.path.with_name(name)
        trainer.save_checkpoint(target, weights_only=False)
        trainer.strategy.barrier("sharded checkpoint")
        if trainer.is_global_zero:
            previous = self.path.resolve() if self.path.is_symlink() else None
            link = self.path.with_name(f".{self.path.name}.link.tmp")
            link.unlink(missing_ok=True)
            link.symlink_to(name)
            os.replace(link, self.path)  # atomic: last.ckpt names either the old or the new directory
            if previous is not None and previous != target.resolve() and previous.exists():
                import shutil

                shutil.rmtree(previous)
        trainer.strategy.barrier("checkpoint link")


class SelfPlayCallback(L.Callback):
    def __init__(
        self,
        run_dir: str,
        generator,
        pairs,
        rounds: int,
        epochs_per_round: int = 1,
        lam: float = 0.1,
        lr: float = 5e-7,
        mix_previous_rounds: int = 0,
        round_overrides: dict | None = None,
        num_samples: int = 3,
        evaluator=None,
    ):
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        if epochs_per_round < 1:
            raise ValueError(f"epochs_per_round must be >= 1, got {epochs_per_round}")
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        if mix_previous_rounds < 0:
            raise ValueError(f"data.mix_previous_rounds must be >= 0, got {mix_previous_rounds}")
        self.run_dir = RunDir(run_dir)
        self.generator = generator
        self.pairs = pairs
        self.rounds = rounds
        self.epochs_per_round = epochs_per_round
        self.base = {"lam": lam, "lr": lr, "mix_previous_rounds": mix_previous_rounds}
        self.round_overrides = typed_round_overrides(round_overrides or {}, rounds)
        self.num_samples = num_samples
        if isinstance(evaluator, Mapping):  # `~eval` leaves a plain node, not an evaluator
            if evaluator:
                raise ValueError(
                    f"eval was removed but a preset still sets eval keys {sorted(evaluator)}: turn "
                    "evaluation off with eval.heldout_pairs=0 eval.task_prompts=0 instead"
                )
            evaluator = None
        self.evaluator = evaluator
        # Checkpointed state: where the run is, and each round once it has started.
        self.completed_epochs = 0
        self.started: dict[int, Round] = {}
        self.summaries: dict[int, dict] = {}
        self._round_started = 0.0
        self._current: int | None = None  # the round this process has started

    def state_dict(self) -> dict:
        return {
            "completed_epochs": self.completed_epochs,
            "rounds": {i: r.as_dict() for i, r in self.started.items()},
            "summaries": self.summaries,
        }

    def load_state_dict(self, state: dict) -> None:
        self.completed_epochs = state["completed_epochs"]
        self.started = {int(k): Round(**v) for k, v in state["rounds"].items()}
        self.summaries = {int(k): v for k, v in state["summaries"].items()}

    # -- hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        objective = getattr(pl_module, "objective", None)
        provided = tuple(getattr(self.pairs, "kinds", ()))
        if objective is not None and provided != tuple(objective.kinds):
            raise ValueError(
                f"the objective {type(objective).__name__} trains on the kinds of response "
                f"{tuple(objective.kinds)}, but the pair builder {type(self.pairs).__name__} provides "
                f"{provided}: pick the `pairs` option that provides them (pairs=synthetic: real, synthetic; "
                "pairs=real: real; pairs=triplets: real, synthetic, proto), or leave `pairs` unset so "
                "that the objective picks it"
            )
        # The first round of this process starts when the fit loop first asks for the training
        # data: by then every strategy has restored the weights, the callbacks' state and the loop
        # counters (sharded strategies restore only after on_fit_start).
        trainer.datamodule.before_train_loader = lambda: self.resume_round(trainer, pl_module)
        self._current = None

    def resume_round(self, trainer: L.Trainer, pl_module) -> None:
        index = self.completed_epochs // self.epochs_per_round
        if index < self.rounds and self._current != index:
            self.start_round(trainer, pl_module, index)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        _check_finite(pl_module)  # before the round's policy is saved, evaluated or generates
        self.completed_epochs += 1
        if self.completed_epochs % self.epochs_per_round:
            return
        index = self.completed_epochs // self.epochs_per_round - 1
        self.finish_round(trainer, pl_module, index)
        if index + 1 < self.rounds:
            self.start_round(trainer, pl_module, index + 1)

    # -- a round ----------------------------------------------------------------------------
    def start_round(self, trainer: L.Trainer, pl_module, index: int) -> None:
        self._current = index
        self._round_started = time.perf_counter()
        dm = trainer.datamodule
        fresh = index not in self.started
        settings = round_settings(index, self.base, self.round_overrides)
        planned = self.started.get(index) or Round(
            index=index,
            lam=float(settings["lam"]),
            lr=float(settings["lr"]),
            mix_previous_rounds=int(settings["mix_previous_rounds"]),
            total_steps=0,
            pairs=0,
        )
        rows = self.pairs.build(trainer, pl_module, planned, self.run_dir, self.generator, self.num_samples)
        if fresh:
            self.log_samples(trainer, index, rows[: self.num_samples])
            self.log_generation(trainer, index)
        dm.set_pairs(rows)
        logps = self.pairs.opponent_logps(trainer, pl_module, planned, self.run_dir)
        if logps is not None:
            dm.set_opponent_logps(logps)
        if fresh:
            steps = dm.steps_per_epoch(trainer.accumulate_grad_batches, trainer.world_size)
            planned.total_steps = max(1, self.epochs_per_round * steps)
            planned.pairs = len(rows)
            self.started[index] = planned
        if self.evaluator is not None:
            self.evaluator.prepare(index, trainer, pl_module, dm, self.generator, self.run_dir)
            if index == 0 and -1 not in self.summaries:  # benchmarks of the start model: round -1
                self.log_start(trainer, self.evaluator.evaluate_start(trainer, pl_module, dm, self.run_dir))
        pl_module.begin_round(planned, fresh=fresh)
        log.info("round %d: %d pairs, lam=%g, lr=%g", index, len(rows), planned.lam, planned.lr)

    def log_start(self, trainer: L.Trainer, results: dict) -> None:
        if not results:
            return
        self.summaries[-1] = {"round": -1, **results}
        for logger in trainer.loggers:
            logger.log_metrics({**results, "round": -1}, step=trainer.global_step)

    def log_generation(self, trainer: L.Trainer, index: int) -> None:
        # Logged from stats.json when the round starts, not when generation ends: a kill between
        # the two and a resume from an earlier checkpoint cut the row from the history, and the
        # resumed run reads the finished synthetic data back instead of generating it again.
        path = self.run_dir.round_stats(index)
        if not trainer.is_global_zero or not path.exists():
            return
        stats = json.loads(path.read_text()).get("generation", {})
        if "tokens_per_s" in stats:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {"gen/tokens_per_s": stats["tokens_per_s"], "round": index}, step=trainer.global_step
                )

    def log_samples(self, trainer: L.Trainer, index: int, rows: list[dict]) -> None:
        """A table of prompts with real and synthetic responses, for loggers that show tables (W&B)."""
        if not trainer.is_global_zero or not rows or "synthetic" not in rows[0]:
            return
        data = [[index, r["prompt"], r["real"], r["synthetic"]] for r in rows]
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(
                    f"samples/round_{index:03d}", columns=["round", "prompt", "real", "synthetic"], data=data
                )

    def finish_round(self, trainer: L.Trainer, pl_module, index: int) -> None:
        save_policy(trainer, pl_module, index, self.run_dir.hf(index), trainer.datamodule.tokenizer)
        summary = {"round": index, **pl_module.round_means(), **self.started[index].as_dict()}
        summary.pop("index")
        summary.pop("mix_previous_rounds")
        if self.evaluator is not None:
            results = self.evaluator.evaluate(index, trainer, pl_module, trainer.datamodule, self.run_dir)
            summary.update(results)
            for logger in trainer.loggers:
                logger.log_metrics({**results, "round": index}, step=trainer.global_step)
        summary["seconds"] = time.perf_counter() - self._round_started
        self.summaries[index] = summary
        if trainer.is_global_zero:
            write_json(self.run_dir.summary, [self.summaries[k] for k in sorted(self.summaries)])
        log.info("round %d done: %s", index, summary)
