from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import spinlab.config  # noqa: F401  (registers the schema train.yaml builds on)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
