"""SPIN training throughput and peak memory: TRL's DPOTrainer used as SPIN against spinlab.

    python benchmarks/train_throughput.py --device cpu
    python benchmarks/train_throughput.py --device cuda --shape smollm2-135m
    python benchmarks/train_throughput.py --device cuda --shape llama-1b --gradient-checkpointing both

Both sides get identical work: the same random-init Llama shape, the same pairs of random
token ids (real and synthetic responses of the same prompt, every response ending in EOS,
no padding), the same batch, torch.optim.RMSprop with the same learning rate and no gradient
clipping, fp32 on CPU or fp32 master weights under bf16 autocast on a GPU, and gradient
checkpointing set the same way.

- Peer: TRL's DPOTrainer with chosen = real, rejected = synthetic, loss_type sigmoid,
  beta = lam, in up to three settings (`--peer-settings`): `ref_model` (the reference model in
  memory), `precompute_ref_log_probs` (its precompute time is reported, amortised over the
  epoch), and `fastest`: precomputed reference log-probs plus TRL's documented speed options,
  `use_liger_kernel=True` (Liger's layer kernels; they need liger-kernel and triton, so on a
  machine without them the side runs without, and says so) and `padding_free=True` (TRL 1.16
  turns it off for DPO with a warning, which the side records).
- Ours (`ours`, the headline): spinlab.module.PolicyModule(opponent="cached") trained by
  Trainer.fit as train.py sets it up (conf/trainer/, the module's hooks, the round's LR schedule,
  the CSV logger, RoundCheckpoint with AtomicCheckpointIO); the data module holds the same pairs
  and the opponent's log-probs, computed once beforehand with spinlab.collective.score_pairs, timed
  separately and amortised over the epoch.
- Ours, bare loop (`ours_bare_loop`): the same module's loss_and_metrics in a hand-written loop
  outside Lightning, for what the Trainer and the hooks cost.

Every side runs in its own subprocess, so each peak memory is its own. One JSON line is
printed per gradient-checkpointing setting, with both sides' raw figures, TRL's best figure of
each kind (highest tokens/s, lowest peak memory) and the ratios ours/peer.

tokens/s counts prompt + response tokens of the real and the synthetic sequences:
2 × batch × (prompt + response) per step. Peak memory: CUDA max allocated on a GPU, peak RSS
of the subprocess (ru_maxrss) on CPU. A dataset holds exactly warmup + steps batches (one
epoch); the first `warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

DEFAULTS = {
    # shape: (batch, prompt, response)
    "toy": (2, 8, 8),
    "cpu-small": (4, 128, 128),
    "smollm2-135m": (16, 256, 256),
    "llama-1b": (8, 256, 256),
}
PEER_SETTINGS = ("ref_model", "precompute_ref_log_probs", "fastest")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--shape", choices=sorted(common.SHAPES), default=None, help="cpu-small on CPU, smollm2-135m on GPU"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (CPU 4, GPU 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (CPU 1, GPU 3)")
    p.add_argument(
        "--batch", type=int, default=None, help="pairs per step (CPU 4; GPU 16 for 135M, 8 for 1B)"
    )
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--response-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gradient-checkpointing",
        choices=("off", "on", "both"),
        default="off",
        help="applied to both sides alike; 'both' measures off, then on",
    )
    p.add_argument(
        "--ours-variants",
        default="default",
        help="our settings to measure: names from VARIANTS joined by '+' to combine, ',' between "
        "variants run one after the other in one subprocess, ';' between subprocesses "
        "(e.g. 'default,sync,chunk256;compile;liger'). 'default' is conf/module/default.yaml as is",
    )
    p.add_argument(
        "--chunk-size",
        default=None,
        help="logprob_chunk_size for every variant that does not set its own ('none': full logits)",
    )
    p.add_argument("--also-unchunked", action="store_true", help="shorthand: add the 'unchunked' variant")
    p.add_argument("--bare-loop", action="store_true", help="also run ours in a hand-written loop")
    p.add_argument(
        "--peer-settings", default=",".join(PEER_SETTINGS), help="comma list of " + "|".join(PEER_SETTINGS)
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads on both sides (default: all cores)"
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per side")
    # Internal: run one side.
    p.add_argument(
        "--child", choices=("peer", "ours", "ours_bare_loop"), default=None, help=argparse.SUPPRESS
    )
    p.add_argument("--peer-setting", choices=PEER_SETTINGS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--variants", default="default", help=argparse.SUPPRESS)
    p.add_argument("--gc", choices=("off", "on"), default="off", help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.shape = args.shape or ("smollm2-135m" if gpu else "cpu-small")
    batch, prompt, response = DEFAULTS[args.shape]
    args.batch = args.batch or batch
    args.prompt_len = args.prompt_len or prompt
    args.response_len = args.response_len or response
    args.steps = args.steps or (20 if gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the clock starts at the end of the last warm-up step)")
    if args.also_unchunked:
        args.ours_variants += ";unchunked"
    for group in args.ours_variants.split(";"):
        for name in group.split(","):
            try:
                variant_settings(name)
            except ValueError as err:
                p.error(str(err))
    return args


# Our settings measured against each other and the peer: module keywords over conf/module/default.yaml,
# and `trainer` (the conf/trainer/ file, GPU name; the CPU one is its _cpu twin).
VARIANTS = {
    "default": {},
    "sync": {"sync_every_step": True},  # the finiteness vote and metrics moved to the host every step
    "chunk256": {"logprob_chunk_size": 256},
    "chunk1024": {"logprob_chunk_size": 1024},
    "chunk4096": {"logprob_chunk_size": 4096},
    "unchunked": {"logprob_chunk_size": None},
    "compile": {"compile_layers": True},
    "eager": {"compile_layers": False},
    "liger": {"liger_kernels": True},
    "fsdp1": {"trainer": "fsdp"},  # FSDP2 on one device, against trainer=gpu/cpu
}


def variant_settings(name: str) -> dict:
    settings = {}
    for part in name.split("+"):
        if part not in VARIANTS:
            raise ValueError(f"unknown variant {part!r} in {name!r}; choose from {sorted(VARIANTS)}")
        settings.update(VARIANTS[part])
    return settings


def module_defaults() -> dict:
    """The module settings a user gets from conf/module/default.yaml (its plain values; the
    interpolated ones -- objective, optimizer, lam, schedule -- the benchmark sets itself)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(
        OmegaConf.load(common.REPO / "conf" / "module" / "default.yaml"), resolve=False
    )
    skip = {"_target_", "opponent", "gradient_checkpointing"}
    return {k: v for k, v in cfg.items() if k not in skip and not (isinstance(v, str) and "${" in v)}


