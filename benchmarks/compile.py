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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SIDES = ("eager", "compiled")


def parse_args(argv=None):
    parser = common.lever_parser(__doc__, SIDES, batch=4, warmup=2)
    parser.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend of the compiled side (the toy-size check uses eager: dynamo's "
        "tracing without code generation, which takes a minute on CPU)",
    )
    return common.lever_args(parser, argv)


def run_side(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = common.build_model(args.shape, args.seed, args.device)
    if args.child == "compiled":
        model.model.forward = torch.compile(model.model.forward, dynamic=True, backend=args.backend)
    return common.lever_side(args, model)[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        common.write_result(args.result_file, run_side(args))
        return
    record = {
        "benchmark": "compile",
        "backend": args.backend,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
    }
    common.run_lever(Path(__file__).resolve(), args, SIDES, ["--backend", args.backend], record)


if __name__ == "__main__":
    main()
