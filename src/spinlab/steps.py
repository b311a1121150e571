"""What the host learns of each training step, and when: whether its loss and gradients were
finite, and the metrics the loggers get. PolicyModule owns one StepRecord and calls it from its
training hooks.

With sync_every_step=False (the default) a training step never waits for the device: the
finiteness of each step's loss and gradients is kept on the device (the first bad step, a min over
steps), the metrics are summed there, and the host reads both once per logging window
(trainer.log_every_n_steps steps), at each epoch's end and before any checkpoint is written.
on_nonfinite=skip must decide before each optimizer step, so it reads one flag per step. With
sync_every_step=True the host reads the finiteness vote and the metrics after every step (the
behaviour before windows, kept to measure against).
"""

from __future__ import annotations

import logging
import time

import torch
from torch.distributed import ReduceOp

from spinlab import lightning_compat
from spinlab.data import batch_tokens

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("stop", "skip")
_NO_STEP = 2**62  # "no bad step yet": above any step index, exact in float64
_STOP_ADVICE = (
    "The run stops here; the last good checkpoint is kept. Lower the learning rate or lam, check the "
    "data, or set module.on_nonfinite=skip to skip such batches (they are counted)."
)


class NonFiniteError(FloatingPointError):
    """A NaN or infinite loss or gradient; the last good checkpoint is kept."""


