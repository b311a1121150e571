"""SelfPlayCallback: drives the rounds inside one Lightning fit.

Round t spans epochs [t·E, (t+1)·E) with E = epochs_per_round. At a round's start the
callback has the opponent (the policy as it stands now, θ_t) generate one synthetic response
per prompt, builds the pairs (mixing earlier rounds' synthetic data if asked), caches the
opponent's log-probs, and sets the round's λ and learning rate. At a round's end it saves
the policy as a Hugging Face directory. Everything a round produces goes to disk first, and
is read back on resume instead of being made again. With an SFT module (module=sft) a round
trains on the real responses alone and generates nothing, so SFT and SPIN share the rounds,
schedule, checkpoints and evaluation.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from spinlab.rundir import RunDir, append_jsonl, read_jsonl, replace_dir, write_bytes, write_json, write_jsonl

log = logging.getLogger(__name__)

ROUND_KEYS = ("lam", "lr", "mix_previous_rounds")


def round_settings(index: int, base: dict, overrides: dict | None) -> dict:
    """Settings of round `index`: an override applies from its round onwards (sticky)."""
    settings = dict(base)
    for start in sorted(int(k) for k in (overrides or {})):
        if start <= index:
            settings.update((overrides or {}).get(start) or (overrides or {}).get(str(start)))
    return settings


def check_round_overrides(overrides: dict | None, rounds: int) -> None:
    for key, values in (overrides or {}).items():
        if not str(key).isdigit() or not 0 <= int(key) < rounds:
            raise ValueError(f"round_overrides key {key!r} is not a round index in [0, {rounds})")
        for name, value in (values or {}).items():
            if name not in ROUND_KEYS:
                raise ValueError(f"round_overrides.{key}.{name}: unknown setting; allowed: {ROUND_KEYS}")
            if name == "lam" and value <= 0:
                raise ValueError(f"round_overrides.{key}.lam must be > 0, got {value}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file, fsynced, then renamed into place."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes(Path(path), buffer.getvalue())


class RoundCheckpoint(L.Callback):
    """Saves `last.ckpt` at every epoch end, after SelfPlayCallback has prepared the next round.

    Place it after SelfPlayCallback. Written atomically (see AtomicCheckpointIO), so a kill
    while saving leaves the previous checkpoint whole.
    """

    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        log.info("saving checkpoint %s (epoch %d)", self.path, trainer.current_epoch)
        trainer.save_checkpoint(self.path, weights_only=False)
        log.info("checkpoint saved (epoch %d)", trainer.current_epoch)


class SelfPlayCallback(L.Callback):
    def __init__(
        self,
        run_dir: str,
        generator,
        rounds: int,
        epochs_per_round: int = 1,
        lam: float = 0.1,
        lr: float = 5e-7,
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
        check_round_overrides(round_overrides, rounds)
        self.run_dir = RunDir(run_dir)
        self.generator = generator
        self.rounds = rounds
        self.epochs_per_round = epochs_per_round
        self.base = {"lam": lam, "lr": lr}
        self.round_overrides = dict(round_overrides or {})
        self.num_samples = num_samples
        if isinstance(evaluator, Mapping):  # `~eval` leaves a plain node, not an evaluator
            if evaluator:
                raise ValueError(
                    f"eval was removed but a preset still sets eval keys {sorted(evaluator)}: turn "
                    "evaluation off with eval.heldout_pairs=0 eval.task_prompts=0 instead"
                )
            evaluator = None
        self.evaluator = evaluator
        # Checkpointed state: where the run is, and each round's schedule once fixed.
        self.completed_epochs = 0
        self.plans: dict[int, dict] = {}
        self.summaries: dict[int, dict] = {}
        self._round_started = 0.0

    def state_dict(self) -> dict:
        return {"completed_epochs": self.completed_epochs, "plans": self.plans, "summaries": self.summaries}

    def load_state_dict(self, state: dict) -> None:
        self.completed_epochs = state["completed_epochs"]
        self.plans = {int(k): v for k, v in state["plans"].items()}
        self.summaries = {int(k): v for k, v in state["summaries"].items()}

    # -- hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        # Lightning restores callback state before this hook, the loop counters only after it.
        index = self.completed_epochs // self.epochs_per_round
        if index < self.rounds:
            self.start_round(trainer, pl_module, index)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.completed_epochs += 1
        if self.completed_epochs % self.epochs_per_round:
            return
        index = self.completed_epochs // self.epochs_per_round - 1
        self.finish_round(trainer, pl_module, index)
        if index + 1 < self.rounds:
            self.start_round(trainer, pl_module, index + 1)

    # -- a round ----------------------------------------------------------------------------
    def start_round(self, trainer: L.Trainer, pl_module, index: int) -> None:
        self._round_started = time.perf_counter()
        dm = trainer.datamodule
        settings = round_settings(
            index, {**self.base, "mix_previous_rounds": dm.mix_previous_rounds}, self.round_overrides
        )
        if pl_module.self_play:
            synthetic = self.synthetic_rows(trainer, pl_module, index)
            self.log_samples(trainer, index, synthetic[: self.num_samples])
            pairs = list(synthetic)
            for earlier in range(max(0, index - settings["mix_previous_rounds"]), index):
                pairs += read_jsonl(self.run_dir.synthetic(earlier))
        else:  # an SFT round: the real responses only, nothing to generate
            pairs = [{"prompt": r["prompt"], "real": r["response"]} for r in dm.load_split("train")]
        dm.set_pairs(pairs)
        if pl_module.opponent_mode == "cached":
            dm.set_opponent_logps(self.opponent_logps(trainer, pl_module, index))
        fresh = index not in self.plans
        if fresh:
            world = trainer.world_size
            steps = self.epochs_per_round * dm.steps_per_epoch(trainer.accumulate_grad_batches, world)
            self.plans[index] = {
                "lam": float(settings["lam"]),
                "lr": float(settings["lr"]),
                "start_step": trainer.global_step,
                "total_steps": steps,
                "pairs": len(pairs),
            }
        if self.evaluator is not None and trainer.is_global_zero:
            self.evaluator.prepare(index, pl_module, dm, self.generator, self.run_dir)
        plan = self.plans[index]
        pl_module.begin_round(
            index, plan["lam"], plan["lr"], plan["start_step"], plan["total_steps"], fresh=fresh
        )
        log.info("round %d: %d pairs, lam=%g, lr=%g", index, len(pairs), plan["lam"], plan["lr"])

    def log_samples(self, trainer: L.Trainer, index: int, rows: list[dict]) -> None:
        """A table of prompts with real and synthetic responses, for loggers that show tables (W&B)."""
        data = [[index, r["prompt"], r["real"], r["synthetic"]] for r in rows]
        for logger in trainer.loggers:
            if hasattr(logger, "log_table") and trainer.is_global_zero:
                logger.log_table(
                    f"samples/round_{index:03d}", columns=["round", "prompt", "real", "synthetic"], data=data
                )

    def synthetic_rows(self, trainer: L.Trainer, pl_module, index: int) -> list[dict]:
        """This round's pairs, generated by the opponent; resumed from disk when present."""
        final = self.run_dir.synthetic(index)
        if final.exists():
            return read_jsonl(final)
        dm = trainer.datamodule
        rows = dm.load_split("train")
        # Every process generates its share of the batches into a file of its own; batches are
        # seeded by their content, so the result does not depend on the number of processes.
        partials = lambda: sorted(self.run_dir.round_dir(index).glob("synthetic.partial*.jsonl"))  # noqa: E731
        done = {r["index"] for path in partials() for r in read_jsonl(path, drop_torn_tail=True)}
        if done:
            log.info("round %d: resuming generation, %d of %d prompts done", index, len(done), len(rows))
        partial = self.run_dir.synthetic_partial(index, trainer.global_rank)

        def save(batch_rows: list[dict]) -> None:
            append_jsonl(partial, [r for r in batch_rows if r["index"] not in done])
            log.info("round %d: generation batch written (%d responses)", index, len(batch_rows))

        stats = self.generator.generate(
            pl_module.policy,
            dm.tokenizer,
            [dm.encode_prompt(r["prompt"]) for r in rows],
            on_batch=save,
            done=done,
            round_index=index,
            desc=f"round {index} generate",
            shard=(trainer.global_rank, trainer.world_size),
        )
        trainer.strategy.barrier("generation shards")
        if trainer.is_global_zero:
            generated = {r["index"]: r for path in partials() for r in read_jsonl(path, drop_torn_tail=True)}
            missing = set(range(len(rows))) - generated.keys()
            if missing:
                raise RuntimeError(
                    f"round {index}: generation left {len(missing)} prompts without a response"
                )
            pairs = []
            for i, row in enumerate(rows):
                meta = {k: v for k, v in row.items() if k not in ("prompt", "response")}
                gen = generated[i]
                meta.update(round=index, tokens=gen["tokens"], finished=gen["finished"])
                pairs.append(
                    {
                        "prompt": row["prompt"],
                        "real": row["response"],
                        "synthetic": gen["synthetic"],
                        "meta": meta,
                    }
                )
            write_jsonl(final, pairs)
            for path in partials():
                path.unlink()
            write_json(self.run_dir.round_stats(index), {"generation": stats, "pairs": len(pairs)})
            write_jsonl(self.run_dir.round_dir(index) / "samples.jsonl", pairs[: self.num_samples])
            for logger in trainer.loggers:
                logger.log_metrics(
                    {"gen/tokens_per_s": stats["tokens_per_s"], "round": index}, step=trainer.global_step
                )
        trainer.strategy.barrier("synthetic data")
        return read_jsonl(final)

    def opponent_logps(self, trainer: L.Trainer, pl_module, index: int) -> torch.Tensor:
        path = self.run_dir.opponent_logps(index)
        if not path.exists() and trainer.is_global_zero:
            logps = pl_module.score_opponent(
                trainer.datamodule.scoring_dataloader(), desc=f"round {index} opponent"
            )
            buffer = io.BytesIO()
            torch.save(logps, buffer)
            write_bytes(path, buffer.getvalue())
        trainer.strategy.barrier("opponent log-probs")
        return torch.load(path, weights_only=True)

    def finish_round(self, trainer: L.Trainer, pl_module, index: int) -> None:
        out = self.run_dir.hf(index)
        if trainer.is_global_zero:
            log.info("round %d: saving the policy to %s", index, out)
            tmp = out.with_name(out.name + ".tmp")
            pl_module.policy.save_pretrained(tmp, safe_serialization=True)
            trainer.datamodule.tokenizer.save_pretrained(tmp)
            replace_dir(tmp, out)
        trainer.strategy.barrier("round model")
        summary = {"round": index, **pl_module.round_means(), **self.plans[index]}
        if self.evaluator is not None:
            results = (
                self.evaluator.evaluate(index, pl_module, trainer.datamodule, self.run_dir)
                if trainer.is_global_zero
                else {}
            )
            results = trainer.strategy.broadcast(results)
            summary.update(results)
            for logger in trainer.loggers:
                logger.log_metrics({**results, "round": index}, step=trainer.global_step)
        summary["seconds"] = time.perf_counter() - self._round_started
        self.summaries[index] = summary
        if trainer.is_global_zero:
            write_json(self.run_dir.summary, [self.summaries[k] for k in sorted(self.summaries)])
        log.info("round %d done: %s", index, summary)
