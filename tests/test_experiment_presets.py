"""The spin_vs_sft presets: a weak SFT model from scratch, then SPIN or continued SFT from it."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from spinlab.config import dirname
from spinlab.models import tiny_model
from spinlab.module import SFTModule, SPINModule
from tests.conftest import compose_cfg


def test_weak_sft_preset_builds_an_sft_run_from_scratch():
    cfg = compose_cfg(["experiment=weak_sft", "seed=2"])
    loaded = instantiate(cfg.model)
    module = instantiate(cfg.module, policy=loaded.model)
    assert isinstance(module, SFTModule)
    assert loaded.model.config.hidden_size == 128 and loaded.model.config.num_hidden_layers == 4
    params = sum(p.numel() for p in loaded.model.parameters())
    assert 0.5e6 < params < 1.5e6
    assert (cfg.rounds, cfg.epochs_per_round, cfg.data.num_prompts, cfg.seed) == (1, 3, None, 2)
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.lr == 2e-3


@pytest.mark.parametrize("arm", [[], ["data.mix_previous_rounds=1"], ["module=sft"]])
def test_spin_vs_sft_arms_start_from_the_weak_model_of_their_seed(arm, tmp_path):
    cfg = compose_cfg(["experiment=spin_vs_sft", "seed=1", *arm])
    OmegaConf.resolve(cfg)
    assert cfg.model.name_or_path == "outputs/weak_sft/experiment=weak_sft,seed=1/hf/round_000"
    weak = tiny_model(hidden_size=128, num_layers=4, intermediate_size=384, seed=5)
    weak.model.save_pretrained(tmp_path / "weak")
    weak.tokenizer.save_pretrained(tmp_path / "weak")
    cfg.model.name_or_path = str(tmp_path / "weak")
    loaded = instantiate(cfg.model)
    assert torch.equal(loaded.model.lm_head.weight, weak.model.lm_head.weight)
    module = instantiate(cfg.module, policy=loaded.model)
    assert isinstance(module, SFTModule if arm == ["module=sft"] else SPINModule)
    # Both arms: 4 rounds of one epoch over the same prompts with the same optimizer.
    assert (cfg.rounds, cfg.epochs_per_round, cfg.optimizer.lr) == (4, 1, 5e-4)


def test_run_directory_names_stay_valid():
    assert dirname("loss=hinge,seed=1") == "loss=hinge,seed=1"
    assert dirname("") == "default"
    assert dirname("model.name_or_path=/a/b") == "model.name_or_path=_a_b"  # no nested directories
    long = ",".join(f"data.option_{i}={i}" for i in range(40))
    short = dirname(long)
    assert len(short.encode()) <= 140 and short.startswith("data.option_0=0")
    assert short == dirname(long) and short != dirname(long + "x")  # stable and unique