class StepRecord:
    """The finiteness record and the metric window of a PolicyModule's training steps. The
    round's metric means, skipped batches and tokens stay the module's (they are in its
    checkpoint); this updates them."""

    def __init__(self, module, on_nonfinite: str = "stop", sync_every_step: bool = False):
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is not one of {NONFINITE_POLICIES}")
        self.module = module
        self.on_nonfinite = on_nonfinite
        self.sync_every_step = sync_every_step
        self._batch_started = 0.0
        self._last_settings: dict[str, float] = {}
        self._first_bad: dict[str, torch.Tensor] = {}
        self._unchecked = False  # steps ran since the host last read the finiteness record
        self.reset_window()

    # -- the module's hooks -------------------------------------------------------------------
    def start(self) -> None:
        """At the fit's start: no bad step yet."""
        self._first_bad = {k: self._no_step() for k in ("loss", "gradient")}
        self._unchecked = False

    def batch_started(self) -> None:
        self._batch_started = time.perf_counter()
        if self._window_started is None:
            self._window_started = self._batch_started

    def after_loss(self, batch: dict, out: dict[str, torch.Tensor]) -> bool:
        """Record a step's loss and metrics; False when the step is skipped (sync_every_step with
        on_nonfinite=skip, a non-finite loss)."""
        if self.sync_every_step:
            return self._synced_step(batch, out)
        # Read now: by on_train_batch_end the scheduler has already set the next step's rate.
        self._last_settings = self._step_settings()
        names = self.module.objective.metric_names
        step = {
            "values": torch.stack([out[n].detach().float().mean() for n in names]),
            "per_pair": {n: out[n].detach() for n in names},
            "pairs": len(batch["index"]),
        }
        finite = torch.isfinite(out["loss"].detach())
        if self.on_nonfinite == "skip":
            # Kept until the step's one synchronisation says whether the update is applied.
            self._pending.append(step)
            self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        else:
            self._note_bad("loss", ~finite)
            self._add_to_window(step)
        return True

    def _synced_step(self, batch: dict, out: dict[str, torch.Tensor]) -> bool:
        module = self.module
        names = module.objective.metric_names
        # One collective per step: the finiteness vote and the metrics' means across processes.
        local = torch.stack(
            [torch.isfinite(out["loss"]).float()] + [out[n].detach().float().mean() for n in names]
        )
        reduced = (
            module.trainer.strategy.reduce(local, reduce_op="mean")
            if module.trainer.world_size > 1
            else local
        )
        values = reduced.tolist()  # the step's one host synchronisation
        if values[0] < 1.0:  # every process must agree, or one would skip a step the others take
            self._nonfinite("loss")
            return False
        pairs = len(batch["index"])
        for name in names:
            module.means[name].update(out[name].detach())
        module.log_dict(
            {f"train/{n}": v for n, v in zip(names, values[1:], strict=True)} | self._step_settings(),
            batch_size=pairs,
        )
        return True

    def after_batch(self, batch: dict) -> None:
        """The batch's tokens; the window's metrics when Lightning logs this step."""
        module = self.module
        tokens = batch_tokens(batch, wait=self.sync_every_step)
        if self.sync_every_step:
            seconds = time.perf_counter() - self._batch_started
            module.tokens.update(float(tokens))
            module.log("perf/tokens_per_s", tokens / max(seconds, 1e-9), batch_size=1)
            return
        # A fill with a host number: no copy from the host, so no wait for the device either.
        count = tokens.float() if torch.is_tensor(tokens) else torch.full((), tokens, device=module.device)
        module.tokens.update(count)
        self._window_tokens += tokens
        # Lightning writes a step's metrics to the loggers on these steps only (and at a stop).
        if lightning_compat.is_logging_step(module.trainer):
            self._log_window()

    def before_optimizer_step(self, optimizer) -> None:
        """The gradients' finiteness: recorded (stop), or decided now (skip, or sync_every_step),
        a skipped step's gradients cleared so that the optimizer leaves the weights as they are."""
        module = self.module
        grads = [p.grad for p in module.policy.parameters() if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # sharded: this rank's part
        if self.sync_every_step:
            # One fused norm over all gradients: a single host synchronisation, not one per tensor.
            local = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()) if grads else True
            if not module.trainer.strategy.reduce_boolean_decision(local, all=True):
                self._nonfinite("gradient")
                optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are not updated
            return
        finite = (
            torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
            if grads
            else torch.ones((), dtype=torch.bool, device=module.device)
        )
        if self.on_nonfinite == "stop":
            self._note_bad("gradient", ~finite)
            return
        loss_finite = self._loss_finite if self._loss_finite is not None else torch.ones_like(finite)
        verdict = self._all_reduce(torch.stack([loss_finite, finite]).int(), ReduceOp.MIN)
        loss_ok, grads_ok = verdict.tolist()  # skip: the step's one host synchronisation
        pending, self._pending, self._loss_finite = self._pending, [], None
        if not (loss_ok and grads_ok):
            self._nonfinite("loss" if not loss_ok else "gradient")
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are not updated
            return
        for step in pending:
            self._add_to_window(step)

    def check(self) -> None:
        """Raise NonFiniteError if a step since the last check had a non-finite loss or gradient
        (module.on_nonfinite=stop, sync_every_step=false): one host synchronisation, none when no
        step ran since."""
        if self.sync_every_step or not self._unchecked:
            return
        self._raise_if_bad(self._first_bad_across_processes().tolist())

    # -- the record ---------------------------------------------------------------------------
    def _nonfinite(self, what: str) -> None:
        module = self.module
        where = f"round {module.round_index}, step {module.global_step}"
        if self.on_nonfinite == "stop":
            raise NonFiniteError(f"{where}: the {what} is not finite (NaN or inf). {_STOP_ADVICE}")
        log.warning("%s: non-finite %s, batch skipped (module.on_nonfinite=skip)", where, what)
        module.skipped.update(1.0)
        module.log("train/skipped_batches", module.skipped.compute(), batch_size=1)

    def _step_settings(self) -> dict[str, float]:
        module = self.module
        return {
            "round": float(module.round_index),
            "train/lam": float(module.lam),
            "train/lr": module.trainer.optimizers[0].param_groups[0]["lr"],
        }

    def _no_step(self) -> torch.Tensor:
        return torch.full((), _NO_STEP, dtype=torch.long, device=self.module.device)

    def reset_window(self) -> None:
        """A new logging window: at each epoch's start, so that none spans two epochs (or rounds)."""
        self._window_sums: torch.Tensor | None = None  # per metric, summed over the window's steps
        self._window_steps = 0
        self._window_pairs = 0
        self._window_tokens = 0
        self._window_started: float | None = None
        self._pending: list[dict] = []
        self._loss_finite: torch.Tensor | None = None

    def _note_bad(self, what: str, bad: torch.Tensor) -> None:
        step = torch.where(bad, self.module.global_step, _NO_STEP)
        self._first_bad[what] = torch.minimum(self._first_bad[what], step)
        self._unchecked = True

    def _add_to_window(self, step: dict) -> None:
        values = step["values"]
        self._window_sums = values if self._window_sums is None else self._window_sums + values
        self._window_steps += 1
        self._window_pairs += step["pairs"]
        for name, value in step["per_pair"].items():
            self.module.means[name].update(value)

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        # torch.distributed directly: Lightning's strategy.reduce adds a barrier, which waits for the device
        if self.module.trainer.world_size > 1:
            torch.distributed.all_reduce(tensor, op=op)
        return tensor

    def _first_bad_across_processes(self) -> torch.Tensor:
        return self._all_reduce(
            torch.stack([self._first_bad["loss"], self._first_bad["gradient"]]), ReduceOp.MIN
        )

    def _raise_if_bad(self, first_bad: list) -> None:
        self._unchecked = False
        loss_step, gradient_step = (int(x) for x in first_bad)
        step = min(loss_step, gradient_step)
        if step >= _NO_STEP:
            return
        what = "loss" if loss_step <= gradient_step else "gradient"
        module = self.module
        raise NonFiniteError(
            f"round {module.round_index}, step {step}: the {what} is not finite (NaN or inf); noticed after "
            f"step {module.global_step - 1} (module.sync_every_step=false checks every "
            f"trainer.log_every_n_steps={module.trainer.log_every_n_steps} steps and before every save). "
            f"{_STOP_ADVICE}"
        )

    def _log_window(self) -> None:
        """The window's metric means and token rate to the loggers, and the finiteness check."""
        module = self.module
        names = module.objective.metric_names
        first_bad = self._first_bad_across_processes().double()
        sums = self._window_sums if self._window_sums is not None else first_bad.new_zeros(len(names))
        sums = self._all_reduce(sums.double(), ReduceOp.SUM)
        values = torch.cat([first_bad, sums]).tolist()  # the window's one host synchronisation
        self._raise_if_bad(values[:2])
        seconds = time.perf_counter() - self._window_started  # the device has caught up by now
        metrics = {"perf/tokens_per_s": float(self._window_tokens) / max(seconds, 1e-9)}
        if self._window_steps:
            steps = self._window_steps * module.trainer.world_size
            metrics |= {f"train/{n}": v / steps for n, v in zip(names, values[2:], strict=True)}
        module.log_dict(metrics | self._last_settings, batch_size=max(1, self._window_pairs))
        self.reset_window()