# -- shared by both sides -----------------------------------------------------------------------
def setup(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")


def base_result(args, side: str) -> dict:
    import torch

    return {
        "side": side,
        "torch_threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gc == "on",
    }


def figures(args, times: list[tuple[float, float]], result: dict, precompute_s: float) -> dict:
    """Throughput over the timed steps, with and without the amortised precompute.

    `times` holds (wall, process CPU) seconds at the end of every step.
    """
    timed_s = times[-1][0] - times[args.warmup - 1][0]
    cpu_s = times[-1][1] - times[args.warmup - 1][1]
    tokens = args.steps * 2 * args.batch * (args.prompt_len + args.response_len)
    # The precompute covers the whole epoch (warmup + steps batches); charge the timed share.
    precompute_share = precompute_s * args.steps / (args.steps + args.warmup)
    result.update(
        timed_steps=args.steps,
        timed_s=timed_s,
        s_per_step=timed_s / args.steps,
        tokens=tokens,
        tokens_per_s=tokens / timed_s,
        process_cpu_s=cpu_s,
        tokens_per_cpu_s=tokens / cpu_s,
        opponent_precompute_s=precompute_s,
        opponent_precompute_s_amortised=precompute_share,
        tokens_per_s_incl_precompute=tokens / (timed_s + precompute_share),
        peak_memory_gib=common.peak_memory_gib(args.device),
        memory_at_end=common.memory_probe(args.device),
    )
    if args.device == "cuda":
        per_token = common.train_flops_per_token(
            args.shape, args.prompt_len + args.response_len, result.get("forward_passes", 3)
        )
        result["mfu"] = tokens / timed_s * per_token / common.PEAK_BF16_FLOPS
    return result


# -- peer: TRL ----------------------------------------------------------------------------------
def run_peer(args) -> dict:
    import datasets
    import torch
    import trl
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    setup(args)
    result = base_result(args, f"trl {trl.__version__} DPOTrainer ({args.peer_setting})")
    result["memory_after_imports"] = common.memory_probe(args.device)
    model = common.build_model(args.shape, args.seed, args.device)
    result["memory_after_model"] = common.memory_probe(args.device)
    tokenizer = common.build_tokenizer(args.shape)
    eos = common.SHAPES[args.shape]["eos_token_id"]
    pairs = common.random_pairs(
        args.shape, args.batch * (args.warmup + args.steps), args.prompt_len, args.response_len, args.seed
    )
    # Text whose word-level tokens are exactly our ids; TRL tokenizes prompt + chosen itself,
    # so the responses start with the separating space.
    rows = {
        "prompt": [common.ids_to_text(p["prompt"], eos) for p in pairs],
        "chosen": [" " + common.ids_to_text(p["real"], eos) for p in pairs],
        "rejected": [" " + common.ids_to_text(p["synthetic"], eos) for p in pairs],
    }
    dataset = make_dataset(datasets, rows)

    class TimedDPOTrainer(DPOTrainer):
        precompute_s = 0.0

        def _precompute_ref_logps(self, *a, **kw):
            started = common.now(args.device)
            out = super()._precompute_ref_logps(*a, **kw)
            self.precompute_s += common.now(args.device) - started
            return out

    class StepClock(TrainerCallback):
        def __init__(self):
            self.steps = common.StepTimes(args.device, args.warmup, args.warmup + args.steps)

        def on_step_end(self, *a, **kw):
            self.steps.mark()

    gpu = args.device == "cuda"
    fastest = args.peer_setting == "fastest"
    precompute = args.peer_setting in ("precompute_ref_log_probs", "fastest")
    liger = fastest and liger_available(args.device)
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out_dir:
        config = DPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=0.0,  # no clipping, as on our side
            beta=args.lam,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=precompute,
            use_liger_kernel=liger,
            padding_free=fastest,
            gradient_checkpointing=args.gc == "on",
            bf16=gpu,
            use_cpu=not gpu,
            max_length=None,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=gpu,
            seed=args.seed,
        )
        ref_model = None if precompute else copy.deepcopy(model)
        optimizer = torch.optim.RMSprop(model.parameters(), lr=args.lr)
        clock = StepClock()
        trainer = TimedDPOTrainer(
            model=model,
            ref_model=ref_model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            optimizers=(optimizer, None),
            callbacks=[clock],
        )
        check_same_tokens(trainer.train_dataset[0], pairs[0])
        result["memory_after_trainer_init"] = common.memory_probe(args.device)
        probe = common.HeadProbe(model)
        trainer.train()
        result["lm_head_module_calls_in_training"] = probe.take()
        padding_free_kept = bool(getattr(trainer, "padding_free", False))
    result["trl_settings"] = {
        "loss_type": ["sigmoid"],
        "beta": args.lam,
        "precompute_ref_log_probs": precompute,
        "use_liger_kernel": liger
        if liger or not fastest
        else "asked for, not available here (liger-kernel needs triton: GPU machines)",
        "padding_free": padding_free_kept if fastest else False,
        "ref_model": "deepcopy of the policy" if ref_model is not None else None,
        "gradient_checkpointing": args.gc == "on",
        "bf16": gpu,
        "use_cpu": not gpu,
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant",
        "optimizer": "torch.optim.RMSprop",
    }
    result["forward_passes"] = 3 if precompute else 4  # the reference model's forward in every step
    return figures(args, clock.steps.times, result, trainer.precompute_s)


