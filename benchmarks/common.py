"""Shared pieces of the benchmarks: model shapes, a word-level tokenizer over the shape's
vocabulary, random token pairs, memory probes, and running one side in its own subprocess.

Nothing here times anything; each benchmark script does its own timing.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Random-init Llama shapes, written out so that no hub access is needed.
SHAPES: dict[str, dict] = {
    # Seconds, not minutes: what tests/test_benchmarks.py runs every script at (a check that the
    # scripts run, not a measurement). 4 heads of 16, 512 tokens, 0.1M parameters.
    "toy": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # The CPU shape: hidden 256, 4 layers, SmolLM2's 49,152-token vocabulary and
    # head size 64 with grouped-query attention, tied embeddings: 15.7M parameters.
    "cpu-small": dict(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # HuggingFaceTB/SmolLM2-135M(-Instruct) config.json.
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # meta-llama/Llama-3.2-1B config.json.
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}

EOS_TEXT = "</s>"


def build_model(shape: str, seed: int = 0, device: str = "cpu"):
    """Random-init LlamaForCausalLM of a named shape, fp32, train mode, built on `device`
    (initialising a 1B model on the GPU takes a second, on the CPU half a minute). Every side of a
    benchmark builds it the same way, so all sides start from the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if device == "cuda":
        torch.cuda.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], pad_token_id=SHAPES[shape]["eos_token_id"])
    config.use_cache = False
    with torch.device(device):
        model = LlamaForCausalLM(config).float()
    return model.train()


def build_tokenizer(shape: str):
    """Word-level tokenizer whose token i is the text `t<i>` (the EOS id is `</s>`).

    Lets TRL, which wants text or a tokenizer, see exactly the random token ids that our side
    gets as tensors: "t5 t17 </s>" tokenizes to [5, 17, eos].
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cfg = SHAPES[shape]
    eos = cfg["eos_token_id"]
    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    del vocab[f"t{eos}"]
    vocab[EOS_TEXT] = eos
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TEXT))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TEXT, pad_token=EOS_TEXT)
    tok.padding_side = "right"
    return tok


def random_pairs(shape: str, pairs: int, prompt_len: int, response_len: int, seed: int = 0) -> list[dict]:
    """`pairs` items {index, prompt, real, synthetic} of token ids; each response ends in EOS."""
    import torch

    cfg = SHAPES[shape]
    eos = cfg["eos_token_id"]
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        x = torch.randint(3, cfg["vocab_size"], (n,), generator=g)
        x[x == eos] = 3  # keep EOS only where it belongs
        return x.tolist()

    return [
        {
            "index": i,
            "prompt": ids(prompt_len),
            "real": [*ids(response_len - 1), eos],
            "synthetic": [*ids(response_len - 1), eos],
        }
        for i in range(pairs)
    ]


class HeadProbe:
    """Counts calls of the model's output layer as a module.

    Hugging Face's forward computes the full [batch, length, vocabulary] logits through
    `lm_head(...)`; a chunked or fused log-prob path multiplies by `lm_head.weight` itself and
    never calls the module. So `calls > 0` while training means full logits were materialised.
    """

    def __init__(self, model):
        self.calls = 0
        self.handle = model.get_output_embeddings().register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def ids_to_text(ids: list[int], eos: int) -> str:
    return " ".join(EOS_TEXT if i == eos else f"t{i}" for i in ids)


# -- memory -------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_probe(device: str) -> dict:
    """Memory figures now: RSS always, CUDA allocated and peak allocated on a GPU."""
    out = {"rss_gib": rss_bytes() / 2**30, "peak_rss_gib": peak_rss_bytes() / 2**30}
    if device == "cuda":
        import torch

        out["cuda_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        out["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def peak_memory_gib(device: str) -> float:
    """The figure compared between sides: CUDA max allocated on a GPU, peak RSS on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_bytes() / 2**30


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def now(device: str) -> float:
    sync(device)
    return time.perf_counter()


class StepTimes:
    """(wall, process CPU) seconds at the end of each step, synchronising with the GPU only at the
    end of the last warm-up step and of the last step: the two ends of the timed span. A clock that
    synchronised every step would stop the host from queueing the next step's kernels ahead, and
    would charge each side a stall that its own loop may not have."""

    def __init__(self, device: str, warmup: int, total: int):
        self.device, self.synced_at = device, {warmup - 1, total - 1}
        self.times: list[tuple[float, float]] = []

    def mark(self) -> None:
        if len(self.times) in self.synced_at:
            sync(self.device)
        self.times.append((time.perf_counter(), cpu_now()))


