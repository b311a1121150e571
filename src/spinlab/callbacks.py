"""SelfPlayCallback: drives the rounds inside one Lightning fit.

Round t spans epochs [t·E, (t+1)·E) with E = epochs_per_round. At a round's start the callback
fixes the round's settings (a `Round`, which it owns and checkpoints), has the configured pair
builder make the round's rows (SPIN: the opponent, i.e. the policy as it stands now, generates one
synthetic response per prompt; SFT: the real responses; T-SPIN: SPIN's pairs plus the
proto-synthetic responses of round 0) and, where the method caches them, the
opponent's log-probs. At a round's end it saves the policy as a Hugging Face directory and runs the
evaluation. Everything a round produces goes to disk first, and is read back on resume instead of
being made again. Every process takes part in every step (see spinlab.collective).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from spinlab import lightning_compat
from spinlab.cards import write_round_cards
from spinlab.collective import all_gather_objects, save_policy
from spinlab.config import round_overrides as typed_round_overrides
from spinlab.errors import ConfigError, RunDirError
from spinlab.rounds import Round, round_settings
from spinlab.rundir import CHECKSUMS, HashingStream, RunDir, record_checksum, sha256_file, write_json

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
    checkpoint is never held in memory a second time as bytes. Its sha256, computed as it is
    written, goes to `<name>.sha256` (rundir.checksum_sidecar), checked before a resume."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                writer = HashingStream(f)
                torch.save(checkpoint, writer)
                f.flush()
                os.fsync(f.fileno())
            record_checksum(path, writer.hexdigest())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise RunDirError(f"cannot write {path}: {err.strerror}", err.errno) from err
        except RuntimeError as err:  # torch.save's zip writer: a failed write (full disk), no path
            tmp.unlink(missing_ok=True)
            raise write_error(path, err) from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_error(path: Path, err: BaseException) -> RunDirError:
    """A failed checkpoint write, naming the path and the space left (torch's own message does not)."""
    try:
        free = f"{shutil.disk_usage(path.parent).free} bytes free there"
    except OSError:
        free = "free space unknown"
    return RunDirError(f"cannot write {path} ({free}): {err}", errno.EIO)


# -- stopping on a signal ---------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # the stop signals this process got, in order
_agreed: list[int] = []  # the one signal every process of the run names, once they agreed to stop


def _on_signal(signum, frame) -> None:
    if not _received:
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
    _received.append(signum)


def stop_agreed(trainer: L.Trainer) -> bool:
    """Whether any process of the run got a stop signal. Every process calls it at the same point
    (one collective when there are several), so that all of them stop after the same step; from
    then on `trainer.received_sigterm` is set, and Lightning's loops raise SIGTERMException after
    the current step or at the epoch's end."""
    if trainer.received_sigterm:
        return True
    local = _received[0] if _received else 0
    if trainer.world_size > 1:
        # Agree on the signal too, the smallest number any process got (SIGUSR1, Slurm's requeue
        # signal, before SIGTERM): rank 0 names it and decides on a requeue with it, also when
        # only another process received it.
        mine = torch.tensor(local or 1 << 16, device=trainer.strategy.root_device)  # 1 << 16: none
        local = int(trainer.strategy.reduce(mine, reduce_op="min")) % (1 << 16)
    if local:
        _agreed[:] = [local]
        lightning_compat.request_stop(trainer)
    return bool(local)


def received_signal() -> int | None:
    """The signal the processes agreed to stop on; before they agreed, the first this one got."""
    return _agreed[0] if _agreed else _received[0] if _received else None


class RoundCheckpoint(L.Callback):
    """Saves `last.ckpt` at every epoch end, after SelfPlayCallback has finished a round there, and
    after the current step when a stop signal (SIGTERM, SIGUSR1) arrives.

    Place it after SelfPlayCallback. One file (AtomicCheckpointIO) for unsharded runs; for sharded
    ones (trainer=fsdp, fsdp_cpu) a distributed checkpoint, a directory in which every process
    writes its own shards, written under a new name and then swapped in by renaming a link, so a
    kill while saving leaves the previous checkpoint whole.

    Signals: this callback replaces Lightning's SIGTERM handler, which lets each process stop on its
    own (and, under Slurm with auto-requeue, saves a checkpoint from inside the handler, mid-step).
    Here the handler only records the signal; at each optimizer step's end the processes agree on
    stopping (`stop_agreed`), save the checkpoint of that step, and end with SIGTERMException. Under
    Slurm with Lightning's SLURMEnvironment(auto_requeue=True) (the default when Lightning detects
    Slurm), its requeue signal also saves and stops, and rank 0 then requeues the job.
    """

    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / "last.ckpt"
        self.saved_at_epoch_end = False
        self.stopped: dict | None = None  # after a stop: the signal and the step saved
        self._previous_handlers: dict = {}

    # -- signals ----------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        # Lightning installs its own handlers after on_fit_start; ours take their place.
        lightning_compat.keep_signal_handlers_out(trainer)
        _received.clear()
        _agreed.clear()
        self.stopped = None
        signals = set(STOP_SIGNALS)
        env = lightning_compat.cluster_environment(trainer)
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            signals.add(env.requeue_signal)
        for signum in signals:
            self._previous_handlers[signum] = signal.signal(signum, _on_signal)

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        processed, last = lightning_compat.batch_position(trainer)
        # Stop only where the optimizer has stepped: accumulated gradients are not checkpointed.
        # Several processes agree through a collective, which waits for the device: once per
        # logging window, as the module reads its metrics, not after every step.
        every = trainer.accumulate_grad_batches * (
            1 if trainer.world_size == 1 else trainer.log_every_n_steps
        )
        if last or processed % every == 0:
            stop_agreed(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self.saved_at_epoch_end = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.save(trainer, pl_module)
        self.saved_at_epoch_end = True

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        try:
            if isinstance(exception, SIGTERMException):
                self.stop(trainer, pl_module)
        finally:
            self.teardown(trainer, pl_module, "fit")  # Lightning calls no teardown hook after an exception

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # A signal during the last round's end (its model saved, evaluated, checkpointed): every
        # round is finished and saved, and the run still ends as a stopped one (status 75).
        if stop_agreed(trainer):
            self.stopped = self._stop_record(trainer, at_epoch_end=True)

    def stop(self, trainer: L.Trainer, pl_module) -> None:
        if not self.saved_at_epoch_end:
            self.save(trainer, pl_module)
        self.stopped = self._stop_record(trainer, at_epoch_end=self.saved_at_epoch_end)
        signum = signal.Signals[self.stopped["signal"]]
        env = lightning_compat.cluster_environment(trainer)
        if (
            isinstance(env, SLURMEnvironment)
            and env.auto_requeue
            and signum == env.requeue_signal
            and trainer.is_global_zero
        ):
            requeue()

    @staticmethod
    def _stop_record(trainer: L.Trainer, at_epoch_end: bool) -> dict:
        """The signal, the step saved and the epoch that step belongs to: at an epoch's end the
        epoch just finished (a stop agreed as the next epoch begins falls in no epoch of its own)."""
        return {
            "signal": signal.Signals(received_signal() or signal.SIGTERM).name,
            "step": trainer.global_step,
            "epoch": lightning_compat.epochs_trained(trainer) - 1 if at_epoch_end else trainer.current_epoch,
            "epoch_end": at_epoch_end,
        }

    # -- saving -----------------------------------------------------------------------------
    def save(self, trainer: L.Trainer, pl_module) -> None:
        _check_finite(pl_module)  # a step with a non-finite loss or gradient is never saved
        log.info(
            "saving checkpoint %s (epoch %d, step %d)", self.path, trainer.current_epoch, trainer.global_step
        )
        if getattr(pl_module, "sharded", False):
            self._save_sharded(trainer)
        else:
            trainer.save_checkpoint(self.path, weights_only=False)
        log.info("checkpoint saved (epoch %d, step %d)", trainer.current_epoch, trainer.global_step)

    def _save_sharded(self, trainer: L.Trainer) -> None:
        # A name no earlier save used, so that a save never writes into the directory that
        # last.ckpt (or a link the user moved it to) still names.
        name = trainer.strategy.broadcast(
            f"epoch{trainer.current_epoch:04d}-step{trainer.global_step:07d}-{uuid.uuid4().hex[:8]}.ckpt"
        )
        target = self.path.with_name(name)
        try:
            trainer.save_checkpoint(target, weights_only=False)
        except (OSError, RuntimeError) as err:
            raise write_error(target, err) from err
        trainer.strategy.barrier("sharded checkpoint")
        sums = self._checksums(trainer, target, getattr(trainer.strategy, "saved_digests", None))
        if trainer.is_global_zero:
            write_json(target / CHECKSUMS, sums)
            link = self.path.with_name(f".{self.path.name}.link.tmp")
            link.unlink(missing_ok=True)
            link.symlink_to(name)
            os.replace(link, self.path)  # atomic: last.ckpt names either the old or the new directory
            remove_unlinked_checkpoints(self.path.parent)
        trainer.strategy.barrier("checkpoint link")

    @staticmethod
    def _checksums(trainer: L.Trainer, target: Path, saved: tuple[Path, dict] | None) -> dict:
        """sha256 of every file of a sharded checkpoint: the digests each process computed as it
        wrote its files (FSDP2Strategy), gathered; a file none of them hashed (a strategy that
        does not hash as it writes) is read back, each process hashing its share of those."""
        rank, world = trainer.global_rank, trainer.world_size
        written = saved[1] if saved is not None and saved[0] == target else {}
        known = {k: v for share in all_gather_objects(written, world) for k, v in share.items()}
        files = sorted(p.name for p in target.iterdir() if p.is_file() and p.name not in known)
        mine = {n: sha256_file(target / n) for n in files[rank::world]}
        return {**known, **{k: v for share in all_gather_objects(mine, world) for k, v in share.items()}}


def remove_unlinked_checkpoints(directory: Path) -> None:
    """Delete the sharded checkpoint directories that no link in `directory` names: the ones
    replaced by a newer save, or left half-written by a kill. A link moved aside by hand
    (`last.ckpt.damaged`) keeps its directory."""
    named = {p.resolve() for p in directory.iterdir() if p.is_symlink()}
    for p in directory.iterdir():
        if p.is_dir() and not p.is_symlink() and p.name.endswith(".ckpt") and p.resolve() not in named:
            shutil.rmtree(p)


def requeue() -> None:
    """Put this Slurm job back in the queue, as Lightning's auto-requeue does."""
    import subprocess

    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("not requeued: SLURM_JOB_ID is not set")
        return
    result = subprocess.run(["scontrol", "requeue", job], check=False)
    if result.returncode == 0:
        log.info("requeued Slurm job %s", job)
    else:
        log.warning("requeueing Slurm job %s failed (scontrol exit status %d)", job, result.returncode)


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
                raise ConfigError(
                    f"eval was removed but a preset still sets eval keys {sorted(evaluator)}: turn "
                    "evaluation off with eval.heldout_pairs=0 eval.task_prompts=0 instead"
                )
            evaluator = None
        self.evaluator = evaluator
        # Checkpointed state: the batches of the current epoch already trained (a checkpoint
        # saved after a step), each round once it has started, and each finished round's summary.
        self.epoch_batches = 0
        self.started: dict[int, Round] = {}
        self.summaries: dict[int, dict] = {}
        self._round_started = 0.0
        self._current: int | None = None  # the round this process has started

    def state_dict(self) -> dict:
        return {
            "epoch_batches": self.epoch_batches,
            "rounds": {i: r.as_dict() for i, r in self.started.items()},
            "summaries": self.summaries,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch_batches = state.get("epoch_batches", 0)
        self.started = {int(k): Round(**v) for k, v in state["rounds"].items()}
        self.summaries = {int(k): v for k, v in state["summaries"].items()}

    # -- hooks ------------------------------------------------------------------------------
    # A round's life, in the order the hooks run:
    #   on_train_dataloader  at the round's first epoch (or the epoch a resume lands in): start_round
    #                        plans the Round, builds its pairs (generation) and hands them to the
    #                        data module; a resumed round reads everything back from disk.
    #   training steps       (RoundCheckpoint saves after a step when a stop signal arrives)
    #   on_train_epoch_end   at the round's last epoch: finish_round saves the policy as a
    #                        Hugging Face directory, evaluates it and writes summary.json; then
    #                        RoundCheckpoint (placed after this callback) saves last.ckpt.
    # So the checkpoint at a round's end holds the finished round, and the next round's generation
    # starts after it: a kill while generating resumes from the finished round.
    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        objective = getattr(pl_module, "objective", None)
        provided = tuple(getattr(self.pairs, "kinds", ()))
        if objective is not None and provided != tuple(objective.kinds):
            raise ConfigError(
                f"the objective {type(objective).__name__} trains on the kinds of response "
                f"{tuple(objective.kinds)}, but the pair builder {type(self.pairs).__name__} provides "
                f"{provided}: pick the `pairs` option that provides them (pairs=synthetic: real, synthetic; "
                "pairs=real: real; pairs=triplets: real, synthetic, proto), or leave `pairs` unset so "
                "that the objective picks it"
            )
        self._current = None
        # Lightning calls a resume after a step "not resumable"; it is, and on_train_dataloader says so.
        lightning_compat.quiet_resume_warning()

    @staticmethod
    def epochs_trained(trainer: L.Trainer) -> int:
        """Epochs whose training steps are all done: Lightning's count, which rises before the
        epoch-end hooks and is restored from a checkpoint saved at an epoch's end or after a step."""
        return lightning_compat.epochs_trained(trainer)

    def on_train_dataloader(self, trainer: L.Trainer, pl_module) -> None:
        """Called by SelfPlayDataModule.train_dataloader at each epoch's start."""
        index = self.epochs_trained(trainer) // self.epochs_per_round
        if index >= self.rounds or self._current == index:
            return
        if self._current is not None and stop_agreed(trainer):
            raise SIGTERMException  # a stop signal between rounds: the finished round is saved
        self.start_round(trainer, pl_module, index)
        # Resumed from a checkpoint saved after a step: the epoch goes on after that step.
        trainer.datamodule.skip_batches = self.epoch_batches
        if self.epoch_batches:
            log.info(
                "round %d: resuming after batch %d of its epoch; the epoch's remaining batches follow, "
                "in the order of an uninterrupted run",
                index,
                self.epoch_batches,
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.epoch_batches += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        _check_finite(pl_module)  # before the round's policy is saved, evaluated or generates
        self.epoch_batches = 0
        epochs = self.epochs_trained(trainer)
        if epochs % self.epochs_per_round == 0:
            self.finish_round(trainer, pl_module, epochs // self.epochs_per_round - 1)

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
            start_step=trainer.global_step,
            total_steps=0,
            pairs=0,
        )
        # The round's synthetic responses and its held-out pairs' come from the same opponent: one
        # engine for both (generation=vllm), shut down before the round trains.
        with self.generator.session(longest_prompt=dm.max_prompt_length or 0):
            rows = self.pairs.build(
                trainer, pl_module, planned, self.run_dir, self.generator, self.num_samples
            )
            if trainer.is_global_zero:  # the synthetic data's card, as soon as the data is on disk
                write_round_cards(self.run_dir.root, index, model=False)
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
        if self.evaluator is not None and index == 0 and -1 not in self.summaries:
            # benchmarks of the start model: round -1
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
        weights = save_policy(trainer, pl_module, index, self.run_dir.hf(index), trainer.datamodule.tokenizer)
        summary = {"round": index, **pl_module.round_means(), **self.started[index].as_dict()}
        summary.pop("index")
        summary.pop("mix_previous_rounds")
        if self.evaluator is not None:
            results = self.evaluator.evaluate(
                index, trainer, pl_module, trainer.datamodule, self.run_dir, weights=weights
            )
            summary.update(results)
            for logger in trainer.loggers:
                logger.log_metrics({**results, "round": index}, step=trainer.global_step)
        summary["seconds"] = time.perf_counter() - self._round_started
        self.summaries[index] = summary
        if trainer.is_global_zero:
            write_json(self.run_dir.summary, [self.summaries[k] for k in sorted(self.summaries)])
            write_round_cards(self.run_dir.root, index)  # read from run_config.yaml and summary.json
        log.info("round %d done: %s", index, summary)
