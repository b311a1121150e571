"""Rows made into training batches.

`SelfPlayDataModule` reads every split from its source (spinlab.sources) and validates it,
measures the token limits, holds this round's pairs (prompt, real, synthetic) and batches them
for training: the real and the synthetic sequence of a pair share the prompt's tokens, and each
sequence is scored on its response tokens only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, SequentialSampler

from spinlab.errors import ConfigError
from spinlab.logprobs import IGNORE_INDEX, target_positions
from spinlab.models import CHATML_TEMPLATE, position_limit
from spinlab.rundir import is_launching_rank
from spinlab.sources import SPLITS, DataError, validate_rows

log = logging.getLogger(__name__)


def global_batch_shard(order: list[int], batch_size: int, rank: int, world: int) -> list[int]:
    """This process's part of each global batch of batch_size × world pairs, in `order`.

    With W processes at batch size B every optimizer step sees the same B·W pairs as one process
    at batch size B·W would, so a run's result does not depend on how it is spread. The order is
    padded by wrapping around so that every process gets the same number of batches.
    """
    span = batch_size * world
    padded = order + order[: (-len(order)) % span] if world > 1 else order
    return [
        i
        for start in range(0, len(padded), span)
        for i in padded[start + rank * batch_size : start + (rank + 1) * batch_size]
    ]


def batch_tokens(batch: dict, wait: bool = True) -> int | torch.Tensor:
    """Tokens of a collated batch that are not padding (padded or packed rows): collate's count
    when it made one, else counted from the batch's tensors. wait=False leaves such a count as a
    tensor, so that nothing waits for the device that holds it."""
    if "tokens" in batch:
        return int(batch["tokens"])
    mask = batch["attention_mask"] if "attention_mask" in batch else batch["sequence_ids"] >= 0
    count = mask.sum()
    return int(count) if wait else count


class Remaining:
    """The indices of an epoch after its first `skip`: a run resumed from a checkpoint saved after
    a step goes on with the next batch. Its length stays the whole epoch's, so that Lightning, which
    counts the batches already done in the checkpoint, ends the epoch where an uninterrupted one ends."""

    def __init__(self, indices: list[int], skip: int):
        self.indices, self.skip = indices, skip

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices[self.skip :])


class SelfPlayDataModule(L.LightningDataModule):
    """Rows of every split, validated and measured at start; this round's pairs; their batches.

    `max_prompt_length` and `max_length` left as None are measured from the data with the
    tokenizer and its chat template: the longest prompt of any split, and room for the longest
    prompt with its real response and EOS, and for `max_new_tokens` generated tokens and EOS,
    capped by the model's position limit (`max_positions`, else the tokenizer's model_max_length).
    """

    def __init__(
        self,
        source,
        tokenizer=None,
        batch_size: int = 4,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        max_new_tokens: int = 0,
        num_prompts: int | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        bad_rows: str = "error",
        num_workers: int = 0,
        seed: int = 0,
        packing: bool = False,
        pack_length: int | None = None,
        max_positions: int | None = None,
    ):
        super().__init__()
        self.source = source
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.max_new_tokens = max_new_tokens
        self.num_prompts = num_prompts
        self.system_prompt = system_prompt
        self.chat_template = CHATML_TEMPLATE if chat_template == "chatml" else chat_template
        self.bad_rows = bad_rows
        self.num_workers = num_workers
        self.seed = seed
        self.packing = packing
        self._pack_length = pack_length
        self.max_positions = max_positions
        self._check_pack_length()
        self.rows: dict[str, list[dict]] = {}
        self.skipped: dict[str, int] = {}
        self.skip_batches = 0  # set on a resume after a step: the next train loader starts after them
        self.pairs: list[dict] = []
        self.encoded: list[dict] = []

    @property
    def pack_length(self) -> int | None:
        if self._pack_length is not None or self.max_length is None:
            return self._pack_length
        return 2 * self.max_length

    def _check_pack_length(self) -> None:
        if None not in (self._pack_length, self.max_length) and self._pack_length < self.max_length:
            raise ConfigError(
                f"data.pack_length ({self._pack_length}) must be at least data.max_length ({self.max_length})"
            )

    @property
    def position_limit(self) -> int | None:
        """The longest sequence the model takes, where known."""
        return self.max_positions or position_limit(None, self.tokenizer)

    # -- rows -------------------------------------------------------------------------------
    def load_rows(self) -> None:
        """Read and validate every split, then fix the length limits (measuring those left None).

        Needs the tokenizer, not the model: spinlab.run runs it before any weights are loaded.
        """
        if self.rows:
            return
        if self.tokenizer is None:
            raise RuntimeError("SelfPlayDataModule needs a tokenizer to read its data")
        cap = self.position_limit
        if cap is not None and self.max_length is not None and self.max_length > cap:
            raise DataError(
                f"data.max_length={self.max_length} is over the model's position limit of {cap} tokens: "
                f"set data.max_length to at most {cap}, or null to measure it from the data"
            )
        lengths: list[tuple[int, int]] = []
        rows = {}
        for split in SPLITS:
            records = self.source.load(split) if self.source is not None else []
            limit = self.num_prompts if split == "train" else None
            measured: dict[int, tuple[int, int]] = {}
            origin = f"{type(self.source).__name__}[{split}]"
            check = self._length_check(records, limit, measured)
            rows[split], self.skipped[split] = validate_rows(records, self.bad_rows, check, origin, limit)
            lengths += [measured[id(r)] for r in rows[split]]
            if limit is not None and 0 < len(rows[split]) < limit and is_launching_rank():
                where = getattr(self.source, "paths", {}).get(split) or origin
                log.warning(
                    "data.num_prompts=%d, but %s has only %d usable rows%s: each round uses those %d",
                    limit,
                    where,
                    len(rows[split]),
                    f" ({self.skipped[split]} bad rows skipped)" if self.skipped[split] else "",
                    len(rows[split]),
                )
        self._fix_lengths(lengths)
        self.rows = rows

    def load_split(self, split: str) -> list[dict]:
        self.load_rows()
        return self.rows[split]

    def setup(self, stage: str | None = None) -> None:
        if not self.load_split("train"):
            where = getattr(self.source, "paths", {}).get("train") or f"{type(self.source).__name__}[train]"
            skipped = self.skipped["train"]
            why = f"{skipped} bad rows skipped, data.bad_rows=skip" if skipped else "it holds none"
            raise DataError(f"{where}: the training split has no usable rows ({why})")

    def _lengths(self, row: dict) -> tuple[int, int]:
        """(prompt, prompt + real response + EOS) in tokens, the prompt with the chat template."""
        prompt = len(self.encode_prompt(row["prompt"]))
        return prompt, prompt + len(
            self.tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        ) + 1

    def _longest(self, records: list, limit: int | None) -> tuple[int, int]:
        """The longest prompt and row among the well-formed records, for an error's advice."""
        good = [
            r
            for r in records
            if isinstance(r, dict)
            and all(isinstance(r.get(k), str) and r[k].strip() for k in ("prompt", "response"))
        ][:limit]
        lengths = [self._lengths(r) for r in good]
        return max(p for p, _ in lengths), max(t for _, t in lengths)

    def _length_check(self, records: list, limit: int | None, measured: dict):
        """A row check for validate_rows against the limits; it records each row's lengths."""

        def check(row: dict) -> str | None:
            prompt, total = measured[id(row)] = self._lengths(row)
            if self.max_prompt_length is not None and prompt > self.max_prompt_length:
                need = self._longest(records, limit)[0] if self.bad_rows == "error" else prompt
                return (
                    f"field 'prompt' is {prompt} tokens with the chat template, over "
                    f"data.max_prompt_length={self.max_prompt_length}: set data.max_prompt_length={need} "
                    "(the longest prompt of this split) or null (measured from the data)"
                )
            if self.max_length is not None and total > self.max_length:
                need = self._longest(records, limit)[1] if self.bad_rows == "error" else total
                return (
                    f"prompt and real response are {total} tokens (chat template and EOS included), over "
                    f"data.max_length={self.max_length}: set data.max_length={need} (the longest row of "
                    "this split) or null (measured from the data)"
                )
            cap = self.position_limit
            if cap is not None and total > cap:
                return (
                    f"prompt and real response are {total} tokens (chat template and EOS included), over "
                    f"the model's position limit of {cap} tokens: shorten the row"
                )
            return None

        return check

    def _fix_lengths(self, lengths: list[tuple[int, int]]) -> None:
        """Measured limits where none were set: every row fits, and every synthetic response of up
        to max_new_tokens tokens and EOS fits after the longest prompt, within the position limit."""
        if not lengths:
            return
        longest_prompt = max(p for p, _ in lengths)
        measured = []
        if self.max_prompt_length is None:
            self.max_prompt_length = longest_prompt
            measured.append("max_prompt_length")
        if self.max_length is None:
            need = max(max(t for _, t in lengths), longest_prompt + self.max_new_tokens + 1)
            cap = self.position_limit
            if cap is not None and need > cap:
                log.warning(
                    "the longest prompt (%d tokens) leaves room for %d of generation.max_new_tokens=%d "
                    "within the model's position limit of %d: longer synthetic responses are cut",
                    longest_prompt,
                    cap - longest_prompt - 1,
                    self.max_new_tokens,
                    cap,
                )
                need = cap
            self.max_length = need
            measured.append("max_length")
            self._check_pack_length()
        if measured:
            log.info(
                "data.max_prompt_length=%d, data.max_length=%d (%s measured from the data)",
                self.max_prompt_length,
                self.max_length,
                " and ".join(measured),
            )

    # -- tokens -----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt as the chat template renders it, up to the assistant's turn.

        Generation and training both use this, so the opponent answers exactly the
        context that the policy is later scored in.
        """
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        template = self.chat_template or self.tokenizer.chat_template
        if not template:
            raise DataError(
                "the model's tokenizer has no chat template, and generation and training must render "
                "prompts the same way: set data.chat_template=chatml, or to a Jinja template string"
            )
        if self.tokenizer.eos_token_id is None:
            raise DataError("the model's tokenizer has no EOS token: responses could not end")
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_response(self, response: str, budget: int | None) -> list[int]:
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        ids = [*ids, self.tokenizer.eos_token_id]
        return ids[:budget]

    @property
    def pad_token_id(self) -> int:
        # Without a pad token, EOS pads: padded positions are masked out of attention and loss.
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    # -- pairs ------------------------------------------------------------------------------
    def encode_pairs(self, pairs: Sequence[dict]) -> list[dict]:
        """Token ids of each pair; the response budget is what the prompt leaves of max_length."""
        encoded = []
        for i, pair in enumerate(pairs):
            prompt = self.encode_prompt(pair["prompt"])
            budget = None if self.max_length is None else self.max_length - len(prompt)
            item = {"index": i, "prompt": prompt, "real": self.encode_response(pair["real"], budget)}
            for kind in ("synthetic", "proto"):  # SFT rounds train on real responses alone
                if pair.get(kind) is not None:
                    item[kind] = self.encode_response(pair[kind], budget)
            encoded.append(item)
        return encoded

    def set_pairs(self, pairs: Sequence[dict]) -> None:
        """This round's pairs; opponent log-probs, if cached, follow via set_opponent_logps."""
        self.pairs = list(pairs)
        self.encoded = self.encode_pairs(self.pairs)

    def set_opponent_logps(self, logps: torch.Tensor) -> None:
        if logps.shape != (len(self.encoded), 2):
            raise ValueError(
                f"opponent log-probs of shape {tuple(logps.shape)} for {len(self.encoded)} pairs"
            )
        for item in self.encoded:
            item["opponent_logps"] = logps[item["index"]]

    def steps_per_epoch(self, accumulate_grad_batches: int = 1, world_size: int = 1) -> int:
        batches = math.ceil(math.ceil(len(self.encoded) / world_size) / self.batch_size)
        return math.ceil(batches / accumulate_grad_batches)

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """[2B, T] batch: the B real sequences, then the B synthetic ones, right-padded.

        Items without a synthetic response (SFT) give a [B, T] batch of the real ones; items with a
        proto-synthetic response too (T-SPIN) a [3B, T] batch: real, synthetic, then proto.
        """
        seqs, labels = [], []
        kinds = ("real", *(k for k in ("synthetic", "proto") if all(k in item for item in items)))
        for kind in kinds:
            for item in items:
                seqs.append(item["prompt"] + item[kind])
                labels.append([IGNORE_INDEX] * len(item["prompt"]) + item[kind])
        batch = self._packed(seqs, labels) if self.packing else self._padded(seqs, labels)
        batch["index"] = torch.tensor([item["index"] for item in items])
        batch["tokens"] = batch_tokens(batch)  # counted here, on the host, not from device tensors
        # Where the scored targets are, found here on the host: on the device, finding them would
        # make the host wait for the device (the count decides the size) in every forward.
        batch["target_rows"], batch["target_cols"] = target_positions(batch["labels"])
        if self.packing:
            batch["num_sequences"] = len(seqs)
        if all("opponent_logps" in item for item in items):
            batch["opponent_logps"] = torch.stack([item["opponent_logps"] for item in items])
        return batch

    def _padded(self, seqs: list[list[int]], labels: list[list[int]]) -> dict:
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        label_ids = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (seq, lab) in enumerate(zip(seqs, labels, strict=True)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            label_ids[row, : len(lab)] = torch.tensor(lab)
            attention_mask[row, : len(seq)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": label_ids,
            "padding_at_end": True,
        }

    def _packed(self, seqs: list[list[int]], labels: list[list[int]]) -> dict:
        """The same sequences without padding between them: laid end to end in rows of at most
        pack_length tokens (first fit, longest first), positions restarting at 0 for each.

        Without an attention mask, transformers reads the restarts in position_ids as sequence
        boundaries and attends within each sequence only (block-causal), so every sequence is
        scored exactly as in the padded batch. `sequence_ids` says which sequence each token
        belongs to (-1: padding at a row's end), in the padded batch's order.
        """
        capacity = self.pack_length or 2 * max(map(len, seqs))
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
            row = next((r for r in range(len(rows)) if room[r] >= len(seqs[i])), None)
            if row is None:
                rows.append([])
                room.append(capacity)
                row = len(rows) - 1
            rows[row].append(i)
            room[row] -= len(seqs[i])
        width = max(capacity - r for r in room)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        label_ids = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        sequence_ids = torch.full(shape, -1, dtype=torch.long)
        # Padding continues the last sequence's positions, so it starts no new sequence; it is
        # never attended to (causal, at the row's end) and never scored (IGNORE_INDEX).
        position_ids = torch.arange(width).repeat(len(rows), 1)
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                end = start + len(seqs[i])
                input_ids[r, start:end] = torch.tensor(seqs[i])
                label_ids[r, start:end] = torch.tensor(labels[i])
                sequence_ids[r, start:end] = i
                position_ids[r, start:] = torch.arange(width - start)
                start = end
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": label_ids,
            "sequence_ids": sequence_ids,
        }

    def _loader(self, encoded: list[dict], shuffle: bool) -> DataLoader:
        if not encoded:
            raise RuntimeError("no pairs yet: SelfPlayCallback builds them at each round's start")
        if shuffle:
            # Seeded by epoch so that a resumed run sees the same order as an uninterrupted one.
            epoch = self.trainer.current_epoch if self.trainer is not None else 0
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(encoded), generator=generator).tolist()
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            sampler = global_batch_shard(order, self.batch_size, rank, world)
            sampler = Remaining(sampler, self.skip_batches * self.batch_size)
            self.skip_batches = 0
        else:
            sampler = SequentialSampler(encoded)
        return DataLoader(
            encoded,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        # Lightning asks for the loader at every epoch's start, once it has restored the weights,
        # the callbacks' state and the loop counters (sharded strategies restore after
        # on_fit_start): the moment a round starts. Callbacks that define `on_train_dataloader`
        # (SelfPlayCallback) are called first, so the loader serves the round's rows.
        if self.trainer is not None:
            for callback in getattr(self.trainer, "callbacks", ()):
                if hasattr(callback, "on_train_dataloader"):
                    callback.on_train_dataloader(self.trainer, self.trainer.lightning_module)
        return self._loader(self.encoded, shuffle=True)

    def scoring_dataloader(self) -> DataLoader:
        """This round's pairs in order, for scoring them."""
        return self._loader(self.encoded, shuffle=False)
