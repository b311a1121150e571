"""The schema of conf/train.yaml's top level, so that Hydra refuses a mistyped key or a
wrongly typed value when the config is composed, wherever it comes from (command line,
experiment preset, your own YAML). The groups (model, data, ...) are checked by `check_targets`
before anything is built: a key that the `_target_` does not take fails at start, naming the
group, the class and the key.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


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
    run_name: str = ""
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


SECRET = re.compile(r"(api[_-]?key|token|secret|password|credential)", re.IGNORECASE)


def redact(node):
    """The config without values under secret-looking keys, for dumps and loggers."""
    if isinstance(node, dict):
        return {k: "<redacted>" if SECRET.search(str(k)) else redact(v) for k, v in node.items()}
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


def check_targets(cfg) -> None:
    """Every node with a `_target_` has only keys its callable takes (unless it takes **kwargs).

    Runs on the composed config before anything is instantiated, so `+data.batch_sise=3` fails at
    start instead of after the model has loaded.
    """
    from hydra._internal.utils import _locate

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
                params = inspect.signature(_locate(target)).parameters.values()
            except (ImportError, ValueError, TypeError):
                params = None  # not importable or no signature: instantiate reports it
            if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params):
                names = {p.name for p in params if p.kind is not p.VAR_POSITIONAL}
                unknown = sorted(k for k in node if k not in names and k not in HYDRA_KEYS)
                if unknown:
                    raise ValueError(
                        f"{path}: {target} takes no key {unknown[0]!r} ({path}.{unknown[0]}); "
                        f"its keys: {', '.join(sorted(names))}"
                    )
        for key, child in node.items():
            walk(child, f"{path}.{key}" if path else str(key))

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("spinlab.dirname"):
        OmegaConf.register_new_resolver("spinlab.dirname", dirname)


register()
