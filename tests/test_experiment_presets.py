"""The spin_vs_sft presets: a weak SFT model from scratch, then SPIN or continued SFT from it."""

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from spinlab.config import dirname, own_keys
from spinlab.models import tiny_model
from spinlab.module import PolicyModule
from spinlab.objectives import SFT, SPIN
from tests.conftest import compose_cfg


def test_weak_sft_preset_builds_the_documented_sft_run_from_scratch(tmp_path):
    """experiments/spin_vs_sft/README.md: "a Llama of 0.8M parameters over characters (hidden 128,
    4 layers, 4 heads, 2 KV heads, MLP 384), trained from scratch by objective=sft for 3 epochs on
    the 2000 training prompts (AdamW, lr 2e-3, batch 16)", one per seed."""
    cfg = compose_cfg(["experiment=weak_sft", "seed=2"], tmp_path)
    loaded = instantiate(cfg.model)
    documented = tiny_model(
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384, seed=2
    )
    built, expected = loaded.model.state_dict(), documented.model.state_dict()
    assert built.keys() == expected.keys() and all(torch.equal(built[k], expected[k]) for k in built)
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(0.8e6, rel=0.1)
    other_seed = instantiate(compose_cfg(["experiment=weak_sft", "seed=3"]).model).model
    assert not torch.equal(other_seed.lm_head.weight, loaded.model.lm_head.weight)
    module = instantiate(cfg.module, policy=loaded.model)
    assert isinstance(module.objective, SFT)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 2e-3
    callback = instantiate(cfg.callbacks.self_play)
    assert (callback.rounds, callback.epochs_per_round) == (1, 3)
    dm = instantiate(own_keys(cfg, "data"), tokenizer=loaded.tokenizer)
    assert len(dm.load_split("train")) == 2000 and dm.batch_size == 16


def load_from_saved_start(cfg, path, seed):
    """Save a tiny start model at `path`, point the config's model at it and load it back."""
    start = tiny_model(hidden_size=128, num_layers=4, intermediate_size=384, seed=seed)
    start.model.save_pretrained(path)
    start.tokenizer.save_pretrained(path)
    cfg.model.name_or_path = str(path)
    loaded = instantiate(cfg.model)
    assert torch.equal(loaded.model.lm_head.weight, start.model.lm_head.weight)
    return loaded


@pytest.mark.parametrize("arm", [[], ["data.mix_previous_rounds=1"], ["objective=sft"]])
def test_spin_vs_sft_arms_start_from_the_weak_model_of_their_seed(arm, tmp_path):
    cfg = compose_cfg(["experiment=spin_vs_sft", "seed=1", *arm])
    OmegaConf.resolve(cfg)
    assert cfg.model.name_or_path == "outputs/weak_sft/experiment=weak_sft,seed=1/hf/round_000"
    loaded = load_from_saved_start(cfg, tmp_path / "weak", seed=5)
    module = instantiate(cfg.module, policy=loaded.model)
    assert isinstance(module.objective, SFT if arm == ["objective=sft"] else SPIN)
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


def test_converged_sft_preset_trains_the_weak_model_architecture_round_by_round():
    cfg = compose_cfg(["experiment=converged_sft"])
    loaded = instantiate(cfg.model)
    module = instantiate(cfg.module, policy=loaded.model)
    assert isinstance(module.objective, SFT)
    assert (loaded.model.config.hidden_size, loaded.model.config.num_hidden_layers) == (128, 4)
    # Each round is evaluated on validation, where the plateau is read; the test split stays unseen.
    assert (cfg.rounds, cfg.epochs_per_round, cfg.eval.split) == (20, 2, "validation")


@pytest.mark.parametrize(
    ("objective", "objective_cls", "pairs_cls"),
    [
        ("spin", "SPIN", "SyntheticPairs"),
        ("tspin", "TSPIN", "TripletPairs"),
        ("sft", "SFT", "RealPairs"),
    ],
)
def test_self_play_family_methods_share_the_start_and_differ_only_in_the_objective(
    objective, objective_cls, pairs_cls, tmp_path
):
    cfg = compose_cfg(["experiment=self_play_family", f"objective={objective}", "seed=2"])
    assert cfg.model.name_or_path == "experiments/self_play_family/runs/start"
    loaded = load_from_saved_start(cfg, tmp_path / "start", seed=3)
    module = instantiate(cfg.module, policy=loaded.model)
    assert isinstance(module, PolicyModule)
    assert type(module.objective).__name__ == objective_cls
    assert type(instantiate(cfg.pairs)).__name__ == pairs_cls
    assert (cfg.rounds, cfg.epochs_per_round, cfg.eval.split, cfg.data.num_prompts) == (3, 1, "test", None)


def _choose(monkeypatch, tmp_path, curve):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "self_play_family" / "choose.py"
    spec = importlib.util.spec_from_file_location("family_choose", path)
    choose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(choose)
    monkeypatch.setattr(choose, "RUNS", tmp_path)
    run = tmp_path / "sft_start"
    for r in range(len(curve)):
        (run / "hf" / f"round_{r:03d}").mkdir(parents=True)
    summary = [{"round": r, choose.KEY: v, choose.TIE: 0.1} for r, v in enumerate(curve)]
    (run / "summary.json").write_text(json.dumps(summary))
    return choose


def test_start_is_chosen_only_once_validation_loglik_plateaus(monkeypatch, tmp_path):
    choose = _choose(monkeypatch, tmp_path, [-30.0, -12.0, -8.0, -7.5])
    assert choose.select_start(tol=0.1) == 1  # still rising by 0.5 nats: extend the run
    assert not (tmp_path / "start").exists()
    choose = _choose(monkeypatch, tmp_path / "b", [-30.0, -12.0, -8.0, -7.97, -8.4])
    assert choose.select_start(tol=0.1) == 0
    assert (tmp_path / "b" / "start").resolve() == (
        tmp_path / "b" / "sft_start" / "hf" / "round_003"
    ).resolve()


def test_baseline_evaluates_the_start_model_as_the_rounds_do(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "baseline.py"
    spec = importlib.util.spec_from_file_location("experiments_baseline", path)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    start = tiny_model(seed=4)
    start.model.save_pretrained(tmp_path / "start")
    start.tokenizer.save_pretrained(tmp_path / "start")
    overrides = [
        "experiment=self_play_family",
        f"model.name_or_path={tmp_path / 'start'}",
        "data.num_prompts=8",
        "eval.heldout_pairs=4",
        "eval.task_prompts=4",
        "eval.max_new_tokens=8",
        "generation.max_new_tokens=8",
    ]
    results = baseline.main(overrides, out=tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == results
    # The policy is its own opponent here: the held-out margin is exactly 0, the rest is θ_0's.
    assert results["eval/heldout_margin"] == 0.0
    assert results["eval/heldout_logp_real"] < 0 and 0 <= results["eval/task_accuracy"] <= 1
