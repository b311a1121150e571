"""The GPU paths on families other than Llama: a check, not a speed measurement.

    python benchmarks/families_check.py --device cuda               # gpu_check.sh's family step, ~1 min
    python benchmarks/families_check.py --device cpu --shape toy    # the same steps at toy size (make test)

For a Qwen3- and a Gemma-2-shaped model (the shape's sizes built as each family's class; Gemma-2
with its released final-logit soft-cap of 30, eager attention and a sliding window as long as the
context), in the settings `trainer=gpu` uses:
- **bf16 and compiled layers**: the decoder layers under torch.compile (`module.compile_layers`),
  bf16 autocast over fp32 weights; the chunked log-prob path's check against the model's own
  logits on the first batch (it must pass: no fallback), then training steps of PolicyModule
  with the cached opponent (every loss finite);
- **the static decoder** (`generation=static`, its decode step in a CUDA graph on a GPU): greedy
  text in float32 equal to transformers' greedy `generate`, prompt by prompt.
Prints one JSON line per family; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

FAMILIES = ("qwen3", "gemma2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument(
        "--shape", choices=sorted(common.SHAPES), default=None, help="smollm2-135m on GPU, tiny on CPU"
    )
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--batch", type=int, default=8, help="pairs per training step")
    p.add_argument("--steps", type=int, default=3, help="training steps")
    p.add_argument("--prompts", type=int, default=8, help="prompts decoded greedily")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compile", choices=("on", "off", "auto"), default="auto", help="auto: on a GPU only")
    args = p.parse_args(argv)
    args.shape = args.shape or ("smollm2-135m" if args.device == "cuda" else "toy")
    return args


def build(family: str, shape: str, seed: int = 0):
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    size = dict(common.SHAPES[shape])
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    settings = {k: size[k] for k in (*keep, "num_key_value_heads", "head_dim", "max_position_embeddings")}
    settings |= {"bos_token_id": size["bos_token_id"], "eos_token_id": size["eos_token_id"]}
    settings |= {"pad_token_id": size["eos_token_id"], "tie_word_embeddings": size["tie_word_embeddings"]}
    if family == "qwen3":
        config, model_class = Qwen3Config(**settings), Qwen3ForCausalLM
    else:
        window = size["max_position_embeddings"]
        config = Gemma2Config(**settings, final_logit_softcapping=30.0, sliding_window=window)
        model_class = Gemma2ForCausalLM
    torch.manual_seed(seed)
    model = model_class(config).float()
    with torch.no_grad():  # logits as large as a trained checkpoint's, so that the soft-cap matters
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def check_training(family: str, args) -> dict:

    from spinlab.data import SelfPlayDataModule
    from spinlab.module import AUTO_COMPILE, compile_decoder_layers

    model = build(family, args.shape).to(args.device).train()
    compiled = args.compile == "on" or (args.compile == "auto" and AUTO_COMPILE[args.device])
    if compiled:
        compile_decoder_layers(model)
    module = common.spin_module(model, args.device, lr=1e-6, logprob_chunk_size="auto")
    dm = SelfPlayDataModule(
        source=None, tokenizer=common.build_tokenizer(args.shape), batch_size=args.batch, max_length=96,
        max_prompt_length=48, seed=0,
    )  # fmt: skip
    dm.encoded = common.random_pairs(args.shape, args.batch * args.steps, 48, 48)
    common.cache_opponent(module, dm, args.device)  # bf16 autocast on a GPU: the check runs under it
    losses = [loss for _, loss, _ in common.spin_steps(module, dm, args.device)]
    return {
        "compiled_layers": compiled,
        "chunked_matches": module.scorer.chunked_matches,
        "check": module.scorer.check,
        "losses": losses,
        "ok": module.scorer.chunked_matches is True and all(map(math.isfinite, losses)),
    }


def check_static(family: str, args) -> dict:
    import torch

    from spinlab.generation import StaticCacheGenerator

    model = build(family, args.shape).to(args.device).eval()
    tokenizer = common.build_tokenizer(args.shape)
    eos = tokenizer.eos_token_id
    g = torch.Generator().manual_seed(1)
    vocab = common.SHAPES[args.shape]["vocab_size"]
    prompts = [
        torch.randint(3, vocab, (int(n),), generator=g).tolist()
        for n in torch.randint(8, 40, (args.prompts,))
    ]
    want = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                input_ids=torch.tensor([ids], device=args.device), max_new_tokens=args.new_tokens,
                do_sample=False, eos_token_id=eos, pad_token_id=eos,
            )[0, len(ids) :].tolist()  # fmt: skip
            want.append(
                tokenizer.decode(out[: out.index(eos)] if eos in out else out, skip_special_tokens=True)
            )
    rows = {}
    generator = StaticCacheGenerator(
        max_new_tokens=args.new_tokens, batch_size=min(8, len(prompts)), do_sample=False, cuda_graph=True
    )
    stats = generator.generate(
        model, tokenizer, prompts, lambda batch: rows.update({r["index"]: r for r in batch})
    )
    got = [rows[i]["synthetic"] for i in range(len(prompts))]
    equal = sum(a == b for a, b in zip(got, want, strict=True))
    return {
        "loop": stats.get("loop", "spinlab"),
        "cuda_graph": stats.get("cuda_graph"),
        "greedy_equal": f"{equal}/{len(prompts)}",
        "ok": equal == len(prompts) and stats.get("loop", "spinlab") == "spinlab",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    failed = False
    for family in args.families.split(","):
        if family not in FAMILIES:
            raise SystemExit(f"--families: unknown family {family!r}; choose from {FAMILIES}")
        record = {"benchmark": "families_check", "family": family, "device": args.device, "shape": args.shape}
        for name, check in (("training", check_training), ("static", check_static)):
            try:
                record[name] = check(family, args)
            except Exception as err:  # one family's failure is reported, the others still run
                record[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            failed |= not record[name]["ok"]
        record["machine"] = common.machine()
        common.emit(record)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
