"""Synthetic responses from the opponent: generation backends over engines that exist.

A generator knows a model and a tokenizer, nothing of the training module. Every backend
takes the same prompts (token ids) and hands the same rows to `on_batch` as they finish
(`{"index", "synthetic", "tokens", "finished"}`), which the caller appends to disk; prompts in
`done` are on disk already and are neither generated nor reported again. Prompts are sorted by
length and cut into fixed batches: the plan that shards the work over ranks.

- `HFGenerator` (`generation=hf`): `model.generate` per batch, left padding, dynamic KV cache.
- `StaticCacheGenerator` (`generation=static`): a fixed-size KV cache per batch shape and
  spinlab's own decode loop, whose step (forward, sampling, finished mask) is captured in a CUDA
  graph on a GPU; or `generate` with transformers' static cache (`loop: generate`).
- `ContinuousBatchingGenerator` (`generation=continuous`): transformers' continuous-batching
  engine (`generate_batch`'s manager: paged KV cache, requests scheduled as others finish).

`hf` seeds each batch from (seed, round, index of the batch's first prompt) and `static` draws
each prompt's random numbers from (seed, round, prompt index, step); the plan does not depend on
the number of processes, so a batch regenerated after a crash, or on another process, yields the
same text. The continuous engine schedules requests itself: after a crash the finished responses
stay on disk and only the missing prompts are generated, with other draws than an uninterrupted
run would have made.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from spinlab.errors import ConfigError

Rows = list[dict]
log = logging.getLogger(__name__)


def left_pad(prompts: Sequence[Sequence[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, width] token ids and attention mask with each prompt at the right end (decoding
    appends on the right, so every row's next token lands in the same column)."""
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


