"""The schema of conf/train.yaml's top level, so that Hydra refuses a mistyped key or a
wrongly typed value when the config is composed, wherever it comes from (command line,
experiment preset, your own YAML). The groups (model, data, ...) are checked by `check_targets`
before anything is built: a key that the `_target_` does not take fails at start, naming the
group, the class and the key (except the keys another part reads, READ_ELSEWHERE, which
`own_keys` leaves out when the group is built), and a key that was renamed (RENAMED) names its new
name. `round_overrides` is checked and typed at start (`round_overrides`), and a restarted run's
settings against those it was started with (`check_restart`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from spinlab.errors import ConfigError, NotFoundError, UserError
from spinlab.rundir import RunDir, write_bytes


@dataclass
class TrainConfig:
    name: str = "spin"
    seed: int = 0
    rounds: int = 3
    epochs_per_round: int = 1
    lam: float = 0.1
    opponent: str = "cached"
    warmup_ratio: float = 0.1
    gradient_checkpointing: bool = False
    resume: str = "auto"
    round_overrides: dict[Any, Any] = field(default_factory=dict)
    run_dir: str = MISSING
    allow_foreign_run_dir: bool = False
    run_name: str = ""
    pairs: Any = MISSING
    objective: Any = MISSING
    module: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    loss: Any = MISSING
    generation: Any = MISSING
    optimizer: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    callbacks: Any = MISSING
    eval: Any = None
    picked: dict[str, Any] = field(default_factory=dict)


log = logging.getLogger(__name__)

# The settings a round may override, and their types.
ROUND_SETTINGS = {"lr": float, "lam": float, "mix_previous_rounds": int}


def round_overrides(overrides: dict, rounds: int) -> dict[int, dict]:
    """`round_overrides` with int round keys and typed values, or a ConfigError naming the entry.

    From the command line a round arrives as a string key (`round_overrides.2.lr=1e-7` gives
    "2"), from YAML as an int; both mean the same round, and the later one (the command line)
    wins where they set the same setting.
    """
    typed: dict[int, dict] = {}
    for key, settings in sorted((overrides or {}).items(), key=lambda kv: isinstance(kv[0], str)):
        where = f"round_overrides.{key}"
        if not str(key).isdigit() or not 0 <= int(key) < rounds:
            raise ConfigError(f"round_overrides key {key!r} is not a round index in [0, {rounds})")
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{where} must map settings to values, e.g. {where}.lr=1e-7; got {settings!r}")
        for name, value in settings.items():
            kind = ROUND_SETTINGS.get(name)
            if kind is None:
                raise ConfigError(f"{where}.{name}: unknown setting; allowed: {tuple(ROUND_SETTINGS)}")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (kind is int and value != int(value)):
                raise ConfigError(
                    f"{where}.{name} must be {'an int' if kind is int else 'a number'}, got {value!r}"
                )
            if name == "lam":
                check_lam(value, f"{where}.lam")
            elif not math.isfinite(value) or value < 0:
                raise ConfigError(f"{where}.{name} must be a finite number >= 0, got {value}")
            typed.setdefault(int(key), {})[name] = kind(value)
    return dict(sorted(typed.items()))


# Settings a restart may change (dotted prefixes): where the run goes and what it reports. Every
# other key is compared, the nodes the top-level keys reach by interpolation included
# (`callbacks.self_play.lam` is `${lam}`), so that a setting changed through either path is refused.
RESTART_FREE = (
    "picked",  # a record of how the groups were chosen; what they chose is compared
    "resume",
    "logger",
    "run_name",
    "run_dir",
    "allow_foreign_run_dir",
    "name",
    "callbacks.progress",  # the progress bar
    "callbacks.self_play.generator",  # ${generation}, compared there (tests swap in crashing ones)
    "callbacks.checkpoint.dirpath",  # ${run_dir}/checkpoints
    "callbacks.self_play.run_dir",
    "callbacks.self_play.num_samples",  # rows shown in the samples table
)
# The callbacks that drive the rounds; the others only observe.
ROUND_CALLBACKS = ("self_play", "checkpoint")
# Keys checked as `rounds` and `round_overrides` are, wherever they appear.
ROUNDS_KEYS = ("rounds", "callbacks.self_play.rounds")
OVERRIDES_KEYS = ("round_overrides", "callbacks.self_play.round_overrides")


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _free(key: str, started: int) -> bool:
    if key.startswith("callbacks.") and key.split(".")[1] not in ROUND_CALLBACKS:
        return True  # an observer (progress bar, a callback of your own) may come and go
    if key in ROUNDS_KEYS or any(key == p or key.startswith(p + ".") for p in RESTART_FREE):
        return True
    for prefix in OVERRIDES_KEYS:
        if key == prefix:
            return True  # `round_overrides` alone is an empty {} on one side; its entries are compared
        if key.startswith(prefix + "."):
            round_key = key[len(prefix) + 1 :].split(".")[0]
            return round_key.isdigit() and int(round_key) >= started
    return False


def check_restart(before: dict, now: dict, finished: int, started: int) -> list[str]:
    """Refuse settings of a restarted run that it cannot honour; warnings for those it can.

    `before`: the resolved config the run directory was last started with; `finished`: its
    finished rounds; `started`: the rounds that have begun (finished, plus one in progress). Free
    to change: RESTART_FREE, `rounds` (not below `finished`), the round_overrides of rounds not
    yet started, and `trainer.devices` (with a warning).
    """
    if now["rounds"] < finished:
        raise ConfigError(f"rounds={now['rounds']}, but this run has already finished {finished} rounds")
    old, new = _flat(before), _flat(now)
    warnings, refused = [], {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a == b or _free(key, started) or REDACTED in (a, b):
            continue  # a redacted value cannot be compared (older runs redacted `max_new_tokens`)
        if key in ("trainer.devices", "trainer.num_nodes"):
            warnings.append(
                f"{key} changed from {a} to {b} since the run was started: the global batch changes with the "
                "number of processes, and a round planned before this restart keeps a schedule made for the "
                "old count. Allowed, but not verified to match an unchanged run"
            )
            continue
        refused[key] = (a, b)

    # A change set in one place shows again wherever it is interpolated (`lam` in `module.lam` and
    # `callbacks.self_play.lam`, `generation.seed` in `callbacks.self_play.generator.seed`): name
    # it once, where it was set.
    def repeated(key: str) -> bool:
        return any(
            other != key
            and refused[other] == refused[key]
            and (
                key.endswith("." + other)
                or (
                    key.startswith("callbacks.")
                    and not other.startswith("callbacks.")
                    and key.split(".")[-1] == other.split(".")[-1]
                )
            )
            for other in refused
        )

    lines = [
        f"{k}: {a!r} when the run was started, {b!r} now" for k, (a, b) in refused.items() if not repeated(k)
    ]
    if lines:
        raise ConfigError(
            "this run directory holds a run started with other settings, which a restart cannot honour:\n  "
            + "\n  ".join(lines)
            + "\nRun with the settings it was started with, or start a new run (another run directory). "
            "A restart may change: rounds (not below the rounds finished), the round_overrides of rounds "
            f"not yet started (from round {started} on), trainer.devices, and {', '.join(RESTART_FREE)}."
        )
    for w in warnings:
        log.warning(w)
    return warnings


# Keys renamed since a run may have been started (old -> new). A config that sets an old key is
# refused at start, naming the new one (`check_renamed` for the command line, `check_targets` for a
# YAML file), and a restart reads the settings its run recorded under the new names (`renamed_settings`).
BENCHMARK_KEYS = (  # issue 30: lm-eval's settings went from `eval` into `eval.benchmarks`
    "tasks",
    "num_fewshot",
    "limit",
    "include_path",
    "main_metrics",
    "average",
    "bootstrap_iters",
    "apply_chat_template",
)
RENAMED = {f"eval.{key}": f"eval.benchmarks.{key}" for key in BENCHMARK_KEYS}
WHY_RENAMED = "the lm-eval settings moved into eval.benchmarks, which eval=lm_eval and eval=open_llm_v1 set"


def renamed_key(key: str) -> str | None:
    """The new name of `key` (a dotted key, or one below it) if it was renamed, else None."""
    for old, new in RENAMED.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return None


def check_renamed(overrides: list[str]) -> None:
    """Refuse a command-line override of a renamed key, naming its new name (Hydra's own error
    would only say that the key is not in the config)."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        new = renamed_key(key)
        if new is not None:
            raise ConfigError(
                f"{key} is now {new}" + (f" ({new}={value})" if value else "") + f": {WHY_RENAMED}"
            )


