"""PolicyModule: the policy (θ_t+1, trained) under the run's objective (spinlab.objectives, the
config group `objective`: SPIN by default, T-SPIN, or SFT), against the opponent (θ_t, frozen)
where the objective uses one.

The policy lives inside a ResponseScorer, the one module through which every log-prob of a run is
computed, and which FSDP2 shards layer by layer under trainer=fsdp / fsdp_cpu. The opponent enters
the loss only through its log-probs of each pair's real and synthetic response, and only for
objectives that use it (SPIN; T-SPIN has no reference, SFT trains on the real responses alone).
With `opponent="cached"` (the default) they are computed once at the round's start from the
policy's weights at that moment (exact, because the opponent is frozen for the whole round) and
arrive in the batch; with `opponent="model"` a frozen copy of the policy scores every batch. Both
give the same loss.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn
from torch.distributed import ReduceOp
from torchmetrics import MeanMetric, SumMetric

from spinlab.errors import ConfigError
from spinlab.logprobs import (
    IGNORE_INDEX,
    chunked_sequence_logps,
    chunked_token_logps,
    sequence_logps,
    token_logps,
)
from spinlab.objectives import Objective
from spinlab.rounds import Round
from spinlab.steps import StepRecord

log = logging.getLogger(__name__)

OPPONENT_MODES = ("cached", "model")


def warmup_linear_decay(step: int, total_steps: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warm-up over warmup_ratio of the round, then linear decay to 0."""
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


# Response tokens per output-layer chunk under logprob_chunk_size="auto", by device type. Small
# chunks bound memory where it is scarce (CPU RAM); on a GPU each chunk is a kernel launch, so
# larger chunks keep the device busy (benchmarks/README.md, "Results on one H200").
AUTO_CHUNK_SIZE = {"cpu": 256, "cuda": 4096}
# compile_layers="auto", by device type: on where the measured step time pays for compiling.
AUTO_COMPILE = {"cpu": False, "cuda": True}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated decoder blocks: the classes it names in `_no_split_modules`."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in layer_classes]


def compile_decoder_layers(model: nn.Module) -> int:
    """torch.compile each decoder layer's forward for the cache-free passes (training, opponent
    and evaluation scoring); a forward with a KV cache (generation) stays eager, so generation
    backends keep their own graphs and no cache object reaches the compiler. Per layer rather than
    the whole model, so it composes with FSDP2's per-layer sharding. Returns the layer count."""
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "_spinlab_compiled", False):
            continue
        eager = layer.forward
        compiled = torch.compile(eager)

        def forward(*args, _eager=eager, _compiled=compiled, **kwargs):
            # transformers 5.24 passes the KV cache as `cache`, earlier releases as `past_key_values`
            cached = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
            use = _eager if cached else _compiled
            return use(*args, **kwargs)

        layer.forward = forward
        layer._spinlab_compiled = True
    return len(layers)


def apply_liger_kernels(model: nn.Module) -> None:
    """Liger's Triton kernels for RMSNorm, RoPE and SwiGLU in the policy (optional extra `liger`).
    The output layer stays ours (chunked log-probs), so Liger's fused cross-entropy is off."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        import liger_kernel.transformers as liger
    except ImportError as err:
        raise ImportError(
            f"module.liger_kernels=true needs liger-kernel, which failed to import ({err}). Install "
            "the extra on a machine with CUDA and triton: pip install -e '.[liger]'; or set "
            "module.liger_kernels=false"
        ) from err
    apply = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if apply is None:
        raise ValueError(
            f"module.liger_kernels=true: liger-kernel has no kernels for model type {model_type!r}; "
            "set module.liger_kernels=false"
        )
    apply(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model,
    )


def output_head(model: nn.Module) -> dict | None:
    """What the model does after its decoder, as `spinlab.logprobs.output_logits` applies it: the
    output layer's weight and bias, and the family's logit scale and final soft-cap, read from its
    config (Cohere's `logit_scale`, Granite's `logits_scaling`, Gemma-2/3's
    `final_logit_softcapping`). None where the output layer is not a linear map of the decoder's
    last hidden state that spinlab can apply itself."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return None
    config = model.config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return {"weight": head.weight, "bias": head.bias, "scale": scale, "softcap": softcap}


