"""A round and the work every process does together in it.

`Round` is the one record of a round's settings and schedule; SelfPlayCallback owns it (and
checkpoints it), the module reads it. How a round's training rows are built is a config choice
(`pairs=synthetic` for SPIN, `pairs=real` for SFT, `pairs=triplets` for T-SPIN); each
builder names the `kinds` of response it provides, which must be those the objective needs. The helpers below run on every process:
under sharding each forward pass needs all of them, so there is no rank-0-only model call.

- `generate_rows`: each process samples its share of the prompts on gathered weights; the rows
  are gathered once (in memory, or through per-process partial files that make generation
  resumable).
- `score_pairs`: summed response log-probs of encoded pairs under a model, pairs spread evenly
  over the processes and gathered once. The callback (opponent log-probs) and the evaluator
  (held-out pairs) both use it.
- `save_policy`: the full state dict gathered to rank 0 and written as a Hugging Face directory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from spinlab.rundir import RunDir, append_jsonl, read_jsonl, replace_dir, write_bytes, write_json, write_jsonl

log = logging.getLogger(__name__)


@dataclass
class Round:
    """A round's settings and schedule, fixed by SelfPlayCallback when the round starts, at the
    global step `start_step`, and checkpointed with it."""

    index: int
    lam: float
    lr: float
    mix_previous_rounds: int
    start_step: int
    total_steps: int
    pairs: int

    def as_dict(self) -> dict:
        return asdict(self)


def round_settings(index: int, base: dict, overrides: dict[int, dict]) -> dict:
    """Settings of round `index`: an override (spinlab.config.round_overrides) applies from its
    round onwards (sticky)."""
    settings = dict(base)
    for start in sorted(overrides):
        if start <= index:
            settings.update(overrides[start])
    return settings


# -- every process together ------------------------------------------------------------------
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
def score_pairs(trainer, module, dm, encoded: list[dict], desc: str, scorer=None) -> torch.Tensor:
    """[N, 2] summed log-probs (real, synthetic) of every encoded pair under `scorer` (the policy's
    by default), on every process; pairs are spread evenly and the result is gathered once.
    trainer=None scores in this process alone (outside a fit)."""
    from tqdm.auto import tqdm

    trainer = trainer or SingleProcess()
    scorer = module.scorer if scorer is None else scorer
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


def save_policy(trainer, module, index: int, out: Path, tokenizer) -> None:
    """The policy after round `index` as a Hugging Face directory (safetensors + tokenizer)."""
    state_dict = module.full_state_dict()  # a collective under sharding: every process calls it
    if trainer.is_global_zero:
        log.info("round %d: saving the policy to %s", index, out)
        tmp = out.with_name(out.name + ".tmp")
        module.policy.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    trainer.strategy.barrier("round model")


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


# -- how a round's rows are built (config group `pairs`) --------------------------------------
class RealPairs:
    """SFT rounds: the real responses alone; nothing is generated or scored."""

    kinds = ("real",)

    def build(self, trainer, module, rnd: Round, run_dir: RunDir, generator, num_samples: int) -> list[dict]:
        dm = trainer.datamodule
        return [{"prompt": r["prompt"], "real": r["response"]} for r in dm.load_split("train")]

    def opponent_logps(self, trainer, module, rnd: Round, run_dir: RunDir) -> torch.Tensor | None:
        return None


class SyntheticPairs:
    """SPIN rounds: one synthetic response per prompt from the opponent (the policy as the round
    begins), plus the pairs of `mix_previous_rounds` earlier rounds. With `opponent="cached"` the
    opponent's log-probs of every pair are computed once here and travel with the batches."""

    kinds = ("real", "synthetic")

    def __init__(self, opponent: str = "cached"):
        if opponent not in ("cached", "model"):
            raise ValueError(f"opponent={opponent!r} is not one of ('cached', 'model')")
        self.opponent = opponent

    def build(self, trainer, module, rnd: Round, run_dir: RunDir, generator, num_samples: int) -> list[dict]:
        pairs = list(self.synthetic(trainer, module, rnd.index, run_dir, generator, num_samples))
        for earlier in range(max(0, rnd.index - rnd.mix_previous_rounds), rnd.index):
            pairs += read_jsonl(run_dir.synthetic(earlier))
        return pairs

    def synthetic(
        self, trainer, module, index: int, run_dir: RunDir, generator, num_samples: int
    ) -> list[dict]:
        """This round's pairs, generated by the opponent; read back from disk when present."""
        final = run_dir.synthetic(index)
        if final.exists():
            return read_jsonl(final)
        dm = trainer.datamodule
        rows = dm.load_split("train")
        # Batches are seeded by their content, so the result does not depend on the process count.
        out = generate_rows(
            trainer,
            module,
            generator,
            dm.tokenizer,
            [dm.encode_prompt(r["prompt"]) for r in rows],
            round_index=index,
            desc=f"round {index} generate",
            partial=lambda rank: run_dir.synthetic_partial(index, rank),
            weights=lambda: policy_weights(trainer, module, dm.tokenizer, run_dir, index),
        )
        if trainer.is_global_zero:
            pairs = []
            for i, row in enumerate(rows):
                meta = {k: v for k, v in row.items() if k not in ("prompt", "response")}
                gen = out["rows"][i]
                meta.update(round=index, tokens=gen["tokens"], finished=gen["finished"])
                pairs.append(
                    {
                        "prompt": row["prompt"],
                        "real": row["response"],
                        "synthetic": gen["synthetic"],
                        "meta": meta,
                    }
                )
            write_jsonl(final, pairs)
            for path in run_dir.round_dir(index).glob("synthetic.partial*.jsonl"):
                path.unlink()
            write_json(run_dir.round_stats(index), {"generation": out["stats"], "pairs": len(pairs)})
            write_jsonl(run_dir.round_dir(index) / "samples.jsonl", pairs[:num_samples])
        trainer.strategy.barrier("synthetic data")
        return read_jsonl(final)

    def opponent_logps(self, trainer, module, rnd: Round, run_dir: RunDir) -> torch.Tensor | None:
        if self.opponent != "cached":
            return None
        path = run_dir.opponent_logps(rnd.index)
        if not path.exists():
            dm = trainer.datamodule
            logps = score_pairs(trainer, module, dm, dm.encoded, desc=f"round {rnd.index} opponent")
            if trainer.is_global_zero:
                buffer = io.BytesIO()
                torch.save(logps, buffer)
                write_bytes(path, buffer.getvalue())
            trainer.strategy.barrier("opponent log-probs")
            return logps
        return torch.load(path, weights_only=True)


