"""`generation=static`: a fixed-size KV cache per batch shape and spinlab's own decode loop.

The decode step (forward, sampling, finished mask) reads and writes static tensors only, so on a
GPU it is captured in a CUDA graph and replayed. Each prompt's random numbers come from a
counter-based hash of (seed, round, prompt index, step), so they do not depend on the prompt's
batch: a resumed phase, or one on another number of processes, yields the same text. Models or
generation settings the loop cannot stand in for are decoded with transformers' `generate` over
its static cache instead, with a log line saying why.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import time
from collections.abc import Mapping, Sequence

import torch
from transformers import GenerationConfig

from spinlab.errors import ConfigError
from spinlab.generation.base import Generator, Phase, left_pad
from spinlab.generation.hf import HFGenerator

log = logging.getLogger(__name__)


class StaticCacheGenerator(HFGenerator):
    """A fixed-size KV cache per batch shape, decoded by spinlab's own loop (`loop: spinlab`).

    The cache holds the batch's bucketed prompt width (a multiple of `pad_to_multiple_of`) plus
    `max_new_tokens`. One decode step (forward with the cache, temperature/top-k/top-p sampling,
    the finished mask, the token written to the output buffer) reads and writes static tensors
    only, so on a GPU it is captured once per batch shape in a CUDA graph and replayed
    (`cuda_graph`); elsewhere, or on a sharded (FSDP) policy, the same step runs eagerly. EOS is
    read on the host every `eos_check_every` steps. Sampling draws one uniform number per row and
    step from a counter-based hash of (seed, round, prompt index, step) and inverts the row's
    cumulative distribution, so a prompt's random numbers do not depend on its batch.
    `batch_size: auto` sizes batches from free GPU memory (`memory_share` of it).

    `loop: generate` is `model.generate` with transformers' static cache instead, its decoding
    step compiled on a GPU (`compile`).
    """

    backend = "static"
    sizes_batches = True

    def __init__(
        self,
        *args,
        loop: str = "spinlab",
        cuda_graph: bool = True,
        eos_check_every: int = 16,
        memory_share: float = 0.6,
        compile: bool = True,
        pad_to_multiple_of: int = 64,
        **kwargs,
    ):
        super().__init__(*args, pad_to_multiple_of=pad_to_multiple_of, **kwargs)
        if loop not in ("spinlab", "generate"):
            raise ConfigError(f"generation.loop must be 'spinlab' or 'generate', got {loop!r}")
        if eos_check_every < 1:
            raise ConfigError(f"generation.eos_check_every must be >= 1, got {eos_check_every}")
        if not 0 < memory_share <= 1:
            raise ConfigError(f"generation.memory_share must be in (0, 1], got {memory_share}")
        if self.batch_size == "auto" and loop != "spinlab":
            raise ConfigError("generation.batch_size=auto needs generation.loop=spinlab; give a number")
        self.loop = loop
        self.cuda_graph = cuda_graph
        self.eos_check_every = eos_check_every
        self.memory_share = memory_share
        self.compile = compile

    def generate(self, model, tokenizer, prompt_ids, on_batch, *args, shard=(0, 1), **kwargs) -> dict:
        if self.batch_size != "auto":
            return super().generate(model, tokenizer, prompt_ids, on_batch, *args, shard=shard, **kwargs)
        sized = copy.copy(self)
        sized.batch_size = self.auto_batch_size(model, prompt_ids, shard[1])
        stats = sized.generate(model, tokenizer, prompt_ids, on_batch, *args, shard=shard, **kwargs)
        return {**stats, "batch_size": sized.batch_size}

    def auto_batch_size(self, model, prompt_ids: Sequence[Sequence[int]], world: int = 1) -> int:
        """Rows per batch from free GPU memory: `memory_share` of it over the bytes one row needs.

        A row needs its KV cache (2 x layers x KV heads x head size x bytes per value x cache
        length, the cache sized for the longest prompt) plus an estimate of its prefill activations
        (prompt width x (4 x hidden + 3 x MLP width) values) and its sampling buffers (4 float32
        vectors of the vocabulary size). Off a GPU: AUTO_BATCH_OFF_GPU rows. With several ranks the
        smallest of their sizes, so that they share one plan.
        """
        device = next(model.parameters()).device
        if not prompt_ids:
            return 1
        width = self._width(max(map(len, prompt_ids)))
        per_row = _row_bytes(model, width, width + self.max_new_tokens)
        free = _free_memory(device)
        if free is None:
            rows = AUTO_BATCH_OFF_GPU
        else:
            rows = int(self.memory_share * free // per_row)
            if rows < 1:
                raise RuntimeError(
                    f"generation.batch_size=auto: one row needs {per_row / 2**20:.1f} MiB (cache length "
                    f"{width + self.max_new_tokens}) and {self.memory_share} of the free memory is "
                    f"{self.memory_share * free / 2**20:.1f} MiB; lower generation.max_new_tokens or the prompt length"
                )
        rows = rows // 8 * 8 or rows  # multiples of 8 for the matrix units
        rows = min(rows, math.ceil(len(prompt_ids) / world))
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            agreed = torch.tensor([rows], device=device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            rows = int(agreed.item())
        return rows

    def _width(self, longest: int) -> int:
        return math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of

    def _config(self, config: GenerationConfig) -> GenerationConfig:
        config = copy.copy(config)
        config.cache_implementation = "static"
        config.disable_compile = not self.compile
        return config

    def _run(self, model, prompt_ids, todo, emit, config, phase: Phase) -> dict | None:
        if self.loop == "generate":
            return super()._run(model, prompt_ids, todo, emit, config, phase)
        batches = todo or self.batches(prompt_ids)[:1]
        longest = max(self._width(max(len(prompt_ids[i]) for i in b)) for b in batches) + self.max_new_tokens
        reason = _unsupported(model, config, longest)
        if reason:
            log.warning("generation=static: %s; decoding with transformers' generate instead", reason)
            super()._run(model, prompt_ids, todo, emit, config, phase)
            return {"loop": "generate", "loop_reason": reason}
        device = next(model.parameters()).device
        graph = self.cuda_graph and device.type == "cuda" and not phase.synced
        # Sharded: every rank makes every decode step, whatever its rows' EOS.
        decoder = _StaticDecoder(model, config, self, graph=graph, run_to_end=phase.synced)
        spare = todo[-1] if todo else self.batches(prompt_ids)[0]
        calls = [(b, True) for b in todo] + [(spare, False)] * phase.spare_calls
        key = _mix32(_mix32(self.seed & _M32) ^ (phase.round_index & _M32))
        try:
            for batch, keep in calls:
                tokens = decoder.run([prompt_ids[i] for i in batch], batch, key)
                if keep:
                    emit(list(zip(batch, tokens, strict=True)))
        finally:
            decoder.close()
        return decoder.stats


AUTO_BATCH_OFF_GPU = 16
_M32 = 0xFFFFFFFF
# generate would apply these through logits processors that spinlab's loop does not have.
_NEUTRAL = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "min_p": (None, 0.0),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
}


def _unsupported(model, config: GenerationConfig, cache_length: int) -> str | None:
    """Why spinlab's decode loop cannot stand in for `generate` on this model and config, if it
    cannot. `cache_length`: the longest batch's prompt width plus max_new_tokens."""
    if model.config.is_encoder_decoder:
        return "an encoder-decoder model"
    text = model.config.get_text_config(decoder=True)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    window = getattr(text, "sliding_window", None)
    # A sliding window at least as long as the cache sees every cached token: full attention,
    # which is the loop's mask (Mistral's and Gemma-2's 4096 against SPIN's 1024 tokens).
    if window and ("sliding_attention" in kinds or getattr(text, "layer_types", None) is None):
        if cache_length > window:
            return (
                f"sliding-window attention over {window} tokens, shorter than the cache ({cache_length}: the "
                "loop's mask is full attention)"
            )
        kinds.discard("sliding_attention")
    if kinds != {"full_attention"}:
        return f"a model with {sorted(kinds - {'full_attention'})} layers (the loop's mask is full attention)"
    for field, neutral in _NEUTRAL.items():
        value = getattr(config, field, None)
        if value not in neutral:
            return f"the model's generation config sets {field}={value!r}"
    params = _forward_parameters(model)
    if "cache" not in params and "past_key_values" not in params:
        return f"{type(model).__name__}.forward takes no cache argument"
    if "logits_to_keep" not in params:
        return f"{type(model).__name__}.forward takes no logits_to_keep argument"
    return None


