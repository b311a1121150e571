"""Synthetic responses from the opponent: generation backends over engines that exist.

A generator knows a model and a tokenizer, nothing of the training module. Every backend
takes the same prompts (token ids) and hands the same rows to `on_batch` as they finish
(`{"index", "synthetic", "tokens", "finished"}`), which the caller appends to disk; prompts in
`done` are on disk already and are neither generated nor reported again. Prompts are sorted by
length and cut into fixed batches: the plan that shards the work over ranks.

- `HFGenerator` (`generation=hf`): `model.generate` per batch, left padding, dynamic KV cache.
- `StaticCacheGenerator` (`generation=static`): the same with a fixed-size KV cache, which
  transformers compiles the decoding step for on a GPU.
- `ContinuousBatchingGenerator` (`generation=continuous`): transformers' continuous-batching
  engine (`generate_batch`'s manager: paged KV cache, requests scheduled as others finish).

The HF backends seed each batch by its content, so a batch regenerated after a crash yields the
same text. The continuous engine schedules requests itself: after a crash the finished responses
stay on disk and only the missing prompts are generated, with other draws than an uninterrupted
run would have made.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

Rows = list[dict]


class Generator:
    """Sampling settings, the batch plan and the bookkeeping every backend shares.

    A backend implements `_run(model, prompt_ids, todo, emit, config, round_index, synced, spare_calls)`:
    generate every prompt of the batches in `todo` and call `emit([(index, tokens), ...])` with
    sampled tokens as responses finish (anything from the first EOS on is cut here); then make
    `spare_calls` more model calls whose outputs are dropped (see `synced`). It may return extra
    statistics.
    """

    backend = "base"

    def __init__(
        self,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"generation.batch_size must be >= 1, got {batch_size}")
        if do_sample and not temperature > 0:
            raise ValueError(f"generation.temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"generation.top_k must be >= 0 (0: off), got {top_k}")
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
            raise ValueError(f"generation.pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of

    def _run(self, model, prompt_ids, todo, emit, config, round_index, synced, spare_calls) -> dict | None:
        device = next(model.parameters()).device
        # A spare call re-runs a batch (every rank of a sharded model joins every forward pass).
        spare = todo[-1] if todo else self.batches(prompt_ids)[0]
        calls = [(b, True) for b in todo] + [(spare, False)] * spare_calls
        for batch, keep in calls:
            width = max(len(prompt_ids[i]) for i in batch)
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
            input_ids = torch.full((len(batch), width), config.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(batch):
                ids = prompt_ids[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
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
    """`generate` with a fixed-size KV cache; on a GPU transformers compiles the decoding step.

    Prompt widths are padded up to a multiple of `pad_to_multiple_of`, so that batches share a
    few cache shapes and the compiled step is not rebuilt for every batch.
    """

    backend = "static"

    def __init__(self, *args, compile: bool = True, pad_to_multiple_of: int = 64, **kwargs):
        super().__init__(*args, pad_to_multiple_of=pad_to_multiple_of, **kwargs)
        self.compile = compile

    def _config(self, config: GenerationConfig) -> GenerationConfig:
        config = copy.copy(config)
        config.cache_implementation = "static"
        config.disable_compile = not self.compile
        return config


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
            raise ValueError(
                f"generation.engine has keys that transformers' ContinuousBatchingConfig does not know: "
                f"{unknown}; known: {sorted(fields)}"
            )
        if max_memory_percent is not None and not 0 < max_memory_percent <= 1:
            raise ValueError(f"generation.max_memory_percent must be in (0, 1], got {max_memory_percent}")
        self.engine = dict(
            engine,
            page_size=page_size,
            num_blocks=num_blocks,
            max_memory_percent=max_memory_percent,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_requests_per_batch,
        )
        ContinuousBatchingConfig(**self.engine)  # a bad value fails here, at start

    def generate(self, *args, synced: bool = False, **kwargs) -> dict:
        if synced:
            raise ValueError(
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
