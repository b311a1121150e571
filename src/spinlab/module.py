"""SPINModule: the policy (θ_t+1, trained) against the opponent (θ_t, frozen).

The opponent enters the loss only through its log-probs of each pair's real and synthetic
response. With `opponent="cached"` (the default) they are computed once at the round's start
from the policy's weights at that moment (exact, because the opponent is frozen for the whole
round) and arrive in the batch; with `opponent="model"` a frozen copy of the policy scores
every batch. Both give the same loss.

SFTModule trains the same policy on the real responses alone (token-mean negative
log-likelihood): the weak starting model and the continued-SFT control of a SPIN study run
through the same rounds, schedule, checkpoints and evaluation as SPIN does.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from spinlab.data import batch_tokens
from spinlab.logprobs import IGNORE_INDEX, chunked_sequence_logps, sequence_logps

log = logging.getLogger(__name__)

OPPONENT_MODES = ("cached", "model")
NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """A NaN or infinite loss or gradient; the last good checkpoint is kept."""


METRICS = ("loss", "margin", "accuracy", "reward_real", "reward_synthetic", "logp_real", "logp_synthetic")
SFT_METRICS = ("loss", "logp_real")


def warmup_linear_decay(step: int, total_steps: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warm-up over warmup_ratio of the round, then linear decay to 0."""
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


class PolicyModule(L.LightningModule):
    """What SPIN and SFT share: the policy, its optimizer, the per-round learning-rate
    schedule, response log-probs, non-finite handling and the per-round metric means."""

    metric_names: tuple[str, ...] = ()
    self_play = False  # whether SelfPlayCallback generates synthetic responses for this module
    opponent_mode: str | None = None  # "cached": SelfPlayCallback supplies opponent log-probs

    def __init__(
        self,
        policy: nn.Module,
        optimizer: Callable,
        lam: float = 0.1,
        warmup_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int | None = 1024,
        on_nonfinite: str = "stop",
    ):
        super().__init__()
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is not one of {NONFINITE_POLICIES}")
        self.on_nonfinite = on_nonfinite
        self.policy = policy.train()  # from_pretrained returns eval mode; Lightning keeps modes as found
        self.optimizer_factory = optimizer
        self.warmup_ratio = warmup_ratio
        self.logprob_chunk_size = logprob_chunk_size
        if gradient_checkpointing:
            policy.gradient_checkpointing_enable()
            policy.config.use_cache = False
        self.means = nn.ModuleDict({k: MeanMetric() for k in self.metric_names})
        self.skipped = SumMetric()
        self.tokens = SumMetric()
        for metric in self._round_metrics():
            metric.persistent(True)  # a resumed round's summary still covers the whole round
        # Set by SelfPlayCallback.begin_round; these defaults serve a bare training step.
        self.round_index, self.lam, self.round_lr = 0, lam, None
        self.round_start_step, self.round_total_steps = 0, 1
        self._batch_started = 0.0

    def _round_metrics(self) -> list:
        return [*self.means.values(), self.skipped, self.tokens]

    def objective(self, batch: dict) -> dict[str, torch.Tensor]:
        """The loss and the per-example values of `metric_names` on one batch."""
        raise NotImplementedError

    # -- rounds -----------------------------------------------------------------------------
    def begin_round(self, index: int, lam: float, lr: float, start_step: int, total_steps: int, fresh: bool):
        """Called at each round's start (and again on resume, with fresh=False)."""
        self.round_index, self.lam, self.round_lr = index, lam, lr
        self.round_start_step, self.round_total_steps = start_step, max(1, total_steps)
        if fresh:
            for metric in self._round_metrics():
                metric.reset()

    def round_means(self) -> dict[str, float]:
        means = {k: float(m.compute()) for k, m in self.means.items() if m.update_called}
        means["skipped_batches"] = int(self.skipped.compute()) if self.skipped.update_called else 0
        means["train_tokens"] = int(self.tokens.compute()) if self.tokens.update_called else 0
        return means

    # -- log-probs --------------------------------------------------------------------------
    def sequence_logps(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, synthetic) summed response log-probs of a collated pair batch (padded [2B, T] or packed)."""
        return self.response_logps(model, batch).chunk(2)

    def response_logps(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Summed response log-prob of every sequence of a collated batch, [rows]."""
        inputs = {"input_ids": batch["input_ids"], "use_cache": False}
        if "sequence_ids" in batch:  # packed rows: no mask, the restarts in position_ids separate sequences
            inputs["position_ids"] = batch["position_ids"]
        else:
            inputs["attention_mask"] = batch["attention_mask"]
        sequence_ids = batch.get("sequence_ids")
        if self.logprob_chunk_size:
            # Logits are the output layer applied to the decoder's last hidden state (no bias,
            # no soft-capping), so the vocabulary projection can run chunk by chunk.
            hidden = model.get_decoder()(**inputs).last_hidden_state
            weight = model.get_output_embeddings().weight
            return chunked_sequence_logps(
                hidden, weight, batch["labels"], self.logprob_chunk_size, sequence_ids
            )
        return sequence_logps(model(**inputs).logits, batch["labels"], sequence_ids)

    @torch.no_grad()
    def score_opponent(self, loader, desc: str = "opponent log-probs") -> torch.Tensor:
        """[N, 2] log-probs of every pair under the current weights (= this round's opponent)."""
        from tqdm.auto import tqdm

        was_training = self.policy.training
        self.policy.eval()
        out = torch.zeros(len(loader.dataset), 2)
        try:
            for batch in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                real, synthetic = self.sequence_logps(self.policy, batch)
                out[batch["index"].cpu()] = torch.stack([real, synthetic], -1).float().cpu()
        finally:
            self.policy.train(was_training)
        return out

    # -- training ---------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        if self.round_lr is not None:
            step = self.global_step - self.round_start_step
            lr = self.round_lr * warmup_linear_decay(step, self.round_total_steps, self.warmup_ratio)
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = lr
        self._batch_started = time.perf_counter()

    def _nonfinite(self, what: str) -> None:
        where = f"round {self.round_index}, step {self.global_step}"
        if self.on_nonfinite == "stop":
            raise NonFiniteError(
                f"{where}: the {what} is not finite (NaN or inf). The run stops here; the last good "
                "checkpoint is kept. Lower the learning rate or lam, check the data, or set "
                "module.on_nonfinite=skip to skip such batches (they are counted)."
            )
        log.warning("%s: non-finite %s, batch skipped (module.on_nonfinite=skip)", where, what)
        self.skipped.update(1.0)
        self.log("train/skipped_batches", self.skipped.compute(), batch_size=1)

    def training_step(self, batch, batch_idx):
        out = self.objective(batch)
        # Every process must agree, or one would skip a step the others take.
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(out["loss"])), all=True)
        if not finite:
            self._nonfinite("loss")
            return None
        log.debug("round %d step %d", self.round_index, self.global_step)
        pairs = len(batch["index"])
        for name in self.metric_names:
            value = out[name].detach()
            self.means[name].update(value)
            self.log(f"train/{name}", value.float().mean(), batch_size=pairs, sync_dist=True)
        self.log("round", float(self.round_index), batch_size=pairs)
        self.log("train/lam", float(self.lam), batch_size=pairs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=pairs)
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        seconds = time.perf_counter() - self._batch_started
        tokens = float(batch_tokens(batch))
        self.tokens.update(tokens)
        self.log("perf/tokens_per_s", tokens / max(seconds, 1e-9), batch_size=1, sync_dist=False)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        local = all(bool(torch.isfinite(g).all()) for g in grads)
        if not self.trainer.strategy.reduce_boolean_decision(local, all=True):
            self._nonfinite("gradient")
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are not updated

    def configure_optimizers(self):
        return self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])


