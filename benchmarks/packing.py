"""The packing lever: our training step on padded batches against packed ones (data.packing).

    python benchmarks/packing.py --device cpu
    python benchmarks/packing.py --device cuda --shape smollm2-135m

Same model shape, the same pairs with lengths drawn uniformly (prompt and each response
between a quarter of and the full --prompt-len / --response-len, as in real SFT data), the
same batches and RMSprop step. Padded: each batch right-padded to its longest sequence.
Packed: the same sequences end to end in rows of at most --pack-length tokens, attention
kept within each sequence. Each side runs in its own subprocess. Prints one JSON line with
both sides' figures, the loss after the last step on each (they must agree) and the ratios
packed/padded. tokens/s counts real (non-padding) tokens only, the same on both sides.

This is a lever measurement, ours against ours; bench against TRL with train_throughput.py.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", choices=sorted(common.SHAPES), default=None)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--pack-length", type=int, default=None, help="tokens per packed row (2 x the longest)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--child", choices=("padded", "packed"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("smollm2-135m" if args.device == "cuda" else "cpu-small")
    return args


def variable_pairs(args) -> list[dict]:
    import random

    pairs = common.random_pairs(
        args.shape, args.batch * (args.warmup + args.steps), args.prompt_len, args.response_len, args.seed
    )
    rng = random.Random(args.seed)
    cut = lambda ids, n: ids[-rng.randint(max(1, n // 4), n) :]  # noqa: E731  (keeps the final EOS)
    for p in pairs:
        p["prompt"] = p["prompt"][: rng.randint(max(1, args.prompt_len // 4), args.prompt_len)]
        p["real"], p["synthetic"] = cut(p["real"], args.response_len), cut(p["synthetic"], args.response_len)
    return pairs


def run_side(args) -> dict:
    import contextlib

    import torch

    from spinlab.data import SelfPlayDataModule
    from spinlab.losses import logistic
    from spinlab.module import SPINModule

    if args.threads:
        torch.set_num_threads(args.threads)
    model = common.build_model(args.shape, args.seed).to(args.device)
    module = SPINModule(
        model, loss=logistic, optimizer=functools.partial(torch.optim.RMSprop, lr=5e-7), opponent="cached"
    ).to(args.device)
    longest = args.prompt_len + args.response_len
    dm = SelfPlayDataModule(
        source=None,
        tokenizer=common.build_tokenizer(args.shape),
        batch_size=args.batch,
        max_length=longest,
        max_prompt_length=args.prompt_len,
        packing=args.child == "packed",
        pack_length=args.pack_length,
        seed=args.seed,
    )
    dm.encoded = variable_pairs(args)
    gpu = args.device == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext
    with autocast():
        dm.set_opponent_logps(module.score_opponent(dm.scoring_dataloader()))
    optimizer = module.configure_optimizers()
    times, losses, tokens, slots = [], [], 0, 0
    for step, batch in enumerate(dm.scoring_dataloader()):  # fixed order: both sides see the same batches
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with autocast():
            out = module.forward_pairs(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out["loss"]))
        times.append(common.now(args.device))
        if step >= args.warmup:
            real = (
                batch["attention_mask"].sum()
                if "attention_mask" in batch
                else (batch["sequence_ids"] >= 0).sum()
            )
            tokens += int(real)
            slots += batch["input_ids"].numel()
    timed_s = times[-1] - times[args.warmup - 1]
    return {
        "side": args.child,
        "torch_threads": torch.get_num_threads(),
        "tokens": tokens,
        "token_slots": slots,
        "padding_share": 1 - tokens / slots,
        "tokens_per_s": tokens / timed_s,
        "peak_memory_gib": common.peak_memory_gib(args.device),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        common.write_result(args.result_file, run_side(args))
        return
    script = Path(__file__).resolve()
    base = ["--device", args.device, "--shape", args.shape, "--batch", str(args.batch)]
    base += ["--prompt-len", str(args.prompt_len), "--response-len", str(args.response_len)]
    base += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    base += ["--pack-length", str(args.pack_length)] if args.pack_length else []
    base += ["--threads", str(args.threads)] if args.threads else []
    sides = {
        side: common.run_child(script, ["--child", side, *base], args.timeout)
        for side in ("padded", "packed")
    }
    padded, packed = sides["padded"], sides["packed"]
    ok = "error" not in padded and "error" not in packed
    common.emit(
        {
            "benchmark": "packing",
            "device": args.device,
            "shape": args.shape,
            "batch": args.batch,
            "prompt_len_max": args.prompt_len,
            "response_len_max": args.response_len,
            "pack_length": args.pack_length or 2 * (args.prompt_len + args.response_len),
            "tokens_per_s_ratio": common.ratio(packed.get("tokens_per_s"), padded.get("tokens_per_s"))
            if ok
            else None,
            "peak_memory_ratio": common.ratio(packed.get("peak_memory_gib"), padded.get("peak_memory_gib"))
            if ok
            else None,
            "last_loss_abs_diff": abs(packed["last_loss"] - padded["last_loss"]) if ok else None,
            "padded": padded,
            "packed": packed,
            "machine": common.machine(),
        }
    )


if __name__ == "__main__":
    main()