def renamed_settings(settings: dict) -> dict:
    """A run's recorded settings (run_config.yaml) under today's names: a run started before the
    lm-eval settings moved into `eval.benchmarks` holds them in `eval`."""
    node = settings.get("eval")
    if not isinstance(node, dict) or "benchmarks" in node:
        return settings
    node = dict(node)
    old = {key: node.pop(key) for key in BENCHMARK_KEYS if key in node}
    node["benchmarks"] = (  # it ran benchmarks only when it named tasks
        {"_target_": "spinlab.harness.Harness", **old, "batch_size": node.get("batch_size")}
        if old.get("tasks")
        else None
    )
    return {**settings, "eval": node}


def check_settings(run_dir: RunDir, now: dict, finished: int, record: bool) -> None:
    """Hold a restart to the settings its run directory was started with (`check_restart`), then
    (`record`) store `now` as the run's settings (`record_settings`).

    A directory where nothing was made yet (no checkpoint, round or summary) may start afresh.
    """
    last = run_dir.last_checkpoint
    began = last.is_symlink() or any(p.exists() for p in (last, run_dir.summary, run_dir.root / "rounds"))
    if began and run_dir.run_config.exists():
        before = renamed_settings(OmegaConf.to_container(OmegaConf.load(run_dir.run_config)))
        check_restart(before, now, finished, finished + (finished < before["rounds"]))
    if record:
        record_settings(run_dir, now)