class TripletPairs(SyntheticPairs):
    """T-SPIN rounds: each pair of SyntheticPairs plus the prompt's proto-synthetic response, a
    sample of the initial policy θ_0 that stays the same in every round. Nothing is cached:
    T-SPIN uses no opponent log-probs.

    Round 0's opponent is θ_0, so round 0's synthetic responses are samples of θ_0: they become
    the proto-synthetic responses, written once to `rounds/proto.jsonl` and read back from there
    in every later round and on resume. Generating them again would give the same text, because
    generation is seeded by each batch's content.
    """

    kinds = ("real", "synthetic", "proto")

    def __init__(self):
        super().__init__(opponent="cached")

    def build(self, trainer, module, rnd: Round, run_dir: RunDir, generator, num_samples: int) -> list[dict]:
        pairs = super().build(trainer, module, rnd, run_dir, generator, num_samples)
        proto = {r["prompt"]: r["proto"] for r in self.proto(trainer, run_dir)}
        missing = [p["prompt"] for p in pairs if p["prompt"] not in proto]
        if missing:
            raise RuntimeError(
                f"{run_dir.proto}: no proto-synthetic response for {len(missing)} prompts of round "
                f"{rnd.index} (first: {missing[0]!r}); the training prompts changed since round 0: "
                "start a new run"
            )
        return [{**p, "proto": proto[p["prompt"]]} for p in pairs]

    def proto(self, trainer, run_dir: RunDir) -> list[dict]:
        """The proto-synthetic responses: read back when present, else taken from round 0."""
        path = run_dir.proto
        if not path.exists():
            first = run_dir.synthetic(0)
            if not first.exists():
                raise RuntimeError(
                    f"{path} is missing and so is {first}, the samples of θ_0 it is made from: the run "
                    "directory lost round 0's data; start a new run"
                )
            if trainer.is_global_zero:
                rows = [
                    {
                        "prompt": r["prompt"],
                        "proto": r["synthetic"],
                        "meta": {k: r["meta"][k] for k in ("round", "tokens", "finished") if k in r["meta"]},
                    }
                    for r in read_jsonl(first)
                ]
                write_jsonl(path, rows)
            trainer.strategy.barrier("proto-synthetic data")
        return read_jsonl(path)

    def opponent_logps(self, trainer, module, rnd: Round, run_dir: RunDir) -> torch.Tensor | None:
        return None
