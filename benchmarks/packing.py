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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SIDES = ("padded", "packed")


def parse_args(argv=None):
    parser = common.lever_parser(__doc__, SIDES, batch=8, warmup=1)
    parser.add_argument(
        "--pack-length", type=int, default=None, help="tokens per packed row (2 x the longest)"
    )
    return common.lever_args(parser, argv)


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
    import torch

    from spinlab.data import SelfPlayDataModule, batch_tokens

    if args.threads:
        torch.set_num_threads(args.threads)
    model = common.build_model(args.shape, args.seed, args.device)
    module = common.spin_module(model, args.device)
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
    common.cache_opponent(module, dm, args.device)
    times, losses, tokens, slots = [], [], 0, 0
    for step, (batch, loss, end) in enumerate(common.spin_steps(module, dm, args.device)):
        times.append(end)
        losses.append(loss)
        if step >= args.warmup:
            tokens += batch_tokens(batch)
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
    pack_length = args.pack_length or 2 * (args.prompt_len + args.response_len)
    record = {
        "benchmark": "packing",
        "prompt_len_max": args.prompt_len,
        "response_len_max": args.response_len,
        "pack_length": pack_length,
    }
    common.run_lever(Path(__file__).resolve(), args, SIDES, ["--pack-length", str(pack_length)], record)


if __name__ == "__main__":
    main()
