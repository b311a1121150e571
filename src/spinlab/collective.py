"""Work every process does together: under sharding each forward pass needs all of them, so
no model call is made by rank 0 alone.

- `generate_rows`: each process samples its share of the prompts on gathered weights; the rows
  are gathered once (in memory, or through per-process partial files that make generation
  resumable).
- `score_pairs`: summed response log-probs of encoded pairs under a model, pairs spread evenly
  over the processes and gathered once. The self-play pairs (opponent log-probs) and the
  evaluator (held-out pairs) both use it.
- `save_policy`, `policy_weights`: the full state dict gathered to rank 0 and written as a Hugging
  Face directory (a round's model; the weights a generation engine loads from disk).
- `SingleProcess`: what these need of a Lightning trainer, for use outside a fit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from spinlab.rundir import RunDir, append_jsonl, read_jsonl, replace_dir

log = logging.getLogger(__name__)


class _Strategy:
    def barrier(self, name=None) -> None:
        pass

    def broadcast(self, obj):
        return obj


class SingleProcess:
    """What the helpers below need of a Lightning trainer, for use outside a fit: one process."""

    global_rank, world_size, is_global_zero = 0, 1, True
    strategy = _Strategy()
    loggers = ()

    class precision_plugin:
        forward_context = staticmethod(contextlib.nullcontext)


def even_shard(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Indices 0..n-1 for this process, every process getting the same number of whole batches
    (the list wraps around), so all of them make the same number of forward passes."""
    if world == 1:
        return list(range(n))
    per_rank = -(-n // world)
    per_rank = -(-per_rank // batch_size) * batch_size
    return [(rank * per_rank + i) % n for i in range(per_rank)]


def all_gather_objects(obj, world: int) -> list:
    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def score_pairs(trainer, module, dm, encoded: list[dict], desc: str) -> torch.Tensor:
    """[N, 2] summed log-probs (real, synthetic) of every encoded pair under the policy, on every
    process; pairs are spread evenly and the result is gathered once.
    trainer=None scores in this process alone (outside a fit)."""
    from tqdm.auto import tqdm

    trainer = trainer or SingleProcess()
    scorer = module.scorer
    rank, world = trainer.global_rank, trainer.world_size
    mine = even_shard(len(encoded), dm.batch_size, rank, world)
    loader = DataLoader([encoded[i] for i in mine], batch_size=dm.batch_size, collate_fn=dm.collate)
    was_training = scorer.training
    scorer.eval()
    parts = []
    try:
        with trainer.precision_plugin.forward_context():
            for batch in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, disable=rank != 0):
                batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                real, synthetic = scorer(batch).chunk(2)
                parts.append(torch.stack([real, synthetic], -1).float())
    finally:
        scorer.train(was_training)
    local = torch.cat(parts) if parts else torch.zeros(0, 2, device=module.device)
    index = torch.tensor(mine, dtype=torch.long, device=module.device)
    if world > 1:
        local = trainer.strategy.all_gather(local).reshape(-1, 2)
        index = trainer.strategy.all_gather(index).reshape(-1)
    out = torch.zeros(len(encoded), 2)
    out[index.cpu()] = local.cpu()
    return out


def generate_rows(
    trainer,
    module,
    generator,
    tokenizer,
    prompt_ids: list[list[int]],
    round_index: int,
    desc: str,
    partial: Callable[[int], Path] | None = None,
    weights: Callable[[], Path] | None = None,
) -> dict:
    """{"rows": {index: {index, synthetic, tokens, finished}}, "stats": {...}} for every prompt,
    on every process (trainer=None: in this process alone, outside a fit).

    Each process generates its share on the policy's gathered weights, or, for a backend that
    loads them from disk (`generator.loads_weights`, generation=vllm), on the directory that
    `weights()` names (see `policy_weights`). With `partial` (a path per rank), finished batches
    are appended there as they complete and skipped when the call is repeated after a crash; the
    rows are then read back from all partial files.
    """
    trainer = trainer or SingleProcess()
    rank, world = trainer.global_rank, trainer.world_size
    paths = (
        (lambda: sorted(partial(0).parent.glob(partial(0).name.replace(".jsonl", "*.jsonl"))))
        if partial
        else None
    )
    done: set[int] = set()
    if partial:
        done = {r["index"] for path in paths() for r in read_jsonl(path, drop_torn_tail=True)}
        if done and rank == 0:
            log.info("%s: resuming generation, %d of %d prompts done", desc, len(done), len(prompt_ids))
    rows: list[dict] = []

    def on_batch(batch_rows: list[dict]) -> None:
        new = [r for r in batch_rows if r["index"] not in done]
        if partial:
            append_jsonl(partial(rank), new)
            log.info("round %d: generation batch written (%d responses)", round_index, len(new))
        else:
            rows.extend(new)

    synced = module.sharded and not module.gather_for_generation
    if getattr(generator, "loads_weights", False):
        if weights is None:
            raise ValueError(
                f"{desc}: generation={generator.backend} loads the weights from a directory; none given"
            )
        context, extra = contextlib.nullcontext(), {"weights": weights()}
    else:
        context = module.gathered_weights(root_only=synced)
        extra = {"synced": True} if synced else {}
    with context, trainer.precision_plugin.forward_context():
        stats = generator.generate(
            module.policy,
            tokenizer,
            prompt_ids,
            on_batch=on_batch,
            done=done,
            round_index=round_index,
            desc=desc,
            shard=(rank, world),
            **extra,
        )
    if partial:
        trainer.strategy.barrier("generation shards")
        gathered = {r["index"]: r for path in paths() for r in read_jsonl(path, drop_torn_tail=True)}
    else:
        gathered = {r["index"]: r for part in all_gather_objects(rows, world) for r in part}
    missing = set(range(len(prompt_ids))) - gathered.keys()
    if missing:
        raise RuntimeError(f"{desc}: generation left {len(missing)} prompts without a response")
    # Counts add up over the processes; the phase lasts as long as its slowest process.
    totals = all_gather_objects(stats, world)
    merged = dict(totals[0])
    for key in ("new_tokens", "responses", "truncated"):
        if key in merged:
            merged[key] = sum(s[key] for s in totals)
    merged["seconds"] = max(s["seconds"] for s in totals)
    merged["tokens_per_s"] = merged["new_tokens"] / max(merged["seconds"], 1e-9)
    return {"rows": gathered, "stats": merged}


def save_policy(trainer, module, index: int, out: Path, tokenizer) -> str | None:
    """The policy after round `index` as a Hugging Face directory (safetensors + tokenizer).
    Returns the digest of the weights saved (`weights_digest`) on global rank 0, None elsewhere."""
    state_dict = module.full_state_dict()  # a collective under sharding: every process calls it
    digest = None
    if trainer.is_global_zero:
        digest = weights_digest(module.policy.state_dict() if state_dict is None else state_dict)
        log.info("round %d: saving the policy to %s", index, out)
        tmp = out.with_name(out.name + ".tmp")
        module.policy.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    trainer.strategy.barrier("round model")
    return digest


def weights_digest(state_dict: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, from memory (no file is read)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def policy_weights(trainer, module, tokenizer, run_dir: RunDir, trained_rounds: int) -> Path:
    """A Hugging Face directory with the policy's weights after `trained_rounds` rounds, for a
    backend that loads them from disk (generation=vllm); every process calls it.

    Before training: the model's own directory. After round t: hf/round_t, which the round saved.
    A model built in code (model=tiny), LoRA adapters merged into their model, or a policy whose
    directory is missing is saved once under <run_dir>/engine/ (LoRA: the latest merged copy only).
    """
    trainer = trainer or SingleProcess()
    lora = hasattr(module.policy, "merge_and_unload")
    if not lora:
        saved = run_dir.hf(trained_rounds - 1) if trained_rounds > 0 else None
        source = saved or Path(str(getattr(module.policy, "name_or_path", "") or "."))
        if (source / "config.json").is_file():
            return source
    out = run_dir.root / "engine" / f"policy_after_{trained_rounds:03d}"
    if not trainer.strategy.broadcast(out.exists()):
        state = module.full_state_dict()  # a collective under sharding
        if trainer.is_global_zero:
            log.info("saving the policy after %d rounds for the generation engine to %s", trained_rounds, out)
            model = module.policy
            if lora:
                import copy

                model = copy.deepcopy(model).merge_and_unload()
            tmp = out.with_name(out.name + ".tmp")
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            replace_dir(tmp, out)
            if lora:
                for old in out.parent.glob("policy_after_*"):
                    if old != out:
                        shutil.rmtree(old, ignore_errors=True)
        trainer.strategy.barrier("engine weights")
    return out