def _forward_parameters(model) -> Mapping:
    """The parameters of the model's forward (under a peft wrapper, which passes them on: its base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def _free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take on a GPU (free plus cached by torch and unused); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _row_bytes(model, width: int, length: int) -> int:
    """Memory one batch row needs: KV cache, prefill activations, sampling buffers (see auto_batch_size)."""
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    size = next(model.parameters()).element_size()
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * size * length
    prefill = (
        width * (4 * cfg.hidden_size + 3 * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)) * size
    )
    return kv + prefill + 4 * 4 * cfg.vocab_size


def _mul32(x, c: int):
    """x * c mod 2**32 for x in [0, 2**32), in 16-bit halves so no int64 product overflows."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """A 32-bit integer hash (xorshift-multiply rounds), on Python ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _uniform(key, index, step) -> torch.Tensor:
    """One float32 in [0, 1) per row, a function of (key, prompt index, step) alone (24 bits)."""
    h = _mix32(_mix32(_mix32(step & _M32) ^ (index & _M32)) ^ key)
    return (h >> 8).to(torch.float32) * 2.0**-24


def _sample(logits: torch.Tensor, gen: Generator, key, index, step) -> torch.Tensor:
    """Next token per row from float32 logits: argmax, or temperature, top-k and top-p (in
    `generate`'s order and with its rules) then the inverse of the row's cumulative distribution."""
    if not gen.do_sample:
        return logits.argmax(-1)
    if gen.temperature != 1:
        logits = logits / gen.temperature
    if gen.top_k:
        kth = logits.topk(min(gen.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if gen.top_p < 1:
        ascending, order = logits.sort(-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - gen.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), -math.inf)
    cdf = logits.softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    # Strictly below the total, so the search lands on a token of non-zero probability.
    target = torch.minimum(
        _uniform(key, index, step)[:, None] * total, total.nextafter(torch.zeros_like(total))
    )
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)