# Peak dense bf16 matrix throughput used for MFU: the H100/H200 SXM data-sheet figure.
PEAK_BF16_FLOPS = 989e12


def train_flops_per_token(shape: str, seq_len: int, forward_passes: int = 3) -> float:
    """Model FLOPs per token of one training step (PaLM's MFU convention): 2 per weight of every
    matrix product (the attention and MLP projections and the output layer, over all positions)
    plus the attention scores and their weighted sum (2 x 2 x layers x heads x head_dim x length),
    for the forward pass; the backward pass is twice that (`forward_passes=3`). A frozen reference
    model scored in every step adds one more forward pass (`forward_passes=4`)."""
    c = SHAPES[shape]
    d, heads, kv, hd, layers = (
        c["hidden_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["head_dim"],
        c["num_hidden_layers"],
    )
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * c["intermediate_size"]
    weights = layers * per_layer + c["vocab_size"] * d
    forward = 2 * weights + 4 * layers * heads * hd * seq_len
    return forward_passes * forward


def cpu_now() -> float:
    """CPU seconds used by this process, all threads: less disturbed than wall time on a shared box."""
    return time.process_time()


# -- one side per subprocess ---------------------------------------------------------------------
def run_child(script: Path, argv: list[str], timeout: float | None = None) -> dict:
    """Run `script --child ... --result-file F` in a fresh Python, return the JSON it wrote.

    A side that fails is reported as {"error": ...} instead of stopping the benchmark. With
    SPINLAB_BENCH_INLINE=1 the side runs in this process instead (see `run_inline`).
    """
    if os.environ.get("SPINLAB_BENCH_INLINE") == "1":
        return run_inline(script, argv)
    with tempfile.TemporaryDirectory(prefix="spinlab-bench-") as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        env.setdefault("TQDM_DISABLE", "1")
        env.setdefault("WANDB_MODE", "disabled")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")) if p
        )
        cmd = [sys.executable, str(script), "--result-file", str(result), *argv]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            # A child that writes its result as it goes (one entry per variant) keeps what it finished.
            partial = json.loads(result.read_text()) if result.exists() else {}
            return {**partial, "error": f"timed out after {timeout} s", "command": cmd}
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout or "")[-3000:]
            partial = json.loads(result.read_text()) if result.exists() else {}
            return {**partial, "error": f"exit status {proc.returncode}", "stderr_tail": tail}
        out = json.loads(result.read_text())
        out["subprocess_wall_s"] = wall
        return out


def run_inline(script: Path, argv: list[str]) -> dict:
    """Run a side as `run_child` does, with the same arguments, but in this process: the toy-size
    check of the scripts (tests/test_benchmarks.py) pays one interpreter start per script instead
    of one per side. Not a measurement: memory peaks are shared, imports warm, no time limit."""
    import runpy
    import traceback

    import torch

    threads, saved_argv = torch.get_num_threads(), sys.argv
    with tempfile.TemporaryDirectory(prefix="spinlab-bench-") as tmp:
        result = Path(tmp) / "result.json"
        sys.argv = [str(script), "--result-file", str(result), *argv]
        try:
            runpy.run_path(str(script), run_name="__main__")
        except (Exception, SystemExit) as err:
            partial = json.loads(result.read_text()) if result.exists() else {}
            return {**partial, "error": repr(err), "stderr_tail": traceback.format_exc()[-3000:]}
        finally:
            sys.argv = saved_argv
            torch.set_num_threads(threads)
        return json.loads(result.read_text())


def write_result(path: str, result: dict) -> None:
    Path(path).write_text(json.dumps(result))


