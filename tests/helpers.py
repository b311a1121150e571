"""Test-only parts that crash on cue, to exercise resume."""

from typing import ClassVar

import lightning as L
from hydra.utils import get_class


class Crash(RuntimeError):
    pass


class CrashAtBatch(L.Callback):
    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Crash(f"injected crash at epoch {self.epoch} batch {self.batch}")


class CrashingGenerator:
    """A generation backend (`backend`, built from the other keywords) that writes `after` batches
    of round `crash_round`, then dies."""

    def __init__(
        self, crash_round: int, after: int, backend: str = "spinlab.generation.hf.HFGenerator", **kwargs
    ):
        self.crash_round, self.after = crash_round, after
        self.inner = get_class(backend)(**kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, model, tokenizer, prompt_ids, on_batch, round_index=0, **kwargs):
        if round_index != self.crash_round:
            return self.inner.generate(
                model, tokenizer, prompt_ids, on_batch, round_index=round_index, **kwargs
            )
        written = []

        def counting(rows):
            on_batch(rows)
            written.append(len(rows))
            if len(written) == self.after:
                raise Crash(f"injected crash after {self.after} generation batches")

        return self.inner.generate(model, tokenizer, prompt_ids, counting, round_index=round_index, **kwargs)


class PoisonRound(L.Callback):
    """Makes round `round_index` non-finite: its loss (via λ = NaN) or its gradients."""

    def __init__(self, round_index: int, what: str = "loss"):
        self.round_index, self.what = round_index, what

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.what == "loss" and pl_module.round_index == self.round_index:
            pl_module.round.lam = float("nan")

    def on_after_backward(self, trainer, pl_module):
        if self.what == "gradient" and pl_module.round_index == self.round_index:
            next(pl_module.policy.parameters()).grad.view(-1)[0] = float("inf")


class PoisonStep(L.Callback):
    """Makes the one optimizer step `step` (0-based, counted over the run) non-finite: its loss."""

    def __init__(self, step: int):
        self.step = step
        self.lam = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.lam, pl_module.round.lam = pl_module.round.lam, float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.lam is not None:
            pl_module.round.lam, self.lam = self.lam, None


def response_logp(model, tokenizer, prompt: str, response: str) -> float:
    """log p(response + EOS | prompt) summed over the response tokens, written out here from the
    logits (log_softmax, then the log-prob of each next token), so that tests do not take the
    log-probs from the code they check."""
    import torch

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    # Token i is predicted at position i - 1.
    return sum(float(logp[len(prompt_ids) + j - 1, t]) for j, t in enumerate(response_ids))


class RecordPairs(L.Callback):
    """The rows each round trains on, by round index (class-level, read back by the test)."""

    seen: ClassVar[dict[int, list[dict]]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        RecordPairs.seen[pl_module.round_index] = list(trainer.datamodule.pairs)


def sequence_tokens(tokenizer, prompt: str, response: str) -> int:
    """Tokens of prompt (chat template) + response + EOS, counted here with the tokenizer."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(prompt_ids) + len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1


def first_batch(cfg, epoch: int) -> list[int]:
    """The row indices of an epoch's first training batch in one process: the data module's
    documented shuffle, a permutation seeded by the data seed and the epoch."""
    import torch

    generator = torch.Generator().manual_seed(cfg.data.seed * 100_003 + epoch)
    return torch.randperm(cfg.data.num_prompts, generator=generator).tolist()[: cfg.data.batch_size]


def step_losses(root) -> dict[int, list[float]]:
    """The per-step `train/loss` rows of a run's csv/metrics.csv, by round, in step order."""
    import csv

    with open(root / "csv" / "metrics.csv") as f:
        steps = sorted(
            (int(r["step"]), int(float(r["round"])), float(r["train/loss"]))
            for r in csv.DictReader(f)
            if r.get("train/loss")
        )
    out: dict[int, list[float]] = {}
    for _, index, loss in steps:
        out.setdefault(index, []).append(loss)
    return out


def broken_chat_template(**kwargs):
    """The tiny model, whose tokenizer's chat templating fails with a bug of its own."""
    from spinlab.models import tiny_model

    loaded = tiny_model(**kwargs)

    def apply_chat_template(*args, **kwargs):
        raise RuntimeError("a bug inside the tokenizer's chat templating")

    loaded.tokenizer.apply_chat_template = apply_chat_template
    return loaded


def broken_model(**kwargs):
    raise RuntimeError("a bug inside model loading")


class BrokenSource:
    """A data source with a bug: reading a split fails."""

    def __init__(self, **kwargs):
        pass

    def load(self, split: str) -> list[dict]:
        raise RuntimeError(f"a bug inside the data source, reading {split}")


class KillBeforeCheckpoint(L.Callback):
    """SIGKILLs its own process as the checkpoint of epoch `epoch` is about to be written: after
    the round's model, evaluation and summary.json, before last.ckpt."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.current_epoch == self.epoch:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def missing_model(**kwargs):
    """A model that cannot be found: the expected error a start refuses."""
    from spinlab.errors import NotFoundError

    raise NotFoundError("cannot load model 'no/such-model' (Hugging Face hub id): HF_HUB_OFFLINE=1 is set")
