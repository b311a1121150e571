"""The torch.compile lever: our SPIN training step with the decoder eager or compiled.

    python benchmarks/compile.py --device cpu
    python benchmarks/compile.py --device cuda --shape smollm2-135m --batch 16

Same model shape, pairs, batches and RMSprop step on both sides; the compiled side wraps the
decoder's forward in torch.compile(dynamic=True) (the output layer runs in our chunked
log-prob code either way). Each side runs in its own subprocess. Prints one JSON line: both
sides' tokens/s over the timed steps, the first step's time on each (compilation lands
there), peak memory, the last loss on each, and the ratios compiled/eager.

A lever measurement, ours against ours; bench against TRL with train_throughput.py.
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
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--child", choices=("eager", "compiled"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("smollm2-135m" if args.device == "cuda" else "cpu-small")
    return args


def run_side(args) -> dict:
    import contextlib

    import torch

    from spinlab.data import SelfPlayDataModule
    from spinlab.losses import logistic
    from spinlab.module import SPINModule

    if args.threads:
        torch.set_num_threads(args.threads)
    model = common.build_model(args.shape, args.seed).to(args.device)
    if args.child == "compiled":
        model.model.forward = torch.compile(model.model.forward, dynamic=True)
    module = SPINModule(
        model, loss=logistic, optimizer=functools.partial(torch.optim.RMSprop, lr=5e-7), opponent="cached"
    ).to(args.device)
    dm = SelfPlayDataModule(
        source=None,
        tokenizer=common.build_tokenizer(args.shape),
        batch_size=args.batch,
        max_length=args.prompt_len + args.response_len,
        max_prompt_length=args.prompt_len,
        seed=args.seed,
    )
    dm.encoded = common.random_pairs(
        args.shape, args.batch * (args.warmup + args.steps), args.prompt_len, args.response_len, args.seed
    )
    gpu = args.device == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext
    with autocast():
        dm.set_opponent_logps(module.score_opponent(dm.scoring_dataloader()))
    optimizer = module.configure_optimizers()
    started = common.now(args.device)
    times, loss = [], None
    for batch in dm.scoring_dataloader():
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with autocast():
            out = module.forward_pairs(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = float(out["loss"].detach())
        times.append(common.now(args.device))
    tokens = args.steps * 2 * args.batch * (args.prompt_len + args.response_len)
    return {
        "side": args.child,
        "torch_threads": torch.get_num_threads(),
        "first_step_s": times[0] - started,
        "tokens_per_s": tokens / (times[-1] - times[args.warmup - 1]),
        "peak_memory_gib": common.peak_memory_gib(args.device),
        "last_loss": loss,
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
    base += ["--threads", str(args.threads)] if args.threads else []
    sides = {s: common.run_child(script, ["--child", s, *base], args.timeout) for s in ("eager", "compiled")}
    eager, compiled = sides["eager"], sides["compiled"]
    ok = "error" not in eager and "error" not in compiled
    ratio = lambda key: common.ratio(compiled.get(key), eager.get(key)) if ok else None  # noqa: E731
    common.emit(
        {
            "benchmark": "compile",
            "device": args.device,
            "shape": args.shape,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "response_len": args.response_len,
            "tokens_per_s_ratio": ratio("tokens_per_s"),
            "peak_memory_ratio": ratio("peak_memory_gib"),
            "last_loss_abs_diff": abs(compiled["last_loss"] - eager["last_loss"]) if ok else None,
            "eager": eager,
            "compiled": compiled,
            "machine": common.machine(),
        }
    )


if __name__ == "__main__":
    main()