def record_settings(run_dir: RunDir, now: dict) -> None:
    """`now` as the run's settings in `run_config.yaml` (on rank 0, once the start is accepted)."""
    write_bytes(run_dir.run_config, OmegaConf.to_yaml(now).encode())


# `token` only at a key's end (`hub_token`): `max_new_tokens` is a setting, compared at restart.
SECRET = re.compile(r"(api[_-]?key|token$|secret|password|credential)", re.IGNORECASE)


REDACTED = "<redacted>"


def redact(node):
    """The config without values under secret-looking keys, for dumps and loggers."""
    if isinstance(node, dict):
        return {k: REDACTED if SECRET.search(str(k)) else redact(v) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    return node


def dirname(overrides: str, limit: int = 140) -> str:
    """A run directory name from Hydra's override_dirname: path separators become '_' so a
    path-valued override does not nest directories, and a name too long for the file system
    keeps its first characters plus a hash of the whole, so it stays unique and stable."""
    name = overrides.replace("/", "_") or "default"
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return name.encode()[: limit - 13].decode(errors="ignore") + "-" + digest


# Keys Hydra reads itself, not passed to the target.
HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}
# Keys kept in a group beside the settings they go with, but read by another part through an
# interpolation, not passed to the group's target: how many earlier rounds' pairs a round trains
# on is SelfPlayCallback's (`mix_previous_rounds: ${data.mix_previous_rounds}`).
READ_ELSEWHERE = {"data": ("mix_previous_rounds",)}