class _StaticDecoder:
    """A static KV cache and the decode step's tensors for one batch shape (rows, width, length).

    Everything the step reads or writes lives in these tensors, so the step takes no arguments
    and a CUDA graph of it replays correctly; a new shape replaces them (and the graph).
    """

    def __init__(
        self, model, config: GenerationConfig, gen: StaticCacheGenerator, graph: bool, run_to_end: bool
    ):
        self.model, self.gen = model, gen
        self.eos, self.pad = config.eos_token_id, config.pad_token_id
        self.device = next(model.parameters()).device
        self.use_graph, self.run_to_end = graph, run_to_end
        self.cache_arg = "cache" if "cache" in _forward_parameters(model) else "past_key_values"
        # A 4-D mask reaches the attention as given: eager attention adds it to the scores (Gemma-2's
        # default, for its soft-capped scores), the fused kernels take it as booleans.
        self.additive_mask = getattr(model.config, "_attn_implementation", None) == "eager"
        dtype = next(model.parameters()).dtype
        # How far a replay may stray from the eager step: float32 kernels agree to rounding, half
        # precision ones (if a kernel differs under capture) to a few units in the last place.
        self.tolerance = (1e-4, 0.0) if dtype == torch.float32 else (0.02, 0.01)
        self.shape = None
        self.graph = None
        self.stats = {
            "loop": "spinlab",
            "cuda_graph": False,
            "graph_captures": 0,
            "graph_capture_seconds": 0.0,
            "decode_steps": 0,
            "cache_lengths": [],
        }

    def close(self) -> None:
        self.graph = self.cache = None

    def _allocate(self, rows: int, width: int, length: int) -> None:
        from transformers import StaticCache

        self.graph = self.cache = None  # the previous shape's memory goes back first
        device, new = self.device, self.gen.max_new_tokens
        self.shape = (rows, width, length)
        self.cache = StaticCache(config=self.model.config, max_cache_len=length)
        self.attend = torch.zeros(rows, length, dtype=torch.bool, device=device)
        self.last = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        # Two columns to spare: the graph check's eager steps may run past the last step.
        self.out = torch.full((rows, new + 2), self.pad, dtype=torch.long, device=device)
        self.index = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.step_no = torch.zeros(1, dtype=torch.long, device=device)
        self.key = torch.zeros(1, dtype=torch.long, device=device)
        self.stats["cache_lengths"].append(length)

    def _forward(self, **inputs) -> torch.Tensor:
        out = self.model(**inputs, **{self.cache_arg: self.cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _emit(self, logits: torch.Tensor) -> torch.Tensor:
        """Sample from `logits`, write the token at `step_no`, update the finished mask."""
        token = _sample(logits, self.gen, self.key, self.index, self.step_no)
        token = torch.where(self.finished, self.pad, token)
        self.out.index_copy_(1, self.step_no, token[:, None])
        self.finished |= token == self.eos
        self.last.copy_(token)
        self.step_no += 1
        return logits

    def _mask(self) -> torch.Tensor:
        mask = self.attend[:, None, None, :]
        if not self.additive_mask:
            return mask
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )

    def step(self) -> torch.Tensor:
        """One decode step over static tensors only (what a CUDA graph captures)."""
        self.attend.index_fill_(1, self.slot, True)
        logits = self._forward(
            input_ids=self.last[:, None],
            attention_mask=self._mask(),
            position_ids=self.pos[:, None],
        )
        self.pos += 1
        self.slot += 1
        return self._emit(logits)

    @torch.no_grad()
    def run(self, prompts: list[Sequence[int]], indices: list[int], key: int) -> list[list[int]]:
        """Sampled tokens (max_new_tokens per row, pad after EOS) for one batch."""
        rows, new = len(prompts), self.gen.max_new_tokens
        width = self.gen._width(max(map(len, prompts)))
        if self.shape != (rows, width, width + new):
            self._allocate(rows, width, width + new)
        else:
            self.cache.reset()
        device = self.device
        input_ids, mask = left_pad(prompts, width, self.pad)
        input_ids, mask = input_ids.to(device), mask.to(device)
        self.attend.zero_()
        self.attend[:, :width] = mask.bool()
        self.index.copy_(torch.tensor(indices, dtype=torch.long))
        self.key.fill_(key)
        self.finished.zero_()
        self.out.fill_(self.pad)
        self.step_no.zero_()
        # Positions as generate counts them: real tokens before, pads at 1.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        self._emit(self._forward(input_ids=input_ids, attention_mask=mask, position_ids=positions))
        self.pos.copy_(mask.sum(-1))
        self.slot.fill_(width)
        done = 1
        for done in range(2, new + 1):
            if self.use_graph and self.graph is None:
                self._capture()
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            self.stats["decode_steps"] += 1
            if not self.run_to_end and done % self.gen.eos_check_every == 0 and bool(self.finished.all()):
                break
        return self.out[:, :done].tolist()

    def _state(self) -> list[torch.Tensor]:
        lengths = [layer.cumulative_length for layer in self.cache.layers]
        return [self.attend, self.last, self.pos, self.finished, self.out, self.slot, self.step_no, *lengths]

    def _capture(self) -> None:
        """Capture `step` in a CUDA graph, after checking two replays against two eager steps.

        Any failure (capture refused, a replay differing from the eager step) leaves the graph
        off for this decoder with a warning; the loop then runs the same step eagerly.
        """
        started = time.perf_counter()
        saved = [t.clone() for t in self._state()]
        with _side_stream(self.device):
            # Eager steps first: lazy initialisations happen outside the capture, and they are the reference.
            eager = [(self.step().clone(), self.last.clone()) for _ in range(2)]
        self._restore(saved)
        graph = None
        try:
            graph, logits = self._record()
            logit_tol, token_tol = self.tolerance
            for step, (want_logits, want_tokens) in enumerate(eager, 1):
                graph.replay()
                off = (logits - want_logits).abs().max().item() / max(want_logits.abs().max().item(), 1e-6)
                tokens = (self.last != want_tokens).sum().item()
                if off > logit_tol or tokens > token_tol * len(want_tokens):
                    raise RuntimeError(
                        f"replay {step} of the captured decode step differs from the eager step "
                        f"({tokens} of {len(want_tokens)} tokens differ, logits by up to {off:.3g} of their "
                        "largest magnitude)"
                    )
        except Exception as err:  # any capture failure falls back to the eager step
            if self.device.type == "cuda":
                try:
                    torch.cuda.synchronize(self.device)
                except RuntimeError as broken:
                    raise RuntimeError(
                        f"generation=static: capturing the decode step in a CUDA graph failed ({err}) and "
                        f"left the device unusable ({broken}); run with generation.cuda_graph=false"
                    ) from err
            log.warning("generation=static: no CUDA graph for the decode step (%s); decoding eagerly", err)
            self.use_graph = False
            graph = None
        self._restore(saved)  # the state after prefill: the checked replays rewrote the slots they read
        self.graph = graph
        self.stats["cuda_graph"] = graph is not None
        self.stats["graph_captures"] += graph is not None
        self.stats["graph_capture_seconds"] += time.perf_counter() - started

    def _record(self):
        """The CUDA graph of one `step` and its logits tensor (refilled by each replay)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits = self.step()
        return graph, logits

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self._state(), saved, strict=True):
            t.copy_(s)


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Work on a side CUDA stream, ordered after and before the current one (as graph warm-ups want)."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)
