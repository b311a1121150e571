"""What every generation backend shares: the sampling settings, the batch plan, and the rows.

A generator knows a model and a tokenizer, nothing of the training module. Every backend
takes the same prompts (token ids) and hands the same rows to `on_batch` as they finish
(`{"index", "synthetic", "tokens", "finished"}`), which the caller appends to disk; prompts in
`done` are on disk already and are neither generated nor reported again. Prompts are sorted by
length and cut into fixed batches: the plan that shards the work over ranks, and that a resumed
phase follows again. Backends: `hf.py` (`generate`), `static.py` (spinlab's decode loop over a
static KV cache), `vllm.py` (a vLLM engine in a child process).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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


@dataclasses.dataclass(frozen=True)
class Phase:
    """What one call of `Generator.generate` hands its backend besides the prompts."""

    round_index: int
    done: frozenset[int]  # prompts on disk already: neither generated nor reported again
    shard: tuple[int, int]  # (rank, world): this process does every world-th batch of the plan
    synced: bool  # a sharded model: every rank joins every forward pass
    spare_calls: int  # synced: model calls to make beyond this rank's batches, outputs dropped
    weights: Path | None = None  # a Hugging Face directory of the model, for engines that load it


class Generator:
    """Sampling settings, the batch plan and the bookkeeping every backend shares.

    A backend implements `_run(model, prompt_ids, todo, emit, config, phase)`: generate every prompt
    of the batches in `todo` and call `emit([(index, tokens), ...])` with sampled tokens as
    responses finish (anything from the first EOS on is cut here); then make `phase.spare_calls`
    more model calls whose outputs are dropped. It may return extra statistics.
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

    def session(self, longest_prompt: int = 0):
        """A block whose phases may share what the backend starts for a phase (generation=vllm:
        its engine process); a backend that starts nothing shares nothing."""
        return contextlib.nullcontext(self)

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
        from it here lets every backend see the settings `generate` would apply (the static loop
        checks them against what it implements).
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
        weights: Path | None = None,
    ) -> dict:
        """Generate for every prompt index not in `done`; returns statistics.

        With shard=(rank, world) only every world-th batch of the plan, from the rank-th, is done
        here. synced=True (a sharded model, whose every forward pass needs every rank): all ranks
        make the same number of model calls, whatever their share.
        """
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no eos_token_id: generation needs one to end responses")
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
            phase = Phase(
                round_index, frozenset(done), shard, synced, spare, Path(weights) if weights else None
            )
            extra = self._run(model, prompt_ids, todo, emit, config, phase) or {}
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

    def _run(self, model, prompt_ids, todo, emit, config, phase: Phase) -> dict | None:
        raise NotImplementedError