def own_keys(cfg, group: str):
    """`cfg[group]` to instantiate: without the keys READ_ELSEWHERE, interpolations intact."""
    node = copy.copy(cfg[group])
    with open_dict(node):
        for key in READ_ELSEWHERE.get(group, ()):
            node.pop(key, None)
    return node


def accepted_keys(target) -> set[str] | None:
    """The keyword arguments `target` takes; None when it takes any. A class whose __init__ passes
    **kwargs on to its base (the generation backends do) takes the base's keywords too."""
    inits = (
        [c.__init__ for c in target.__mro__ if "__init__" in vars(c)] if inspect.isclass(target) else [target]
    )
    names: set[str] = set()
    for init in inits:
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def check_targets(cfg) -> None:
    """Every node with a `_target_` has only keys its callable takes (unless it takes **kwargs).

    Runs on the composed config before anything is instantiated, so `+data.batch_sise=3` fails at
    start instead of after the model has loaded.
    """
    from hydra.utils import get_object

    def walk(node, path: str) -> None:
        if isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}[{i}]")
            return
        if not isinstance(node, dict):
            return
        target = node.get("_target_")
        if isinstance(target, str):
            try:
                params = accepted_keys(get_object(target))
            except (ImportError, ValueError, TypeError):
                params = None  # not importable or no signature: instantiate reports it
            if params is not None:
                names = params
                ignored = HYDRA_KEYS | set(READ_ELSEWHERE.get(path, ()))
                unknown = sorted(k for k in node if k not in names and k not in ignored)
                for key in unknown:
                    new = renamed_key(f"{path}.{key}")
                    if new is not None:
                        raise ConfigError(
                            f"{path}.{key} is now {new} ({target} takes no key {key!r}): {WHY_RENAMED}"
                        )
                if unknown:
                    raise ConfigError(
                        f"{path}: {target} takes no key {unknown[0]!r} ({path}.{unknown[0]}); "
                        f"its keys: {', '.join(sorted(names))}"
                    )
        for key, child in node.items():
            walk(child, f"{path}.{key}" if path else str(key))

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def picked_choices(config_name: str, overrides: list[str]) -> dict[str, dict]:
    """The config groups whose choice another group's config made, not the command line or the
    primary config's defaults (`override /generation@_global_.generation: static` in
    conf/trainer/gpu.yaml): {group: {"choice": "static", "by": "trainer=gpu", "file": <its path>}}.

    Read from Hydra's defaults list, which records which config made each override (Hydra
    offers no public accessor for that record; hydra-core is pinned to 1.3). Needs Hydra
    initialised (GlobalHydra), as it is inside @hydra.main and `initialize_config_dir`."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    loader = GlobalHydra.instance().config_loader()
    found = loader.compute_defaults_list(config_name, list(overrides), RunMode.RUN)
    # A choice whose config nests another of its group (eval/fast on eval/default) has no override
    # key: its group is its folder, and the choice the last entry (a config follows what it nests).
    choices = {}
    for d in found.defaults:
        group = d.override_key or d.config_path.rpartition("/")[0]
        if group:
            choices[group] = d.config_path
    picked = {}
    for group, made in found.overrides.override_metadata.items():
        by = made.containing_config_path
        if made.external_override or not made.used or by in (None, config_name) or group not in choices:
            continue
        source = next((s for s in loader.get_sources() if s.is_config(by)), None)
        picked[group] = {
            "choice": choices[group].removeprefix(group + "/"),
            "by": "=".join(by.rsplit("/", 1)),
            "file": f"{source.path}/{by}.yaml" if source is not None else f"{by}.yaml",
        }
    return picked


def build(node, **kwargs):
    """instantiate(node); an expected error of the object's own code (a bad value, a model that
    cannot be found) is raised as itself rather than inside Hydra's wrapper, so that it reads as a
    refusal. Any other error keeps Hydra's wrapper, which names the node."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def check_config(cfg) -> None:
    """Reject impossible values before anything slow starts (each with a ConfigError naming the key)."""
    check_lam(cfg.lam, "lam")
    for key in _seed_keys(OmegaConf.to_container(cfg, resolve=False)):
        seed = OmegaConf.select(cfg, key)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ConfigError(
                f"{key} must be an int in [0, 2**32 - 1] (the range numpy seeds from; Lightning's "
                f"seed_everything passes it there), got {seed!r}"
            )
    if not 0 <= cfg.warmup_ratio <= 1:
        raise ConfigError(
            f"warmup_ratio must be in [0, 1] (the share of each round's steps spent warming up), "
            f"got {cfg.warmup_ratio}"
        )
    if not isinstance(cfg.data.get("batch_size", 1), int) or cfg.data.get("batch_size", 1) < 1:
        raise ConfigError(
            f"data.batch_size must be an int >= 1 (pairs per process per step), got {cfg.data.batch_size}"
        )
    if cfg.rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {cfg.rounds}")
    if cfg.epochs_per_round < 1:
        raise ConfigError(f"epochs_per_round must be >= 1, got {cfg.epochs_per_round}")
    mix = cfg.data.get("mix_previous_rounds", 0)
    if not isinstance(mix, int) or mix < 0:
        raise ConfigError(f"data.mix_previous_rounds must be an int >= 0, got {mix}")
    if cfg.resume not in ("auto", "never"):
        raise ConfigError(f"resume must be 'auto' or 'never', got {cfg.resume!r}")
    num_prompts = cfg.data.get("num_prompts")
    if num_prompts is not None and (not isinstance(num_prompts, int) or num_prompts < 1):
        raise ConfigError(
            f"data.num_prompts must be an int >= 1 (prompts per round), or null for the whole training "
            f"split; got {num_prompts}"
        )
    lengths = cfg.data.get("max_prompt_length"), cfg.data.get("max_length")
    if None not in lengths and lengths[0] >= lengths[1]:
        raise ConfigError(
            f"data.max_prompt_length ({lengths[0]}) must be below data.max_length ({lengths[1]}), "
            "or leave both null to measure them from the data"
        )
    cfg.round_overrides = round_overrides(OmegaConf.to_container(cfg.round_overrides), cfg.rounds)
    check_lr(cfg)
    check_targets(cfg)
    check_module(cfg.module)
    check_combinations(cfg)
    # A bad generation setting, or an engine its interpreter lacks (generation=vllm), fails here.
    build(cfg.generation)
    if cfg.trainer.get("accelerator") == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise NotFoundError(
                "this config trains on GPUs (trainer.accelerator=gpu) but torch sees no CUDA device: "
                "run it on a GPU machine, or use trainer=cpu"
            )


