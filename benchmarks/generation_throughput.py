"""Generation throughput: every spinlab backend against plain Hugging Face `generate`.

    python benchmarks/generation_throughput.py --device cpu                      # cpu-small, all backends
    python benchmarks/generation_throughput.py --device cuda --shape llama-1b --batch 256
    python benchmarks/generation_throughput.py --device cuda --gpu-suite         # 135M and 1B, batch 64 and 256
    python benchmarks/generation_throughput.py --device cuda --shape llama-1b --batch 256 \
        --backends static,static@eager --check-greedy both                      # the static loop, graph on and off

All sides sample from the same random-init model with the same prompts (random token ids,
fixed seed, equal lengths) and the same settings (temperature 1, top-p 1, top-k 0, the same
max_new_tokens); `batch` prompts per generate call, `--batches` of them timed.

- plain (the peer): `model.generate` on left-padded batches with the default dynamic KV cache,
  nothing of spinlab's.
- vllm: `spinlab.generation.vllm.VLLMGenerator` from `conf/generation/vllm.yaml`, the model saved to
  a temporary directory, all timed prompts in one phase: `new_tokens_per_s` includes the engine's
  start (a round pays it once per phase), `new_tokens_per_s_after_engine_start` does not. Its
  interpreter: SPINLAB_VLLM_PYTHON, else .venv-vllm/bin/python (`make vllm` builds it on CPU).
- hf, static: `spinlab.generation` built from `conf/generation/<backend>.yaml` (its engine
  settings as configured; `--engine-kwargs` overrides them), through the same `generate(...)`
  call that makes each round's synthetic responses (batched by length, rows decoded and handed
  back).
- backend@variant: a backend with other settings, measured against the same plain side:
  `static@eager` (spinlab's loop, no CUDA graph), `static@generate` (transformers' generate with
  its static cache); any other name takes its settings from `--engine-kwargs`.

`--check-greedy [run|float32|both]`: after timing, each backend decodes the first timed batch
greedily in the same process and compares its tokens with plain `generate`'s (greedy), in the
timed dtype and/or with the model cast to float32; `greedy_check` in the JSON line (per dtype)
counts identical rows and, for a row that differs, the logit gap at the first differing step. In
bf16 two correct implementations part at near-ties (logits a bf16 step apart, frequent with random
weights); float32 is where "identical" is expected.

Each side runs in its own subprocess, `--repeats` times, alternating, and the fastest run of
each side is compared (on a shared CPU a run can only be slowed down by others). The first batch
of each run is a warm-up of the same shape and is not timed (it also triggers compilation for
`static` on a GPU). On CPU every side runs with 1 torch thread unless --threads says otherwise:
a decode step is a chain of tiny matrix products, and on a loaded 2-core box each of them waits
at an OpenMP barrier for the second thread (2 threads measured 8-15x slower than 1 there). New
tokens count every sampled token up to and including the first EOS. On a GPU the model is cast
to bf16. One JSON line per backend, with `new_tokens_per_s_ratio` = backend / plain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

DEFAULTS = {  # shape: (batch, prompt, new tokens)
    "toy": (2, 8, 4),
    "cpu-small": (8, 128, 32),
    "smollm2-135m": (64, 256, 256),
    "llama-1b": (64, 256, 256),
}
BACKENDS = ("hf", "static", "vllm")
# A backend with other settings, named backend@variant; --engine-kwargs may define more.
VARIANTS = {
    "static@eager": {"cuda_graph": False},  # spinlab's loop without the CUDA graph
    "static@generate": {"loop": "generate"},  # transformers' generate with its static cache
}
GPU_SUITE = [(shape, batch) for shape in ("smollm2-135m", "llama-1b") for batch in (64, 256)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--shape", choices=sorted(common.SHAPES), default=None, help="cpu-small on CPU, smollm2-135m on GPU"
    )
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated, of {', '.join(BACKENDS)}, {', '.join(VARIANTS)}, or backend@name with "
        "its settings in --engine-kwargs",
    )
    p.add_argument("--batch", type=int, default=None, help="prompts per generate call (CPU 8, GPU 64)")
    p.add_argument("--batches", type=int, default=None, help="timed batches (CPU 2, GPU 1)")
    p.add_argument("--prompt-len", type=int, default=None, help="CPU 128, GPU 256")
    p.add_argument("--new-tokens", type=int, default=None, help="max_new_tokens (CPU 32, GPU 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads on every side (CPU default 1: see the module docstring)",
    )
    p.add_argument(
        "--engine-kwargs",
        default="{}",
        help='JSON {backend: {key: value}} over conf/generation/<backend>.yaml, e.g. \'{"static": {"eos_check_every": 8}}\'',
    )
    p.add_argument(
        "--check-greedy",
        nargs="?",
        const="run",
        choices=("run", "float32", "both"),
        default=None,
        help="after timing, each backend decodes the first timed batch greedily and compares its tokens "
        "with plain generate's (greedy_check in the JSON line): in the timed dtype (run, the default), in "
        "float32 (the model cast after timing), or both",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing, each backend generates one more batch under torch.profiler: DIR/profile_<backend>.txt "
        "holds the operators by self time (device time on a GPU), the JSON line the top ones and the time per "
        "decode step",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="subprocesses per side, alternating; the best of each side is compared (CPU 2, GPU 1)",
    )
    p.add_argument(
        "--gpu-suite",
        action="store_true",
        help="run the GPU shapes one after the other: "
        + ", ".join(f"{s} batch {b}" for s, b in GPU_SUITE)
        + "; 256 new tokens, prompt 256, bf16",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per side and run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if args.gpu_suite and not gpu:
        p.error("--gpu-suite needs --device cuda")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.engine_kwargs = json.loads(args.engine_kwargs) if isinstance(args.engine_kwargs, str) else {}
    for label in args.backends:
        base, variant = label.partition("@")[::2]
        if base not in BACKENDS or (variant and label not in VARIANTS and label not in args.engine_kwargs):
            p.error(
                f"--backends: unknown {label!r}; choose from {', '.join(BACKENDS)}, {', '.join(VARIANTS)}, "
                "or name backend@variant with its settings in --engine-kwargs"
            )
    args.shape = args.shape or ("smollm2-135m" if gpu else "cpu-small")
    batch, prompt, new = DEFAULTS[args.shape]
    args.batch = args.batch or batch
    args.prompt_len = args.prompt_len or prompt
    args.new_tokens = args.new_tokens or new
    args.batches = args.batches or (1 if gpu else 2)
    args.repeats = args.repeats or (1 if gpu else 2)
    if args.threads is None and not gpu:
        args.threads = 1
    return args


def load(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = common.build_model(args.shape, args.seed, args.device)
    if args.device == "cuda":
        model = model.to(device="cuda", dtype=torch.bfloat16)
    model.eval()
    model.config.use_cache = True
    model.generation_config.use_cache = True
    tokenizer = common.build_tokenizer(args.shape)
    pairs = common.random_pairs(args.shape, args.batch * (1 + args.batches), args.prompt_len, 2, args.seed)
    prompts = [p["prompt"] for p in pairs]
    return model, tokenizer, prompts


def count_new(tokens: list[int], eos: int) -> int:
    """Sampled tokens up to and including the first EOS (the count spinlab's generators report)."""
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


def run_plain(args) -> dict:
    import torch

    from spinlab.generation import left_pad

    model, tokenizer, prompts = load(args)
    result = {
        "side": "transformers generate (dynamic cache)",
        "memory_after_model": common.memory_probe(args.device),
    }
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    @torch.no_grad()
    def generate(batch: list[list[int]], seed: int) -> int:
        width = max(map(len, batch))
        input_ids, attention_mask = left_pad(batch, width, pad)
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=input_ids.to(args.device),
            attention_mask=attention_mask.to(args.device),
            max_new_tokens=args.new_tokens,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        return sum(count_new(row[width:].tolist(), eos) for row in out)

    generate(prompts[: args.batch], args.seed)  # warm-up
    started, cpu = common.now(args.device), common.cpu_now()
    new_tokens = 0
    for b in range(1, 1 + args.batches):
        new_tokens += generate(prompts[b * args.batch : (b + 1) * args.batch], args.seed + b)
    return finish(args, result, new_tokens, common.now(args.device) - started, common.cpu_now() - cpu)


def build_generator(args, label: str):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    backend = label.partition("@")[0]
    cfg = OmegaConf.load(common.REPO / "conf" / "generation" / f"{backend}.yaml")
    cfg.merge_with(
        {
            "seed": args.seed,
            "max_new_tokens": args.new_tokens,
            "batch_size": args.batch,
            "do_sample": True,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            **VARIANTS.get(label, {}),
            **args.engine_kwargs.get(label, {}),
        }
    )
    return instantiate(cfg), OmegaConf.to_container(cfg)


def run_backend(args) -> dict:
    if args.child == "vllm":
        return run_vllm(args)
    model, tokenizer, prompts = load(args)
    generator, cfg = build_generator(args, args.child)
    result = {
        "side": f"spinlab generation={args.child}",
        "config": cfg,
        "memory_after_model": common.memory_probe(args.device),
    }

    def ignore(rows):
        pass

    generator.generate(model, tokenizer, prompts[: args.batch], on_batch=ignore, desc="warm-up")
    started, cpu = common.now(args.device), common.cpu_now()
    stats = generator.generate(model, tokenizer, prompts[args.batch :], on_batch=ignore, round_index=1)
    seconds, cpu_s = common.now(args.device) - started, common.cpu_now() - cpu
    result["generator_stats"] = stats
    result = finish(args, result, stats["new_tokens"], seconds, cpu_s)
    if args.profile:
        result["profile"] = profile_batch(
            args, generator, model, tokenizer, prompts[args.batch : 2 * args.batch]
        )
    if args.check_greedy:
        checked = prompts[args.batch : 2 * args.batch]
        result["greedy_check"] = {}
        if args.check_greedy in ("run", "both"):
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            result["greedy_check"][dtype] = greedy_check(model, tokenizer, checked, generator)
        if args.check_greedy in ("float32", "both"):
            result["greedy_check"]["float32"] = greedy_check(model.float(), tokenizer, checked, generator)
    return result


def profile_batch(args, generator, model, tokenizer, prompts: list[list[int]], top: int = 12) -> dict:
    """One batch under torch.profiler, after the timed ones (the profiler slows what it watches).

    Writes DIR/profile_<backend>.txt (every operator by self time) and returns the top operators
    and the wall time per decode step. Under a CUDA graph the replay is one launch: the `@eager`
    variant of the same backend shows the step's kernels one by one.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    gpu = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    started = common.now(args.device)
    with profile(activities=activities) as prof:
        stats = generator.generate(model, tokenizer, prompts, on_batch=lambda rows: None, round_index=2)
        common.sync(args.device)
    seconds = common.now(args.device) - started
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=-1)
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{args.child.replace('@', '_')}.txt").write_text(table)
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    steps = stats.get("decode_steps") or args.new_tokens
    return {
        "sort_by": key,
        "seconds_under_profiler": seconds,
        "seconds_per_decode_step": seconds / max(steps, 1),
        "top": [{"name": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3} for e in events],
        "torch": torch.__version__,
    }


def greedy_check(model, tokenizer, prompts: list[list[int]], generator, detail: int = 16) -> dict:
    """Greedy tokens of the backend against plain `generate`'s on the same prompts and model.

    Both are cut after the first EOS. For a row that differs, the logits of the model at the
    first differing step (one forward over the prompt and plain generate's tokens before it) say
    whether it is a near-tie: `gap` is the logit of generate's token minus that of ours.
    """
    import torch

    from spinlab.generation import left_pad
    from spinlab.generation.base import Phase

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    greedy = generator.greedy()
    if greedy.batch_size == "auto":
        greedy.batch_size = greedy.auto_batch_size(model, prompts)
    ours: dict[int, list[int]] = {}

    def keep(rows):
        ours.update(rows)

    config = greedy.generation_config(model, eos, pad)
    with torch.no_grad():
        phase = Phase(round_index=0, done=frozenset(), shard=(0, 1), synced=False, spare_calls=0)
        greedy._run(model, prompts, greedy.batches(prompts), keep, config, phase)
        width = max(map(len, prompts))
        input_ids, attention_mask = left_pad(prompts, width, pad)
        device = next(model.parameters()).device
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=generator.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )[:, width:].tolist()

    def cut(tokens):
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    matched = total = 0
    differing = []
    for i, ref in enumerate(out):
        ref, got = cut(ref), cut(ours[i])
        same = next(
            (k for k, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got))
        )
        matched += same
        total += len(ref)
        if ref != got:
            differing.append((i, same, ref, got))
    divergences = []
    with torch.no_grad():
        for i, step, ref, got in differing[:detail]:
            ids = torch.tensor([[*prompts[i], *ref[:step]]], device=device)
            logits = model(input_ids=ids).logits[0, -1].float()
            top2 = logits.topk(2).values
            ref_tok = ref[step] if step < len(ref) else None
            our_tok = got[step] if step < len(got) else None
            divergences.append(
                {
                    "index": i,
                    "step": step,
                    "generate_token": ref_tok,
                    "our_token": our_tok,
                    "gap": (logits[ref_tok] - logits[our_tok]).item()
                    if ref_tok is not None and our_tok is not None
                    else None,
                    "top2_gap": (top2[0] - top2[1]).item(),
                    "logit_scale": logits.abs().max().item(),
                }
            )
    return {
        "prompts": len(prompts),
        "identical_rows": len(prompts) - len(differing),
        "identical": not differing,
        "matched_token_share": matched / max(total, 1),
        "divergences": divergences,
    }


def run_vllm(args) -> dict:
    """generation=vllm: the random model saved to a directory, then one whole generation phase
    over all timed prompts, the engine's start included (each phase starts its own engine; no
    warm-up phase). The engine runs in a child process under `python` (default: SPINLAB_VLLM_PYTHON,
    else .venv-vllm/bin/python): process_cpu_s and the peak RSS are this process's, not the engine's."""
    import os
    import tempfile

    model, tokenizer, prompts = load(args)
    python = os.environ.get("SPINLAB_VLLM_PYTHON") or str(common.REPO / ".venv-vllm" / "bin" / "python")
    args.engine_kwargs.setdefault("vllm", {}).setdefault("python", python)
    generator, cfg = build_generator(args, "vllm")  # dtype null: the model's (fp32 on CPU, bf16 on a GPU)
    result = {
        "side": "spinlab generation=vllm",
        "config": cfg,
        "memory_after_model": common.memory_probe(args.device),
    }
    with tempfile.TemporaryDirectory() as weights:
        model.save_pretrained(weights)
        started, cpu = common.now(args.device), common.cpu_now()
        stats = generator.generate(
            model,
            tokenizer,
            prompts[args.batch :],
            on_batch=lambda rows: None,
            round_index=1,
            weights=weights,
        )
        seconds, cpu_s = common.now(args.device) - started, common.cpu_now() - cpu
    result["generator_stats"] = stats
    result["phase_seconds_with_engine_start"] = seconds
    result["engine_start_seconds"] = stats["engine_start_seconds"]
    result["new_tokens_per_s_after_engine_start"] = stats["new_tokens"] / (
        seconds - stats["engine_start_seconds"]
    )
    return finish(args, result, stats["new_tokens"], seconds, cpu_s)


def finish(args, result: dict, new_tokens: int, seconds: float, cpu_s: float) -> dict:
    result.update(
        prompts_timed=args.batch * args.batches,
        new_tokens=new_tokens,
        seconds=seconds,
        new_tokens_per_s=new_tokens / seconds,
        process_cpu_s=cpu_s,
        new_tokens_per_cpu_s=new_tokens / cpu_s,
        peak_memory_gib=common.peak_memory_gib(args.device),
    )
    return result


def best(runs: list[dict]) -> dict:
    """The fastest of a side's runs (a shared machine only ever slows a run down)."""
    ok = [r for r in runs if "error" not in r]
    return max(ok, key=lambda r: r["new_tokens_per_s"]) if ok else runs[-1]


def compare(args) -> None:
    """Every side in its own subprocesses; one JSON line per backend."""
    base = [
        "--device",
        args.device,
        "--shape",
        args.shape,
        "--batch",
        str(args.batch),
        "--batches",
        str(args.batches),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--seed",
        str(args.seed),
        "--engine-kwargs",
        json.dumps(args.engine_kwargs),
    ]
    if args.threads:
        base += ["--threads", str(args.threads)]
    if args.check_greedy:
        base += ["--check-greedy", args.check_greedy]
    if args.profile:
        base += ["--profile", str(Path(args.profile).resolve())]
    script = Path(__file__).resolve()
    sides = ["plain", *args.backends]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side in sides:
            runs[side].append(common.run_child(script, [*base, "--child", side], args.timeout))
    plain = best(runs["plain"])
    for backend in args.backends:
        ours = best(runs[backend])
        common.emit(
            {
                "benchmark": "generation_throughput",
                "backend": backend,
                "device": args.device,
                "shape": args.shape,
                "batch": args.batch,
                "timed_batches": args.batches,
                "prompt_len": args.prompt_len,
                "max_new_tokens": args.new_tokens,
                "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0},
                "dtype": "bf16" if args.device == "cuda" else "fp32",
                "threads": args.threads,
                "greedy_check": ours.get("greedy_check"),
                "profile": ours.get("profile"),
                "loop": (ours.get("generator_stats") or {}).get("loop"),
                "cuda_graph": (ours.get("generator_stats") or {}).get("cuda_graph"),
                "new_tokens_per_s": ours.get("new_tokens_per_s"),
                "plain_new_tokens_per_s": plain.get("new_tokens_per_s"),
                "new_tokens_per_s_ratio": common.ratio(
                    ours.get("new_tokens_per_s"), plain.get("new_tokens_per_s")
                ),
                "new_tokens_per_cpu_s_ratio": common.ratio(
                    ours.get("new_tokens_per_cpu_s"), plain.get("new_tokens_per_cpu_s")
                ),
                "peak_memory_kind": "cuda max allocated"
                if args.device == "cuda"
                else "peak RSS of the subprocess",
                "peak_memory_ratio": common.ratio(ours.get("peak_memory_gib"), plain.get("peak_memory_gib")),
                "repeats": args.repeats,
                "ours": ours,
                "peer": plain,
                "all_runs": {
                    side: [
                        {
                            k: r.get(k)
                            for k in ("new_tokens_per_s", "new_tokens_per_cpu_s", "peak_memory_gib", "error")
                        }
                        for r in runs[side]
                    ]
                    for side in (backend, "plain")
                },
                "machine": common.machine(),
            }
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        common.write_result(args.result_file, (run_plain if args.child == "plain" else run_backend)(args))
        return
    if not args.gpu_suite:
        compare(args)
        return
    for shape, batch in GPU_SUITE:
        args.shape, args.batch = shape, batch
        args.prompt_len, args.new_tokens = 256, 256
        compare(args)


if __name__ == "__main__":
    main()
