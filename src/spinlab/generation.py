"""Synthetic responses from the opponent.

A generator knows a model and a tokenizer, nothing of the training module. Prompts are
sorted by length and cut into fixed batches; each batch samples with its own seed, so a
batch regenerated after a crash yields the same text, and finished batches are handed to
`on_batch` as they complete (the caller appends them to disk).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm


class HFGenerator:
    """Batched sampling with Hugging Face `generate` (left padding, KV cache)."""

    def __init__(
        self,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        cache_implementation: str | None = None,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"generation.batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        # "static": a fixed-size KV cache, which transformers compiles the decoding step for
        # on a GPU; None: the dynamic cache (best on CPU).
        self.cache_implementation = cache_implementation

    def batches(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Indices of the prompts in each batch: longest first, a stable plan for resuming."""
        order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.no_grad()
    def generate(
        self,
        model,
        tokenizer,
        prompt_ids: Sequence[Sequence[int]],
        on_batch: Callable[[list[dict]], None],
        done: set[int] = frozenset(),
        round_index: int = 0,
        desc: str = "generate",
        shard: tuple[int, int] = (0, 1),
    ) -> dict:
        """Generate for every prompt index not in `done`; returns timing statistics.

        With shard=(rank, world) only every world-th batch of the plan, from the rank-th, is done here.
        """
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        device = next(model.parameters()).device
        rank, world = shard
        plan = [b for k, b in enumerate(self.batches(prompt_ids)) if k % world == rank and not set(b) <= done]
        was_training = model.training
        model.eval()
        new_tokens, started = 0, time.perf_counter()
        bar = tqdm(plan, desc=desc, unit="batch", dynamic_ncols=True)
        try:
            for batch in bar:
                width = max(len(prompt_ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for row, i in enumerate(batch):
                    ids = prompt_ids[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention_mask[row, width - len(ids) :] = 1
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(hash((self.seed, round_index, batch[0])) % 2**63)
                    out = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        max_new_tokens=self.max_new_tokens,
                        do_sample=self.do_sample,
                        temperature=self.temperature if self.do_sample else None,
                        top_p=self.top_p if self.do_sample else None,
                        top_k=self.top_k if self.do_sample else None,
                        pad_token_id=pad,
                        eos_token_id=eos,
                        **(
                            {"cache_implementation": self.cache_implementation}
                            if self.cache_implementation
                            else {}
                        ),
                    )
                rows = []
                for row, i in enumerate(batch):
                    if i in done:
                        continue
                    tokens = out[row, width:].tolist()
                    finished = eos in tokens
                    if finished:
                        tokens = tokens[: tokens.index(eos)]
                    new_tokens += len(tokens) + int(finished)
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    rows.append({"index": i, "synthetic": text, "tokens": len(tokens), "finished": finished})
                on_batch(rows)
                elapsed = time.perf_counter() - started
                bar.set_postfix(tok_s=f"{new_tokens / max(elapsed, 1e-9):.0f}")
        finally:
            bar.close()
            model.train(was_training)
        seconds = time.perf_counter() - started
        return {"new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": new_tokens / max(seconds, 1e-9)}