# Largest λ accepted. λ scales the margin and every gradient, which RMSprop and AdamW then square:
# past about 1e15 a step overflows float32 (max 3.4e38; the tiny model's first steps are already
# non-finite at 1e18), while SPIN's λ is a KL strength of order 0.1 to 5 (the paper's). 1e6 keeps
# nine orders of magnitude from the overflow and five above any λ a recipe uses.
LAM_MAX = 1e6


def check_lam(lam, key: str) -> None:
    if not math.isfinite(lam) or not 0 < lam <= LAM_MAX:
        too_large = (
            " (larger λ make the margin and the gradients, squared by the optimizer, overflow float32)"
        )
        raise ConfigError(
            f"{key} must be a finite number in (0, {LAM_MAX:g}] (the KL strength λ; the paper uses 0.1 "
            f"to 5.0), got {lam}{too_large if math.isfinite(lam) and lam > LAM_MAX else ''}"
        )


def _seed_keys(node, prefix: str = ""):
    """The dotted key of every `seed` in a config."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "seed":
                yield f"{prefix}{key}"
            yield from _seed_keys(value, f"{prefix}{key}.")


def check_lr(cfg) -> None:
    """A negative or non-finite learning rate is refused; a round whose lr is 0 trains nothing,
    which a control run may want, and is said at start."""
    from spinlab.rounds import round_settings
    from spinlab.rundir import is_launching_rank

    lr = cfg.optimizer.get("lr")
    if lr is None:
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ConfigError(f"optimizer.lr must be a finite number >= 0 (each round's peak lr), got {lr!r}")
    base = {"lr": float(lr), "lam": cfg.lam, "mix_previous_rounds": 0}
    overrides = OmegaConf.to_container(cfg.round_overrides)
    idle = [r for r in range(cfg.rounds) if round_settings(r, base, overrides)["lr"] == 0]
    if idle and is_launching_rank():
        log.warning(
            "round%s %s train%s with lr 0 (optimizer.lr=%g%s): the policy stays as the round began, so "
            "the next opponent is the same model; set optimizer.lr or round_overrides.<round>.lr if "
            "that is not what you want",
            "s" if len(idle) > 1 else "",
            ", ".join(map(str, idle)),
            "" if len(idle) > 1 else "s",
            lr,
            ", round_overrides" if overrides else "",
        )


def check_module(node) -> None:
    """The policy module's settings, which PolicyModule checks only once the weights are loaded."""
    from spinlab.module import OPPONENT_MODES
    from spinlab.steps import NONFINITE_POLICIES

    if node.get("opponent", "cached") not in OPPONENT_MODES:
        raise ConfigError(f"opponent={node.opponent!r} is not one of {OPPONENT_MODES}")
    if node.get("on_nonfinite", "stop") not in NONFINITE_POLICIES:
        raise ConfigError(f"module.on_nonfinite={node.on_nonfinite!r} is not one of {NONFINITE_POLICIES}")
    if node.get("compile_layers", False) not in (True, False, "auto"):
        raise ConfigError(f"module.compile_layers must be true, false or auto, got {node.compile_layers!r}")
    chunk = node.get("logprob_chunk_size")
    if chunk not in (None, "auto") and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ConfigError(f"module.logprob_chunk_size must be a positive int, 'auto' or null, got {chunk!r}")
    if node.get("liger_kernels") and importlib.util.find_spec("liger_kernel") is None:
        raise NotFoundError(
            "module.liger_kernels=true needs liger-kernel, which is not installed: on a machine with CUDA and "
            "triton, pip install -e '.[liger]'; or set module.liger_kernels=false"
        )