# Largest difference allowed between a response token's log-prob through the chunked output layer
# and through the model's own logits, per unit of logit magnitude, by compute dtype. The two paths
# run the same matmul in chunks of other shapes, so they differ by rounding alone: a few units in
# the last place of the largest logit.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2**-6, torch.float16: 2**-8}
CHECK_TOKENS = 128  # response tokens compared in the check


class ResponseScorer(nn.Module):
    """Summed response log-prob of every sequence of a collated batch (padded [rows, T] or packed).

    Every log-prob of a run goes through this module's forward: training, opponent scoring and
    evaluation alike. Under sharding it is the FSDP root, so the embeddings and the output layer
    are gathered for the whole forward, including the chunked output-layer pass below.

    The chunked path applies the output layer itself (`output_head`), so once, on the first
    batch, it is compared with the model's own logits: a family whose output path spinlab does not
    reproduce falls back to the full logits, with a warning that names the model class, instead
    of being silently wrong.
    """

    def __init__(self, model: nn.Module, chunk_size: int | str | None = 256):
        super().__init__()
        if (
            chunk_size is not None
            and chunk_size != "auto"
            and (not isinstance(chunk_size, int) or chunk_size < 1)
        ):
            raise ValueError(
                f"module.logprob_chunk_size must be a positive int, 'auto' or null, got {chunk_size!r}"
            )
        self.model = model
        self.chunk_size = chunk_size
        # None until the first chunked forward has compared both paths; then whether they agree,
        # and by how much they differed against what rounding allows (`check`).
        self.chunked_matches: bool | None = None if output_head(model) is not None else False
        self.check: dict[str, float] = {}
        if self.chunked_matches is False and chunk_size is not None:
            log.info(
                "%s: its output layer is not a linear map spinlab applies itself; log-probs come from "
                "the full logits (module.logprob_chunk_size has no effect)",
                type(model).__name__,
            )

    def forward(self, batch: dict) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "use_cache": False}
        if "sequence_ids" in batch:  # packed rows: no mask, the restarts in position_ids separate sequences
            inputs["position_ids"] = batch["position_ids"]
        elif not batch.get("padding_at_end"):
            inputs["attention_mask"] = batch["attention_mask"]
        # else: padding only after each row's last real token (collate's batches) needs no mask, as
        # causal attention never lets a real token see it and it is never scored. Given a mask,
        # transformers reads it on the host (twice a forward) to pick the attention kernel, and
        # with padding present picks one that takes the mask instead of plain causal attention.
        sequence_ids = batch.get("sequence_ids")
        # collate's host-side target positions and sequence count, so nothing here waits for the device
        positions = (batch["target_rows"], batch["target_cols"]) if "target_rows" in batch else None
        where = {"positions": positions, "num_sequences": batch.get("num_sequences")}
        chunk_size = self.chunk_size
        if chunk_size == "auto":
            chunk_size = AUTO_CHUNK_SIZE.get(batch["input_ids"].device.type, AUTO_CHUNK_SIZE["cuda"])
        if chunk_size and self.chunked_matches is None:
            self.chunked_matches = self.check_chunked(inputs, batch["labels"], chunk_size)
        if chunk_size and self.chunked_matches:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state
            head = output_head(self.model)
            weight = head.pop("weight")
            return chunked_sequence_logps(
                hidden, weight, batch["labels"], chunk_size, sequence_ids, **where, **head
            )
        return sequence_logps(self.model(**inputs).logits, batch["labels"], sequence_ids, **where)

    @torch.no_grad()
    def check_chunked(self, inputs: dict, labels: torch.Tensor, chunk_size: int) -> bool:
        """Compare the chunked path's token log-probs with log_softmax of the model's own logits on
        the first row with a response (its first CHECK_TOKENS response tokens), in eval mode so
        that dropout draws no difference. Every process runs the same passes (a sharded model needs
        all of them in each) and all take the same verdict."""
        scored = (labels[:, 1:] != IGNORE_INDEX).nonzero()
        row, first = scored[0].tolist() if len(scored) else (0, 0)
        cut = min(labels.shape[1], first + CHECK_TOKENS + 1)
        small = {k: v[row : row + 1, :cut] if torch.is_tensor(v) else v for k, v in inputs.items()}
        small_labels = labels[row : row + 1, :cut]
        training = self.model.training
        self.model.eval()
        try:
            logits = self.model(**small).logits
            hidden = self.model.get_decoder()(**small).last_hidden_state
        finally:
            self.model.train(training)
        own = token_logps(logits, small_labels)
        head = output_head(self.model)
        ours, (rows, cols) = chunked_token_logps(hidden, labels=small_labels, chunk_size=chunk_size, **head)
        device = logits.device.type
        dtype = (
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head["weight"].dtype
        )
        worst = float((ours - own[rows, cols]).abs().max()) if len(ours) else 0.0
        allowed = CHECK_TOLERANCE.get(dtype, 2**-6) * (1.0 + float(logits.abs().max()))
        matches = worst <= allowed
        self.check = {"difference": worst, "allowed": allowed}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(matches)], device=labels.device)
            torch.distributed.all_reduce(flag, op=ReduceOp.MIN)
            matches = bool(flag.item())
        name = type(self.model).__name__
        if matches:
            log.info("%s: chunked log-probs equal the model's own (largest difference %.2g)", name, worst)
        else:
            log.warning(
                "%s: log-probs through the chunked output layer differ from the model's own logits (by "
                "up to %.3g, allowed %.3g): its output path does something spinlab does not apply. "
                "Log-probs come from the full logits instead (as with module.logprob_chunk_size=null).",
                name,
                worst,
                allowed,
            )
        return matches