class SPINModule(PolicyModule):
    metric_names = METRICS
    self_play = True

    def __init__(
        self,
        policy: nn.Module,
        loss: Callable[[torch.Tensor], torch.Tensor],
        optimizer: Callable,
        lam: float = 0.1,
        opponent: str = "cached",
        warmup_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int | None = 1024,
        on_nonfinite: str = "stop",
    ):
        if opponent not in OPPONENT_MODES:
            raise ValueError(f"opponent={opponent!r} is not one of {OPPONENT_MODES}")
        super().__init__(
            policy, optimizer, lam, warmup_ratio, gradient_checkpointing, logprob_chunk_size, on_nonfinite
        )
        self.loss_fn = loss
        self.opponent_mode = opponent
        self.opponent = None
        if opponent == "model":
            self.opponent = copy.deepcopy(policy).requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.opponent is not None:
            self.opponent.eval()  # frozen for the round: no dropout, ever
        return self

    def begin_round(self, index: int, lam: float, lr: float, start_step: int, total_steps: int, fresh: bool):
        super().begin_round(index, lam, lr, start_step, total_steps, fresh)
        if fresh and self.opponent is not None:
            self.opponent.load_state_dict(self.policy.state_dict())

    def forward_pairs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The SPIN objective on one batch (Eq. 4.7); returns per-pair tensors and the loss."""
        logp_real, logp_synthetic = self.sequence_logps(self.policy, batch)
        if self.opponent is not None:
            with torch.no_grad():
                opp_real, opp_synthetic = self.sequence_logps(self.opponent, batch)
        elif "opponent_logps" in batch:
            opp_real, opp_synthetic = batch["opponent_logps"].to(logp_real.dtype).unbind(-1)
        else:
            raise RuntimeError("opponent='cached' but the batch carries no opponent log-probs")
        reward_real = self.lam * (logp_real - opp_real)
        reward_synthetic = self.lam * (logp_synthetic - opp_synthetic)
        margin = reward_real - reward_synthetic
        return {
            "loss": self.loss_fn(margin).mean(),
            "margin": margin,
            "accuracy": (margin > 0).float(),
            "reward_real": reward_real,
            "reward_synthetic": reward_synthetic,
            "logp_real": logp_real,
            "logp_synthetic": logp_synthetic,
        }

    objective = forward_pairs


class SFTModule(PolicyModule):
    """Supervised fine-tuning on the real responses: the weak starting model and the control.

    The loss is the mean negative log-likelihood per response token (prompt masked, EOS
    counted), the usual SFT objective. `lam` only scales the held-out SPIN margin that the
    evaluator reports, so SFT and SPIN runs are compared on the same numbers.
    """

    metric_names = SFT_METRICS

    def objective(self, batch: dict) -> dict[str, torch.Tensor]:
        logp_real = self.response_logps(self.policy, batch)
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return {"loss": -logp_real.sum() / tokens.clamp(min=1), "logp_real": logp_real}
