"""The chunked output layer, ours against ours: plain logits against the chunked log-prob path, per
model family (a Llama, whose output layer is a plain matmul, and a Gemma-2, whose logits are
soft-capped after it, which the chunked path applies chunk by chunk).

    python benchmarks/output_layer.py --device cpu                     # both families, ~2 min
    python benchmarks/output_layer.py --device cpu --families gemma2 --steps 2 --warmup 1
    python benchmarks/output_layer.py --device cuda --shape smollm2-135m --batch 16

Same shape (the benchmark shape's sizes and vocabulary, built as the family's class), pairs,
batches and RMSprop steps on both sides; `plain` sets module.logprob_chunk_size=null (the model's
own [batch, length, vocabulary] logits), `chunked` the default (256 on CPU, 4096 on a GPU).
Prints one JSON line per family: tokens/s, peak memory and the last loss of each side, the ratios
chunked/plain, and how often the chunked side ran the full output layer (once: the check against
the model's own logits on the first batch).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SIDES = ("plain", "chunked")
FAMILIES = ("llama", "gemma2")


def parse_args(argv=None):
    parser = common.lever_parser(__doc__, SIDES, batch=4, warmup=2)
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated: {FAMILIES}")
    parser.add_argument("--family", choices=FAMILIES, default="llama", help="the family of one side")
    return common.lever_args(parser, argv)


def build(family: str, shape: str, seed: int, device: str):
    """The shape as a Llama (common.build_model) or as a Gemma-2 with its released soft-cap (30)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    if family == "llama":
        return common.build_model(shape, seed, device)
    size = common.SHAPES[shape]
    config = Gemma2Config(
        **{k: size[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")},
        **{k: size[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim")},
        max_position_embeddings=size["max_position_embeddings"],
        final_logit_softcapping=30.0,
        bos_token_id=size["bos_token_id"],
        eos_token_id=size["eos_token_id"],
        pad_token_id=size["eos_token_id"],
        use_cache=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return Gemma2ForCausalLM(config).float().train()


def run_side(args) -> dict:
    import torch

    from spinlab.module import AUTO_CHUNK_SIZE

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.family, args.shape, args.seed, args.device)
    probe = common.HeadProbe(model)
    chunk = AUTO_CHUNK_SIZE[args.device] if args.child == "chunked" else None
    module, result = common.lever_side(args, model, logprob_chunk_size=chunk)
    return {
        **result,
        "family": args.family,
        "model_class": type(model).__name__,
        "chunked_matches": getattr(module.scorer, "chunked_matches", None),
        "full_output_layer_calls": probe.take(),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        common.write_result(args.result_file, run_side(args))
        return
    for family in args.families.split(","):
        if family not in FAMILIES:
            raise SystemExit(f"--families: unknown family {family!r}; choose from {FAMILIES}")
        record = {"benchmark": "output_layer", "family": family}
        record |= {"prompt_len": args.prompt_len, "response_len": args.response_len}
        common.run_lever(Path(__file__).resolve(), args, SIDES, ["--family", family], record)


if __name__ == "__main__":
    main()