def shard(scorer: ResponseScorer, mesh, mp_policy) -> None:
    """FSDP2: every decoder layer (the classes the model names in `_no_split_modules`), then the root."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(scorer.model)
    if not layers:
        raise ConfigError(
            f"{type(scorer.model).__name__} names no decoder layer classes (_no_split_modules): "
            "cannot shard it layer by layer"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(scorer, mesh=mesh, mp_policy=mp_policy)


class RoundSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Each round's learning rate: linear warm-up over warmup_ratio of its steps, then linear decay
    to 0, peaking at the round's lr. Steps with the optimizer; `refresh` re-reads the round at each
    epoch start, where a new round may have begun."""

    def __init__(self, optimizer, module: PolicyModule):
        self.module = module
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        rnd = self.module.round
        if rnd is None:
            return [group["lr"] for group in self.optimizer.param_groups]
        factor = warmup_linear_decay(
            self.last_epoch - rnd.start_step, rnd.total_steps, self.module.warmup_ratio
        )
        return [rnd.lr * factor for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "module"}

    def refresh(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class PolicyModule(L.LightningModule):
    """The policy, its optimizer and per-round schedule, response log-probs, the opponent,
    sharding and the per-round metric means. The objective turns per-kind log-probs (and the
    opponent's, when it uses them) into the loss and the metrics; what the host learns of each
    step (finiteness, the metrics the loggers get) is `steps`' (spinlab.steps)."""

    def __init__(
        self,
        *,
        policy: nn.Module,
        objective: Objective,
        optimizer: Callable | None = None,
        opponent: str = "cached",
        lam: float = 0.1,
        warmup_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int | str | None = 256,
        on_nonfinite: str = "stop",
        gather_for_generation: bool = True,
        compile_layers: bool | str = False,
        liger_kernels: bool = False,
        sync_every_step: bool = False,
    ):
        if opponent not in OPPONENT_MODES:
            raise ValueError(f"opponent={opponent!r} is not one of {OPPONENT_MODES}")
        if opponent == "model" and not objective.needs_opponent:
            raise ValueError(
                f"opponent=model keeps a frozen copy of the policy, but {type(objective).__name__} uses "
                "no opponent log-probs: leave opponent=cached (nothing is cached for it)"
            )
        super().__init__()
        # Sharded runs: decode on the full weights gathered once (fast; needs the whole model's
        # memory on every device), or on the shards with every process stepping in lockstep.
        self.gather_for_generation = gather_for_generation
        self.objective = objective
        self.optimizer_factory = optimizer
        self.warmup_ratio = warmup_ratio
        self.default_lam = lam
        if gradient_checkpointing:
            policy.gradient_checkpointing_enable()
            policy.config.use_cache = False
        if liger_kernels:
            apply_liger_kernels(policy)
        if compile_layers not in (True, False, "auto"):
            raise ValueError(f"module.compile_layers must be true, false or auto, got {compile_layers!r}")
        # Applied in configure_model, once the device is known and every scorer (the opponent's
        # copy too) exists.
        self.compile_layers = compile_layers
        # from_pretrained returns eval mode; Lightning keeps modes as found
        self.scorer = ResponseScorer(policy.train(), logprob_chunk_size)
        # nan_strategy="disable": the default checks each update for NaN on the host (a wait for
        # the device); non-finite steps are caught by the module's own check instead.
        nan = {} if sync_every_step else {"nan_strategy": "disable"}
        self.means = nn.ModuleDict({k: MeanMetric(**nan) for k in objective.metric_names})
        self.skipped = SumMetric()
        self.tokens = SumMetric(**nan)
        for metric in self._round_metrics():
            metric.persistent(True)  # a resumed round's summary still covers the whole round
        self.round: Round | None = None  # owned by SelfPlayCallback, read here
        self.steps = StepRecord(self, on_nonfinite, sync_every_step)
        self.opponent_scorer = None
        if opponent == "model":
            self.opponent_scorer = copy.deepcopy(self.scorer).requires_grad_(False).eval()

    @property
    def policy(self) -> nn.Module:
        return self.scorer.model

    @property
    def lam(self) -> float:
        return self.round.lam if self.round is not None else self.default_lam

    @property
    def round_index(self) -> int:
        return self.round.index if self.round is not None else 0

    @property
    def sharded(self) -> bool:
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.scorer, FSDPModule)

    def _round_metrics(self) -> list:
        return [*self.means.values(), self.skipped, self.tokens]

    @property
    def opponent(self) -> nn.Module | None:
        return None if self.opponent_scorer is None else self.opponent_scorer.model

    def scorers(self) -> list[ResponseScorer]:
        return [self.scorer] + ([self.opponent_scorer] if self.opponent_scorer is not None else [])

    def train(self, mode: bool = True):
        super().train(mode)
        if self.opponent_scorer is not None:
            self.opponent_scorer.eval()  # frozen for the round: no dropout, ever
        return self

    # -- sharding ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        compile_layers = self.compile_layers
        if compile_layers == "auto":
            compile_layers = AUTO_COMPILE.get(self.device.type, False)
        if compile_layers:
            for scorer in self.scorers():
                compile_decoder_layers(scorer.model)
        mesh = self.device_mesh  # set by ModelParallelStrategy (trainer=fsdp, fsdp_cpu) only
        if mesh is None or self.sharded:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if type(self.policy).__name__.startswith("Peft"):
            raise ValueError(
                "model.lora with a sharded trainer (fsdp, fsdp_cpu) is not supported: LoRA keeps the "
                "weights frozen, so train it with trainer=cpu/gpu/ddp_cpu, or drop model.lora to shard"
            )
        mp_policy = MixedPrecisionPolicy()
        if str(self.trainer.precision).startswith("bf16"):
            # bf16 compute, fp32 master weights, fp32 gradient reduction
            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for scorer in self.scorers():
            shard(scorer, mesh["data_parallel"], mp_policy)

    @contextmanager
    def gathered_weights(self, root_only: bool = False):
        """The policy's full weights on every process for a whole phase (one all-gather, freed
        after), so that each process can decode its own prompts at its own pace. root_only: only
        the root's (embeddings, output layer), for decoding in lockstep on the sharded layers."""
        from torch.distributed.fsdp import FSDPModule

        if not self.sharded:
            yield
            return
        self.scorer._get_fsdp_state()._lazy_init()  # the root must be known before any layer runs alone
        modules = [m for m in self.scorer.modules() if isinstance(m, FSDPModule)]
        modules = [self.scorer] if root_only else modules
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in modules:
                m.reshard()
                # the root keeps its parameters between forward and backward; layers reshard
                m.set_reshard_after_forward(m is not self.scorer, recurse=False)

    def full_state_dict(self) -> dict | None:
        """The policy's full state dict on rank 0 (None elsewhere) when sharded; None unsharded
        (save_pretrained then reads the model itself)."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.scorer, options=options)
        if not self.trainer.is_global_zero:
            return None
        state = {k.removeprefix("model."): v for k, v in state.items()}
        # Gathered, tied weights are two copies; the saved model keeps one, as save_pretrained does.
        tied = getattr(self.policy, "all_tied_weights_keys", None) or {}
        return {k: v for k, v in state.items() if k not in tied}

    # -- rounds -----------------------------------------------------------------------------
    def begin_round(self, rnd: Round, fresh: bool) -> None:
        """Called at each round's start (and again on resume, with fresh=False)."""
        self.round = rnd
        if fresh:
            for metric in self._round_metrics():
                metric.reset()
            if self.opponent_scorer is not None:  # the opponent of a round is the policy at its start
                self.opponent_scorer.load_state_dict(self.scorer.state_dict())

    def round_means(self) -> dict[str, float]:
        means = {k: float(m.compute()) for k, m in self.means.items() if m.update_called}
        means["skipped_batches"] = int(self.skipped.compute()) if self.skipped.update_called else 0
        means["train_tokens"] = int(self.tokens.compute()) if self.tokens.update_called else 0
        return means

    @property
    def round_objective(self) -> Objective:
        """The objective with this round's constants (Objective.at_round)."""
        return self.objective.at_round(self.round_index)

    # -- log-probs --------------------------------------------------------------------------
    def policy_logps(self, batch: dict) -> dict[str, torch.Tensor]:
        """The policy's summed log-probs of each kind of response in the batch (collate stacks the
        kinds in the objective's order), and under "tokens" the batch's count of scored tokens."""
        logps = self.scorer(batch)
        kinds = self.objective.kinds
        if logps.shape[0] % len(kinds):
            raise ValueError(
                f"a batch of {logps.shape[0]} sequences does not split into the {len(kinds)} kinds "
                f"{kinds} that {type(self.objective).__name__} needs: the pair builder (config group "
                "`pairs`) must provide them"
            )
        out = dict(zip(kinds, logps.chunk(len(kinds)), strict=True))
        out["tokens"] = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return out

    # -- training ---------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.steps.start()

    def on_train_epoch_start(self) -> None:
        self.lr_schedulers().refresh()  # the round (and its lr) may have changed since the last step
        self.steps.reset_window()  # a logging window never spans two epochs (or two rounds)

    def on_train_batch_start(self, batch, batch_idx):
        self.steps.batch_started()

    def loss_and_metrics(self, batch: dict) -> dict[str, torch.Tensor]:
        """The objective on one batch (SPIN: Eq. 4.7); per-pair tensors and the loss."""
        policy = self.policy_logps(batch)
        if not self.objective.needs_opponent:
            return self.round_objective(policy, None, self.lam)
        if self.opponent_scorer is not None:
            with torch.no_grad():
                real, synthetic = self.opponent_scorer(batch).chunk(2)
        elif "opponent_logps" in batch:
            real, synthetic = batch["opponent_logps"].to(policy["real"].dtype).unbind(-1)
        else:
            raise RuntimeError("opponent='cached' but the batch carries no opponent log-probs")
        return self.round_objective(policy, {"real": real, "synthetic": synthetic}, self.lam)

    def training_step(self, batch, batch_idx):
        out = self.loss_and_metrics(batch)
        if not self.steps.after_loss(batch, out):
            return None  # a skipped step (module.on_nonfinite=skip): no backward, no update
        log.debug("round %d step %d", self.round_index, self.global_step)
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.steps.after_batch(batch)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.steps.before_optimizer_step(optimizer)

    def check_finite(self) -> None:
        """Raise NonFiniteError if a step since the last check had a non-finite loss or gradient.
        Called before every checkpoint and Hugging Face save, so a non-finite update is never saved."""
        self.steps.check()

    def on_train_end(self) -> None:
        self.check_finite()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # a non-finite update is never saved

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": RoundSchedule(optimizer, self), "interval": "step"},
        }