def liger_available(device: str) -> bool:
    """Whether TRL's use_liger_kernel can work here: liger-kernel importable, on a CUDA device."""
    import importlib.util

    return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def make_dataset(datasets, rows: dict):
    try:
        return datasets.Dataset.from_dict(rows)
    except Exception:  # pyarrow/dill trouble on some machines: go through a file
        import json

        path = Path(tempfile.mkdtemp(prefix="trl-bench-data-")) / "pairs.jsonl"
        with path.open("w") as f:
            for values in zip(*rows.values(), strict=True):
                f.write(json.dumps(dict(zip(rows, values, strict=True))) + "\n")
        return datasets.load_dataset("json", data_files=str(path), split="train")


def check_same_tokens(example: dict, pair: dict) -> None:
    """TRL must see exactly the ids our side trains on, or the comparison is void."""
    got = (list(example["prompt_ids"]), list(example["chosen_ids"]), list(example["rejected_ids"]))
    if got != (pair["prompt"], pair["real"], pair["synthetic"]):
        raise RuntimeError(
            "TRL's tokenized pair differs from our token ids; the benchmark is not comparing like work"
        )


# -- ours: spinlab ------------------------------------------------------------------------------
def build_ours(args, side: str, variant: str = "default"):
    """The same model, pairs, PolicyModule and SelfPlayDataModule for both of our measurements,
    with the cached opponent's log-probs set (computed once, timed)."""

    from spinlab.collective import score_pairs
    from spinlab.data import SelfPlayDataModule

    class GivenPairs(SelfPlayDataModule):
        def setup(self, stage=None) -> None:  # the pairs are given as token ids, there is nothing to read
            pass

    setup(args)
    settings = variant_settings(variant)
    kwargs = module_defaults() | {k: v for k, v in settings.items() if k != "trainer"}
    if args.chunk_size is not None and "logprob_chunk_size" not in settings:
        kwargs["logprob_chunk_size"] = (
            None if args.chunk_size.lower() in ("none", "0") else int(args.chunk_size)
        )
    result = base_result(args, side)
    result.update(variant=variant, module_settings=kwargs, trainer=settings.get("trainer", "default"))
    result["logprob_chunk_size"] = kwargs.get("logprob_chunk_size")
    result["memory_after_imports"] = common.memory_probe(args.device)
    model = common.build_model(args.shape, args.seed, args.device)
    result["memory_after_model"] = common.memory_probe(args.device)
    tokenizer = common.build_tokenizer(args.shape)
    pairs = common.random_pairs(
        args.shape, args.batch * (args.warmup + args.steps), args.prompt_len, args.response_len, args.seed
    )
    module = common.spin_module(
        model, args.device, lr=args.lr, lam=args.lam, gradient_checkpointing=args.gc == "on", **kwargs
    )
    datamodule = GivenPairs(
        source=None,
        tokenizer=tokenizer,
        batch_size=args.batch,
        max_length=args.prompt_len + args.response_len,
        max_prompt_length=args.prompt_len,
        seed=args.seed,
    )
    datamodule.encoded = pairs  # already token ids: {index, prompt, real, synthetic}
    probe = common.HeadProbe(model)
    # The cached opponent: log-probs of every pair, once, with the round's starting weights.
    started = common.now(args.device)
    with common.autocast(args.device):
        logps = score_pairs(None, module, datamodule, datamodule.encoded, desc="opponent")
    precompute_s = common.now(args.device) - started
    datamodule.set_opponent_logps(logps)
    result["lm_head_module_calls_in_scoring"] = probe.take()
    result["memory_after_opponent_scoring"] = common.memory_probe(args.device)
    return module, datamodule, probe, result, precompute_s