def check_combinations(cfg: DictConfig) -> None:
    """Choices of different groups that cannot go together, refused before the weights load
    (PolicyModule would meet them only then)."""
    from hydra.utils import get_class

    objective = get_class(cfg.objective._target_)
    if cfg.get("opponent") == "model" and not objective.needs_opponent:
        raise ConfigError(
            f"opponent=model keeps a frozen copy of the policy, but objective {objective.__name__} uses no "
            "opponent log-probs: leave opponent=cached (nothing is cached for it)"
        )
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if cfg.model.get("lora") and target.endswith("FSDP2Strategy"):
        raise ConfigError(
            "model.lora with a sharded trainer (fsdp, fsdp_cpu) is not supported: LoRA keeps the weights "
            "frozen, so train it with trainer=cpu/gpu/ddp_cpu, or drop model.lora to shard"
        )


def register() -> None:
    schema = OmegaConf.structured(TrainConfig)
    # Not struct, so `round_overrides.2.lr=1e-7` adds a round from the command line without `+`;
    # the entries are checked and typed at start (`round_overrides`).
    OmegaConf.set_struct(schema.round_overrides, False)
    ConfigStore.instance().store(name="train_schema", node=schema)
    if not OmegaConf.has_resolver("spinlab.dirname"):
        OmegaConf.register_new_resolver("spinlab.dirname", dirname)


register()
