"""`generation=hf`: Hugging Face `generate` per batch of the plan, left padding, dynamic KV cache.

Each batch is seeded from (seed, round, index of the batch's first prompt), and the plan does not
depend on the number of processes, so a batch regenerated after a crash, or on another process,
yields the same text.
"""

from __future__ import annotations

import math

import torch
from transformers import GenerationConfig

from spinlab.errors import ConfigError
from spinlab.generation.base import Generator, Phase, left_pad


class HFGenerator(Generator):
    """Batched sampling with Hugging Face `generate` (left padding, dynamic KV cache)."""

    backend = "hf"

    def __init__(self, *args, pad_to_multiple_of: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if pad_to_multiple_of < 1:
            raise ConfigError(f"generation.pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of

    def _run(self, model, prompt_ids, todo, emit, config, phase: Phase) -> dict | None:
        device = next(model.parameters()).device
        # A spare call re-runs a batch (every rank of a sharded model joins every forward pass).
        spare = todo[-1] if todo else self.batches(prompt_ids)[0]
        calls = [(b, True) for b in todo] + [(spare, False)] * phase.spare_calls
        for batch, keep in calls:
            width = max(len(prompt_ids[i]) for i in batch)
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
            input_ids, attention_mask = left_pad([prompt_ids[i] for i in batch], width, config.pad_token_id)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(hash((self.seed, phase.round_index, batch[0])) % 2**63)
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=self._config(config),
                    synced_gpus=phase.synced,
                )
            if keep:
                emit([(i, out[row, width:].tolist()) for row, i in enumerate(batch)])

    def _config(self, config: GenerationConfig) -> GenerationConfig:
        return config