def run_ours_bare(args) -> dict:
    """PolicyModule's objective in a hand-written loop outside Lightning: the floor of our cost."""
    import torch

    module, datamodule, probe, result, precompute_s = build_ours(
        args, "spinlab PolicyModule (opponent=cached), hand-written loop", args.variants
    )
    optimizer = module.configure_optimizers()["optimizer"]
    clock = common.StepTimes(args.device, args.warmup, args.warmup + args.steps)
    for batch in datamodule.train_dataloader():
        batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with common.autocast(args.device):
            out = module.loss_and_metrics(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        clock.mark()
    result["lm_head_module_calls_in_training"] = probe.take()
    return figures(args, clock.times, result, precompute_s)


def run_ours_variants(args) -> dict:
    """Each of --variants in turn in this process, with a fresh model and the peak-memory counter
    reset; the result file is rewritten after each, so a timeout keeps the finished ones."""
    import gc
    import traceback

    import torch

    out = {"variants": {}}
    for name in args.variants.split(","):
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            out["variants"][name] = run_ours_fit(args, name)
        except Exception as err:  # one variant failing must not lose the others' figures
            out["variants"][name] = {"error": repr(err), "traceback": traceback.format_exc()[-3000:]}
        common.write_result(args.result_file, out)
    return out


def run_ours_fit(args, variant: str = "default") -> dict:
    """What `python train.py` runs for a round's training: Trainer.fit with the trainer config of
    conf/trainer/, PolicyModule's own hooks (training_step, on_before_optimizer_step, logging),
    the round's LR schedule, the CSV logger, RoundCheckpoint at the epoch end and
    AtomicCheckpointIO. Generation and SelfPlayCallback are left out: the pairs and the opponent's
    log-probs are given, as TRL is given them."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import TQDMProgressBar
    from omegaconf import OmegaConf

    from spinlab.callbacks import AtomicCheckpointIO, RoundCheckpoint
    from spinlab.loggers import CSVLogger
    from spinlab.rounds import Round

    module, datamodule, probe, result, precompute_s = build_ours(
        args, "spinlab PolicyModule (opponent=cached), Trainer.fit as train.py", variant
    )
    steps = args.warmup + args.steps
    module.begin_round(
        Round(
            index=0,
            lam=args.lam,
            lr=args.lr,
            mix_previous_rounds=0,
            start_step=0,
            total_steps=steps,
            pairs=len(datamodule.encoded),
        ),
        fresh=True,
    )

    class StepClock(L.Callback):
        def __init__(self):
            self.steps = common.StepTimes(args.device, args.warmup, steps)
            self.in_batch: list[float] = []  # on_train_batch_start to on_train_batch_end (CPU only)
            self.started = 0.0

        def on_train_batch_start(self, *a, **kw):
            self.started = time.perf_counter()

        def on_train_batch_end(self, *a, **kw):
            self.steps.mark()
            self.in_batch.append(self.steps.times[-1][0] - self.started)

    trainer_name = result["trainer"] if result["trainer"] != "default" else "gpu"
    if args.device != "cuda":
        trainer_name = "cpu" if trainer_name == "gpu" else f"{trainer_name}_cpu"
    trainer_cfg = OmegaConf.load(common.REPO / "conf" / "trainer" / f"{trainer_name}.yaml")
    if "devices" in trainer_cfg:
        trainer_cfg.devices = 1
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="spinlab-bench-") as run_dir:
        csv = CSVLogger(
            save_dir=run_dir, checkpoint=f"{run_dir}/checkpoints/last.ckpt", name="csv", version=""
        )
        checkpoint = RoundCheckpoint(dirpath=f"{run_dir}/checkpoints")
        trainer = instantiate(
            trainer_cfg,
            max_epochs=1,
            reload_dataloaders_every_n_epochs=1,
            callbacks=[clock, checkpoint, TQDMProgressBar(refresh_rate=1), csv],
            logger=[csv],
            default_root_dir=run_dir,
            plugins=[AtomicCheckpointIO()],
            enable_checkpointing=False,  # RoundCheckpoint writes checkpoints/last.ckpt, as in train.py
        )
        result["memory_after_trainer_init"] = common.memory_probe(args.device)
        started = common.now(args.device)
        trainer.fit(module, datamodule=datamodule)
        if trainer.strategy.root_device.type == "cuda" and hasattr(trainer.strategy, "barrier"):
            trainer.strategy.barrier()
        fit_s = common.now(args.device) - started
        logged_rows = csv.experiment.rows
        path = checkpoint.path  # a file, or a directory of shards under FSDP2
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        checkpoint_bytes = sum(f.stat().st_size for f in files)
    if len(clock.steps.times) != steps:
        raise RuntimeError(f"Trainer.fit ran {len(clock.steps.times)} batches, expected {steps}")
    result["lm_head_module_calls_in_training"] = probe.take()
    result.update(
        trainer_config=OmegaConf.to_container(trainer_cfg),
        fit_s=fit_s,
        first_step_s=clock.in_batch[0],  # compilation, if any, happens here
        csv_rows_logged=logged_rows,
        checkpoint_bytes=checkpoint_bytes,
    )
    if args.device != "cuda":  # on a GPU the span between hooks is the time to queue the kernels
        in_batch = sum(clock.in_batch[args.warmup :])
        tokens = args.steps * 2 * args.batch * (args.prompt_len + args.response_len)
        result.update(in_batch_s=in_batch, tokens_per_s_in_batch=tokens / in_batch)
    return figures(args, clock.steps.times, result, precompute_s)


# -- the comparison -----------------------------------------------------------------------------
def child_argv(
    args, child: str, gc: str, peer_setting: str | None = None, variants: str | None = None
) -> list[str]:
    argv = [
        "--child",
        child,
        "--gc",
        gc,
        "--device",
        args.device,
        "--shape",
        args.shape,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--prompt-len",
        str(args.prompt_len),
        "--response-len",
        str(args.response_len),
        "--lr",
        str(args.lr),
        "--lam",
        str(args.lam),
        "--seed",
        str(args.seed),
        "--variants",
        variants or "default",
    ]
    if args.chunk_size is not None:
        argv += ["--chunk-size", args.chunk_size]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if peer_setting:
        argv += ["--peer-setting", peer_setting]
    return argv


def best_of(runs: dict[str, dict]) -> dict:
    ok = {k: v for k, v in runs.items() if "error" not in v}
    if not ok:
        return {}
    fast = max(ok, key=lambda k: ok[k]["tokens_per_s"])
    fast_incl = max(ok, key=lambda k: ok[k]["tokens_per_s_incl_precompute"])
    light = min(ok, key=lambda k: ok[k]["peak_memory_gib"])
    fast_cpu = max(ok, key=lambda k: ok[k]["tokens_per_cpu_s"])
    return {
        "tokens_per_s": ok[fast]["tokens_per_s"],
        "tokens_per_s_setting": fast,
        "tokens_per_cpu_s": ok[fast_cpu]["tokens_per_cpu_s"],
        "tokens_per_cpu_s_setting": fast_cpu,
        "tokens_per_s_incl_precompute": ok[fast_incl]["tokens_per_s_incl_precompute"],
        "tokens_per_s_incl_precompute_setting": fast_incl,
        "peak_memory_gib": ok[light]["peak_memory_gib"],
        "peak_memory_setting": light,
    }


def ratios(ours: dict, best: dict, prefix: str) -> dict:
    """ours/peer of each figure; None where a side failed."""
    keys = ("tokens_per_s", "tokens_per_cpu_s", "tokens_per_s_incl_precompute", "peak_memory_gib")
    names = {"peak_memory_gib": "peak_memory"}
    ok = "error" not in ours
    return {
        f"{prefix}{names.get(k, k)}_ratio": common.ratio(ours.get(k), best.get(k)) if ok else None
        for k in keys
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        run = {"peer": run_peer, "ours": run_ours_variants, "ours_bare_loop": run_ours_bare}[args.child]
        common.write_result(args.result_file, run(args))
        return
    script = Path(__file__).resolve()
    settings = [s.strip() for s in args.peer_settings.split(",") if s.strip()]
    unknown = set(settings) - set(PEER_SETTINGS)
    if unknown:
        raise SystemExit(f"unknown --peer-settings {sorted(unknown)}; choose from {PEER_SETTINGS}")
    machine = common.machine()
    for gc in ("off", "on") if args.gradient_checkpointing == "both" else (args.gradient_checkpointing,):
        peer = {
            s: common.run_child(script, child_argv(args, "peer", gc, peer_setting=s), args.timeout)
            for s in settings
        }
        variants = {}
        for group in args.ours_variants.split(";"):
            out = common.run_child(script, child_argv(args, "ours", gc, variants=group), args.timeout)
            for name in group.split(","):
                variants[name] = out.get("variants", {}).get(name) or {"error": out.get("error", "not run")}
                if "stderr_tail" in out and "error" in variants[name]:
                    variants[name]["stderr_tail"] = out["stderr_tail"]
        bare = {}
        if args.bare_loop:
            bare = common.run_child(script, child_argv(args, "ours_bare_loop", gc), args.timeout)
        best = best_of(peer)
        ours = variants.get("default") or next(iter(variants.values()))
        record = {
            "benchmark": "train_throughput",
            "device": args.device,
            "shape": args.shape,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "response_len": args.response_len,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "gradient_checkpointing": gc == "on",
            "precision": "bf16 autocast, fp32 master weights" if args.device == "cuda" else "fp32",
            "optimizer": f"torch.optim.RMSprop(lr={args.lr})",
            "lam_beta": args.lam,
            "peak_memory_kind": "cuda max allocated"
            if args.device == "cuda"
            else "peak RSS of the subprocess",
            "ours_logprob_chunk_size": ours.get("logprob_chunk_size"),
            # True when the training forward went through lm_head, i.e. built full [2B, T, V] logits.
            "ours_full_logits": bool(ours.get("lm_head_module_calls_in_training"))
            if "error" not in ours
            else None,
            # ours: Trainer.fit as train.py runs it with conf/module/default.yaml's settings.
            **ratios(ours, best, ""),
            **(ratios(bare, best, "bare_loop_") if bare else {}),
            # every variant against the peer's best: tokens/s ratio, peak-memory ratio, MFU
            "variant_ratios": {
                name: {
                    **ratios(v, best, ""),
                    "mfu": v.get("mfu"),
                    "first_step_s": v.get("first_step_s"),
                    "error": v.get("error"),
                }
                for name, v in variants.items()
            },
            "peer_mfu": {k: v.get("mfu") for k, v in peer.items()},
            "ours": ours,
            "ours_variants": variants,
            "ours_bare_loop": bare or None,
            "peer_best": best,
            "peer": peer,
            "machine": machine,
        }
        common.emit(record)


if __name__ == "__main__":
    main()