class Generator:
    """Sampling settings, the batch plan and the bookkeeping every backend shares.

    A backend implements `_run(model, prompt_ids, todo, emit, config, round_index, synced, spare_calls)`:
    generate every prompt of the batches in `todo` and call `emit([(index, tokens), ...])` with
    sampled tokens as responses finish (anything from the first EOS on is cut here); then make
    `spare_calls` more model calls whose outputs are dropped (see `synced`). It may return extra
    statistics.
    """

    backend = "base"
    sizes_batches = False  # whether batch_size may be "auto"

    def __init__(
        self,
        max_new_tokens: int = 128,
        batch_size: int | str = 8,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
    ):
        if max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size == "auto":
            if not self.sizes_batches:
                raise ConfigError(
                    f"generation.batch_size=auto: generation={self.backend} takes a number (auto: generation=static)"
                )
        elif not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"generation.batch_size must be an integer >= 1 or auto, got {batch_size!r}")
        if do_sample and not temperature > 0:
            raise ConfigError(f"generation.temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"generation.top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ConfigError(f"generation.top_k must be >= 0 (0: off), got {top_k}")
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed

    def greedy(self, max_new_tokens: int | None = None, batch_size: int | None = None) -> Generator:
        """This backend, with its engine settings, decoding greedily (e.g. for task answers)."""
        other = copy.copy(self)
        other.do_sample = False
        other.max_new_tokens = max_new_tokens or self.max_new_tokens
        other.batch_size = batch_size or self.batch_size
        return other

    def batches(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Indices of the prompts in each batch: longest first, a stable plan for resuming."""
        order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def generation_config(self, model, eos: int, pad: int) -> GenerationConfig:
        """One config for every backend: the model's own generation settings under ours.

        `generate` fills whatever a config leaves unset from `model.generation_config`; starting
        from it here gives the continuous engine the same logits processors `generate` uses.
        """
        config = copy.deepcopy(model.generation_config)
        config.update(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=None,
            min_length=0,
            do_sample=self.do_sample,
            # Decoding greedily: transformers' defaults, which build no warper and warn of nothing.
            temperature=self.temperature if self.do_sample else 1.0,
            top_p=self.top_p if self.do_sample else 1.0,
            top_k=self.top_k if self.do_sample else 50,
            num_beams=1,
            num_return_sequences=1,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        return config

    @torch.no_grad()
    def generate(
        self,
        model,
        tokenizer,
        prompt_ids: Sequence[Sequence[int]],
        on_batch: Callable[[Rows], None],
        done: set[int] = frozenset(),
        round_index: int = 0,
        desc: str = "generate",
        shard: tuple[int, int] = (0, 1),
        synced: bool = False,
    ) -> dict:
        """Generate for every prompt index not in `done`; returns statistics.

        With shard=(rank, world) only every world-th batch of the plan, from the rank-th, is done
        here. synced=True (a sharded model, whose every forward pass needs every rank): all ranks
        make the same number of model calls, whatever their share.
        """
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id: generation needs one to end responses")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        rank, world = shard
        plan = [b for k, b in enumerate(self.batches(prompt_ids)) if k % world == rank]
        todo = [b for b in plan if not set(b) <= done]
        stats = {"responses": 0, "new_tokens": 0, "truncated": 0}
        bar = tqdm(
            total=sum(len(set(b) - done) for b in todo), desc=desc, unit="response", dynamic_ncols=True
        )
        started = time.perf_counter()

        def emit(rows: list[tuple[int, list[int]]]) -> None:
            out = []
            for i, tokens in rows:
                if i in done:
                    continue
                finished = eos in tokens
                if finished:
                    tokens = tokens[: tokens.index(eos)]
                stats["responses"] += 1
                stats["new_tokens"] += len(tokens) + int(finished)
                stats["truncated"] += int(not finished)
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                out.append({"index": i, "synthetic": text, "tokens": len(tokens), "finished": finished})
            if out:
                on_batch(out)
            bar.update(len(out))
            bar.set_postfix(tok_s=f"{stats['new_tokens'] / max(time.perf_counter() - started, 1e-9):.0f}")

        was_training = model.training
        model.eval()
        try:
            config = self.generation_config(model, eos, pad)
            # Sharded: as many calls as the rank with the most batches of the plan has.
            spare = math.ceil(len(self.batches(prompt_ids)) / world) - len(todo) if synced else 0
            extra = self._run(model, prompt_ids, todo, emit, config, round_index, synced, spare) or {}
        finally:
            bar.close()
            model.train(was_training)
        seconds = time.perf_counter() - started
        return {
            "backend": self.backend,
            **stats,
            "seconds": seconds,
            "tokens_per_s": stats["new_tokens"] / max(seconds, 1e-9),
            **extra,
        }

    def _run(self, model, prompt_ids, todo, emit, config, round_index, synced, spare_calls) -> dict | None:
        raise NotImplementedError


class HFGenerator(Generator):
    """Batched sampling with Hugging Face `generate` (left padding, dynamic KV cache)."""

    backend = "hf"

    def __init__(self, *args, pad_to_multiple_of: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if pad_to_multiple_of < 1:
            raise ConfigError(f"generation.pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of

    def _run(self, model, prompt_ids, todo, emit, config, round_index, synced, spare_calls) -> dict | None:
        device = next(model.parameters()).device
        # A spare call re-runs a batch (every rank of a sharded model joins every forward pass).
        spare = todo[-1] if todo else self.batches(prompt_ids)[0]
        calls = [(b, True) for b in todo] + [(spare, False)] * spare_calls
        for batch, keep in calls:
            width = max(len(prompt_ids[i]) for i in batch)
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
            input_ids, attention_mask = left_pad([prompt_ids[i] for i in batch], width, config.pad_token_id)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(hash((self.seed, round_index, batch[0])) % 2**63)
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=self._config(config),
                    synced_gpus=synced,
                )
            if keep:
                emit([(i, out[row, width:].tolist()) for row, i in enumerate(batch)])

    def _config(self, config: GenerationConfig) -> GenerationConfig:
        return config


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

    def _run(self, model, prompt_ids, todo, emit, config, round_index, synced, spare_calls) -> dict | None:
        if self.loop == "generate":
            return super()._run(model, prompt_ids, todo, emit, config, round_index, synced, spare_calls)
        reason = _unsupported(model, config)
        if reason:
            log.warning("generation=static: %s; decoding with transformers' generate instead", reason)
            super()._run(model, prompt_ids, todo, emit, config, round_index, synced, spare_calls)
            return {"loop": "generate", "loop_reason": reason}
        device = next(model.parameters()).device
        graph = self.cuda_graph and device.type == "cuda" and not synced
        # Sharded: every rank makes every decode step, whatever its rows' EOS.
        decoder = _StaticDecoder(model, config, self, graph=graph, run_to_end=synced)
        spare = todo[-1] if todo else self.batches(prompt_ids)[0]
        calls = [(b, True) for b in todo] + [(spare, False)] * spare_calls
        key = _mix32(_mix32(self.seed & _M32) ^ (round_index & _M32))
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


def _unsupported(model, config: GenerationConfig) -> str | None:
    """Why spinlab's decode loop cannot stand in for `generate` on this model and config, if it cannot."""
    if model.config.is_encoder_decoder:
        return "an encoder-decoder model"
    text = model.config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None)
    if set(layer_types or ["full_attention"]) != {"full_attention"} or (
        layer_types is None and getattr(text, "sliding_window", None)
    ):
        return "a model with sliding-window or linear-attention layers (the loop's mask is full attention)"
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

    def step(self) -> torch.Tensor:
        """One decode step over static tensors only (what a CUDA graph captures)."""
        self.attend.index_fill_(1, self.slot, True)
        logits = self._forward(
            input_ids=self.last[:, None],
            attention_mask=self.attend[:, None, None, :],
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


class ContinuousBatchingGenerator(Generator):
    """transformers' continuous-batching engine: paged KV cache, requests scheduled as others finish.

    Engine settings (transformers' `ContinuousBatchingConfig`): `page_size` tokens per KV-cache
    block; its size in `num_blocks` blocks or `max_memory_percent` of the free device memory
    (transformers sizes it when both are null); `max_batch_tokens` tokens per forward pass;
    `max_requests_per_batch`; `engine` for any other field (e.g. `use_cuda_graph`,
    `default_compile_level`). Finished responses go to `on_batch` `batch_size` at a time.
    """

    backend = "continuous"

    def __init__(
        self,
        *args,
        page_size: int = 256,
        num_blocks: int | None = None,
        max_memory_percent: float | None = None,
        max_batch_tokens: int | None = None,
        max_requests_per_batch: int | None = None,
        engine: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        engine = dict(engine or {})
        unknown = sorted(set(engine) - fields)
        if unknown:
            raise ConfigError(
                f"generation.engine has keys that transformers' ContinuousBatchingConfig does not know: "
                f"{unknown}; known: {sorted(fields)}"
            )
        if max_memory_percent is not None and not 0 < max_memory_percent <= 1:
            raise ConfigError(f"generation.max_memory_percent must be in (0, 1], got {max_memory_percent}")
        self.engine = dict(
            engine,
            page_size=page_size,
            num_blocks=num_blocks,
            max_memory_percent=max_memory_percent,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_requests_per_batch,
        )
        try:  # a bad value fails here, at start
            ContinuousBatchingConfig(**self.engine)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"generation.engine: {err}") from err

    def generate(self, *args, synced: bool = False, **kwargs) -> dict:
        if synced:
            raise ConfigError(
                "generation=continuous cannot run on a sharded (FSDP) policy (synced=True: every rank "
                "must join every forward pass); use generation=hf or generation=static there"
            )
        return super().generate(*args, **kwargs)

    def engine_config(self, model, prompts: list[list[int]]):
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        engine = dict(self.engine)
        if (
            model.device.type == "cpu"
            and engine["num_blocks"] is None
            and engine["max_memory_percent"] is None
        ):
            # transformers would take 60 % of the free RAM: on CPU, size the cache for the work instead.
            concurrent = min(len(prompts), engine["max_requests_per_batch"] or 64)
            longest = max(map(len, prompts)) + self.max_new_tokens
            engine["num_blocks"] = concurrent * math.ceil(longest / engine["page_size"])
        return ContinuousBatchingConfig(**engine)

    def _run(self, model, prompt_ids, todo, emit, config, round_index, synced, spare_calls) -> dict | None:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        indices = [i for b in todo for i in b]
        if not indices:
            return None
        started = time.perf_counter()
        prompts = [list(prompt_ids[i]) for i in indices]
        engine = self.engine_config(model, prompts)
        engine.seed = hash((self.seed, round_index, len(indices), indices[0])) % 2**31
        hints = WorkloadHints(
            max_prompt_length=max(map(len, prompts)),
            max_generated_length=self.max_new_tokens,
            num_requests=len(prompts),
        )
        device = model.device
        # The engine logs a dozen INFO lines per session to its own console handler.
        engine_log = logging.getLogger("ContinuousBatchingLogger")
        level = engine_log.level
        engine_log.setLevel(max(level, logging.WARNING))
        try:
            # The engine seeds the global generator from its own thread: keep the caller's state.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                manager = model.init_continuous_batching(
                    generation_config=config, continuous_batching_config=engine, workload_hints=hints
                )
                failed = True
                try:
                    setup = self._serve(manager, indices, prompts, emit, config, started)
                    failed = False
                finally:
                    manager.stop(block=True, hard_stop=failed)
                    manager.destroy()
                    # stop() restores the attention implementation only if the loop had started.
                    if getattr(manager, "_original_attn_impl", None) is not None:
                        model.set_attn_implementation(manager._original_attn_impl)
        finally:
            engine_log.setLevel(level)
        return {"engine_setup_seconds": setup}

    def _serve(
        self, manager, indices: list[int], prompts: list[list[int]], emit, config, started: float
    ) -> float:
        """Queue every prompt, start the engine, hand finished responses on `batch_size` at a time;
        returns the seconds from `started` until the engine ran."""
        if not manager.warmed_up:
            manager.warmup()
        # All requests are queued before the loop starts, so the schedule depends on them alone.
        for i, ids in zip(indices, prompts, strict=True):
            manager.add_request(
                ids, request_id=str(i), max_new_tokens=self.max_new_tokens, eos_token_id=config.eos_token_id
            )
        manager.start()
        setup = time.perf_counter() - started
        pending: list[tuple[int, list[int]]] = []
        remaining = len(indices)
        while remaining:
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError(
                        f"the continuous-batching engine stopped with {remaining} responses missing: "
                        f"{manager.background_thread_status.fatal_error}"
                    )
                continue
            if not result.is_finished():
                continue
            if result.error is not None:
                raise RuntimeError(
                    f"the continuous-batching engine failed prompt {result.request_id}: {result.error}"
                )
            pending.append((int(result.request_id), list(result.generated_tokens)))
            remaining -= 1
            if len(pending) >= self.batch_size or not remaining:
                emit(pending)
                pending = []
        return setup
