from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import spinlab.config  # noqa: F401  (registers the schema train.yaml builds on)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process, here and in every process a test starts (they inherit the environment):
# the tiny models run faster on one thread than on a shared machine's two, the two xdist workers
# then share two cores without their thread pools fighting, and runs compared in a test are made
# with the same thread count (a reduction split over another count rounds differently).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# The fast preset with the tiny model: two rounds in seconds.
TINY = ["debug=fast"]


def compose_cfg(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.run_dir = str(run_dir) if run_dir is not None else "/nonexistent/run_dir"
        cfg.run_name = ",".join(overrides)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_cfg([*TINY, *overrides], tmp_path / "run")

    return make


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """`make(path)` once per test session, in whichever process asks first: under xdist the workers
    share one base directory, and the others wait for the first and then read what it made. A make
    that failed is tried again by the next. What it made is shared: copy it before changing it."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # popen-gw0's parent: the session's, shared by every worker
    path, done = base / name, base / f"{name}.done"
    with FileLock(base / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            make(path)
            done.touch()
    return path


# The run several modules compare against: two rounds of debug=fast, 4 prompts per generation
# batch (so that a kill can land between a round's batches). Made in-process here; a `python
# train.py` with the same settings, forked or fresh, makes it bit for bit.
REFERENCE = ["debug=fast", "data.num_prompts=16", "generation.batch_size=4"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The finished REFERENCE run, made once per test session (test_e2e, test_reliability,
    test_refusals, test_faults, test_sharded and test_ddp compare against it). Read-only: copy it
    to change it."""

    def make(path: Path) -> None:
        from spinlab.run import run

        run(compose_cfg(REFERENCE, path))

    return made_once(tmp_path_factory, "reference_run", make)


# -- how `make test` runs the suite: two pytest-xdist workers (docs/development.md) -------------------
# `pytest -n 2 --dist loadscope --no-loadscope-reorder`: a test module is one unit of work, run whole
# by one worker (its module-scoped runs are made once, a sequence of README commands stays in
# order), the units handed out longest first so that the two workers end together. The README's
# demo, the longest test, is a unit of its own (a class of test_readme.py: xdist's scope).
LONGEST_FIRST = [
    "test_readme.py::TestDemo",
    "test_readme.py",
    "test_vllm.py",
    "test_families.py",
    "test_benchmarks.py",
    "test_faults.py",
    "test_sharded.py",
    "test_refusals.py",
    "test_reliability.py",
    "test_e2e.py",
    "test_harness.py",
    "test_configs.py",
    "test_models.py",
]


def scope(item: pytest.Item) -> str:
    return f"{item.path.name}::{item.cls.__name__}" if item.cls is not None else item.path.name


def pytest_collection_modifyitems(config, items):
    def rank(item):
        key = scope(item)
        return LONGEST_FIRST.index(key) if key in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep their order