def machine() -> dict:
    """Where the figures come from: CPU model, core count, GPU if any, versions, date."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "date": str(date.today()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    for name in ("transformers", "trl", "lightning"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def emit(record: dict) -> None:
    """One JSON line per measurement, on stdout."""
    print(json.dumps(record, sort_keys=False), flush=True)


def ratio(ours: float | None, peer: float | None) -> float | None:
    if ours is None or peer is None or peer == 0:
        return None
    return ours / peer


# -- lever benchmarks: ours against ours, one setting changed -----------------------------------
def lever_parser(doc: str, sides: tuple[str, str], batch: int, warmup: int, steps: int = 6):
    """Arguments shared by the lever benchmarks (compile.py, packing.py); add your own, then
    call `lever_args`."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="cpu-small on CPU, smollm2-135m on GPU"
    )
    p.add_argument("--batch", type=int, default=batch, help="pairs per step")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=steps, help="timed steps")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads on both sides")
    p.add_argument("--timeout", type=float, default=900, help="seconds per side")
    p.add_argument("--child", choices=sides, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return p


def lever_args(parser, argv=None):
    args = parser.parse_args(argv)
    args.shape = args.shape or ("smollm2-135m" if args.device == "cuda" else "cpu-small")
    return args


def run_lever(script: Path, args, sides: tuple[str, str], extra_argv: list[str], record: dict) -> None:
    """Run both sides in subprocesses and emit `record` with their results and the ratios
    second/first of tokens/s and peak memory, and the last losses' difference."""
    argv = ["--device", args.device, "--shape", args.shape, "--batch", str(args.batch)]
    argv += ["--prompt-len", str(args.prompt_len), "--response-len", str(args.response_len)]
    argv += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    argv += ["--threads", str(args.threads)] if args.threads else []
    first, second = (run_child(script, ["--child", s, *argv, *extra_argv], args.timeout) for s in sides)
    ok = "error" not in first and "error" not in second
    emit(
        {
            **record,
            "device": args.device,
            "shape": args.shape,
            "batch": args.batch,
            "tokens_per_s_ratio": ratio(second.get("tokens_per_s"), first.get("tokens_per_s"))
            if ok
            else None,
            "peak_memory_ratio": ratio(second.get("peak_memory_gib"), first.get("peak_memory_gib"))
            if ok
            else None,
            "last_loss_abs_diff": abs(second["last_loss"] - first["last_loss"]) if ok else None,
            sides[0]: first,
            sides[1]: second,
            "machine": machine(),
        }
    )


def autocast(device: str):
    """bf16 autocast on a GPU (fp32 master weights), nothing on CPU."""
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def cache_opponent(module, dm, device: str) -> None:
    """The cached opponent: every pair's log-probs once, with the starting weights."""
    from spinlab.collective import score_pairs

    with autocast(device):
        dm.set_opponent_logps(score_pairs(None, module, dm, dm.encoded, desc="opponent"))


def spin_steps(module, dm, device: str):
    """One optimizer step of PolicyModule per batch of `dm`, in order (both sides of a lever see
    the same batches); yields (batch, loss, time at the step's end)."""
    import torch

    optimizer = module.configure_optimizers()["optimizer"]
    for batch in dm.scoring_dataloader():
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast(device):
            out = module.loss_and_metrics(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        yield batch, float(out["loss"].detach()), now(device)


def spin_module(model, device: str, lr: float = 5e-7, **module_settings):
    """The module every benchmark trains: PolicyModule with SPIN's logistic loss, the cached
    opponent and RMSprop at `lr`, over `model`, on `device`; `module_settings` as PolicyModule's."""
    import functools

    import torch

    from spinlab.losses import logistic
    from spinlab.module import PolicyModule
    from spinlab.objectives import SPIN

    return PolicyModule(
        policy=model,
        objective=SPIN(logistic),
        optimizer=functools.partial(torch.optim.RMSprop, lr=lr),
        opponent="cached",
        **module_settings,
    ).to(device)


def lever_side(args, model, **module_settings) -> tuple:
    """One side of a lever on equal-length random pairs: PolicyModule (SPIN, logistic loss, the
    cached opponent, RMSprop) with `module_settings` over `model`, warm-up then timed steps.
    Returns the module and the side's figures."""

    import torch

    from spinlab.data import SelfPlayDataModule

    module = spin_module(model, args.device, **module_settings)
    dm = SelfPlayDataModule(
        source=None,
        tokenizer=build_tokenizer(args.shape),
        batch_size=args.batch,
        max_length=args.prompt_len + args.response_len,
        max_prompt_length=args.prompt_len,
        seed=args.seed,
    )
    dm.encoded = random_pairs(
        args.shape, args.batch * (args.warmup + args.steps), args.prompt_len, args.response_len, args.seed
    )
    cache_opponent(module, dm, args.device)
    started = now(args.device)
    steps = list(spin_steps(module, dm, args.device))
    times = [t for _, _, t in steps]
    tokens = args.steps * 2 * args.batch * (args.prompt_len + args.response_len)
    return module, {
        "side": args.child,
        "torch_threads": torch.get_num_threads(),
        "first_step_s": times[0] - started,
        "tokens_per_s": tokens / (times[-1] - times[args.warmup - 1]),
        "peak_memory_gib": peak_memory_gib(args.device),
        "last_loss": steps[-1][1],
    }
