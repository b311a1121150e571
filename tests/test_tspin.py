"""T-SPIN as a config choice: the objective group, triplet batches, proto-synthetic responses kept
in the run directory, two rounds end to end and resume."""

import csv
import functools
import json
import math

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import open_dict
from safetensors.torch import load_file

import spinlab.run
from spinlab import losses
from spinlab.data import SelfPlayDataModule
from spinlab.models import pretrained, tiny_model
from spinlab.module import PolicyModule
from spinlab.objectives import SFT, SPIN, TSPIN
from spinlab.report import print_summary
from spinlab.rounds import RealPairs, Round, SyntheticPairs, TripletPairs
from spinlab.rundir import RunDir
from tests.conftest import CONF, compose_cfg
from tests.helpers import Crash, RecordPairs, first_batch, response_logp, step_losses

NUM_PROMPTS = 16
TRIPLETS = [
    {"prompt": "2 + 3?", "real": "2 + 3 = 5. The answer is 5.", "synthetic": "It is 7", "proto": "5 5 5"},
    {"prompt": "4 * 6?", "real": "4 * 6 = 24.", "synthetic": "4 * 6 = 20, I think.", "proto": "24?"},
]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(path):
    return load_file(str(path / "model.safetensors"))


def run(tmp_path, name, *overrides, extra_callbacks=None):
    cfg = compose_cfg(
        ["debug=fast", "objective=tspin", f"data.num_prompts={NUM_PROMPTS}", *overrides], tmp_path / name
    )
    with open_dict(cfg):
        for key, value in (extra_callbacks or {}).items():
            cfg.callbacks[key] = value
    return spinlab.run.run(cfg), cfg


# -- the config group ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, objective, pairs",
    [
        ([], SPIN, SyntheticPairs),
        (["objective=spin"], SPIN, SyntheticPairs),
        (["objective=tspin"], TSPIN, TripletPairs),
        (["objective=sft"], SFT, RealPairs),
    ],
)
def test_objective_group_picks_its_pairs_and_builds_the_module(overrides, objective, pairs):
    """`objective` is the one knob for the method: the module group has one option."""
    assert sorted(p.stem for p in (CONF / "objective").glob("*.yaml")) == ["sft", "spin", "tspin"]
    assert sorted(p.stem for p in (CONF / "module").glob("*.yaml")) == ["default"]
    cfg = compose_cfg(["model=tiny", *overrides])
    built = instantiate(cfg.module, policy=tiny_model().model)
    assert type(built) is PolicyModule and type(built.objective) is objective
    builder = instantiate(cfg.pairs)
    assert type(builder) is pairs and builder.kinds == built.objective.kinds


def test_tspin_config_carries_loss_and_constants_from_the_command_line():
    cfg = compose_cfg(
        ["model=tiny", "objective=tspin", "loss=hinge", "objective.alpha=2", "objective.beta=0.3"]
    )
    built = instantiate(cfg.module, policy=tiny_model().model)
    assert (built.objective.alpha, built.objective.beta, built.objective.beta_first_round) == (2.0, 0.3, 0.0)
    assert built.objective.loss(torch.tensor([0.25])).item() == pytest.approx(0.75)  # hinge: 1 − 0.25


def test_tspin_refuses_a_frozen_opponent_copy():
    cfg = compose_cfg(["model=tiny", "objective=tspin", "opponent=model"])
    with pytest.raises(InstantiationException, match="uses no opponent log-probs"):
        instantiate(cfg.module, policy=tiny_model().model)


def test_pairs_that_lack_a_kind_fail_before_anything_is_generated(tmp_path):
    with pytest.raises(ValueError, match=r"TSPIN trains on .*'proto'.*SyntheticPairs provides"):
        run(tmp_path, "run", "pairs=synthetic")
    assert not (tmp_path / "run" / "rounds").exists()


# -- batches and the loss ------------------------------------------------------------------------
def make_tspin(index: int):
    loaded = tiny_model(seed=0)
    module = PolicyModule(
        policy=loaded.model,
        optimizer=functools.partial(torch.optim.SGD, lr=1e-2),
        objective=TSPIN(losses.logistic, alpha=0.5, beta=0.1),
    )
    module.round = Round(
        index=index, lam=0.1, lr=1e-2, mix_previous_rounds=0, start_step=0, total_steps=1, pairs=2
    )
    dm = SelfPlayDataModule(source=None, tokenizer=loaded.tokenizer, max_length=96, max_prompt_length=48)
    dm.set_pairs(TRIPLETS)
    return module, dm, loaded


def test_triplets_collate_real_then_synthetic_then_proto():
    _, dm, loaded = make_tspin(1)
    tok = loaded.tokenizer
    batch = next(iter(dm.scoring_dataloader()))
    assert batch["input_ids"].shape[0] == 3 * len(TRIPLETS)
    for k, kind in enumerate(("real", "synthetic", "proto")):
        for i, triplet in enumerate(TRIPLETS):
            labels = batch["labels"][k * len(TRIPLETS) + i]
            expected = tok(triplet[kind], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert labels[labels != -100].tolist() == expected, (kind, i)
    spin = SelfPlayDataModule(source=None, tokenizer=tok, max_length=96, max_prompt_length=48)
    spin.set_pairs([{k: v for k, v in t.items() if k != "proto"} for t in TRIPLETS])
    assert next(iter(spin.scoring_dataloader()))["input_ids"].shape[0] == 2 * len(TRIPLETS)


@pytest.mark.parametrize("index, beta", [(0, 0.0), (1, 0.1)])
def test_tspin_module_loss_matches_log_probs_computed_by_hand(index, beta):
    module, dm, loaded = make_tspin(index)
    out = module.loss_and_metrics(next(iter(dm.scoring_dataloader())))
    expected = []
    for triplet in TRIPLETS:
        real, synthetic, proto = (
            response_logp(loaded.model, loaded.tokenizer, triplet["prompt"], triplet[kind])
            for kind in ("real", "synthetic", "proto")
        )
        # α = 0.5, logistic ℓ(x) = log(1 + e^−x); β = 0 in round 0, 0.1 after.
        current = math.log1p(math.exp(-0.5 * (real - synthetic)))
        history = math.log1p(math.exp(-0.5 * (synthetic - proto)))
        expected.append(current + beta * history)
    assert out["loss"].item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert out["logp_proto"].tolist() == pytest.approx(
        [response_logp(loaded.model, loaded.tokenizer, t["prompt"], t["proto"]) for t in TRIPLETS], rel=1e-4
    )


# -- whole runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tspin_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tspin")
    RecordPairs.seen = {}
    summary, cfg = run(tmp, "run", extra_callbacks={"record": {"_target_": "tests.helpers.RecordPairs"}})
    seen = {index: [p["proto"] for p in pairs] for index, pairs in RecordPairs.seen.items()}
    return tmp / "run", summary, cfg, seen


def test_two_tspin_rounds_train_on_the_same_proto_responses(tspin_run):
    root, summary, _, seen = tspin_run
    proto = rows(root / "rounds" / "proto.jsonl")
    round0 = rows(root / "rounds" / "round_000" / "synthetic.jsonl")
    round1 = rows(root / "rounds" / "round_001" / "synthetic.jsonl")
    assert len(proto) == NUM_PROMPTS and set(proto[0]) == {"prompt", "proto", "meta"}
    # The proto responses are round 0's samples of θ_0, and both rounds trained on exactly them.
    assert [p["proto"] for p in proto] == [r["synthetic"] for r in round0]
    assert seen[0] == seen[1] == [p["proto"] for p in proto]
    assert [r["synthetic"] for r in round1] != [p["proto"] for p in proto]  # the opponent changed
    # Nothing is cached: T-SPIN uses no opponent log-probs.
    assert not list(root.rglob("opponent_logps.pt"))
    assert sorted(summary) == [0, 1]
    # Round 0: synthetic and proto are the same responses, so the historical margin is exactly 0.
    assert summary[0]["margin_history"] == 0.0 and summary[1]["margin_history"] != 0.0
    with open(root / "csv" / "metrics.csv") as f:
        header = next(csv.reader(f))
    for name in ("train/loss", "train/margin", "train/margin_history", "train/logp_proto"):
        assert name in header, name


def test_tspin_first_step_of_each_round_matches_a_hand_computation(tspin_run):
    """A round's first step scores its first batch with the policy the round starts from (θ_0,
    then the policy saved after round 0): ℓ(α[log p(y) − log p(y')]) + β·ℓ(α[log p(y') − log p(y0)]),
    ℓ logistic written out as log(1 + exp(−t)), β = 0 in round 0."""
    root, summary, cfg, _ = tspin_run
    proto = [p["proto"] for p in rows(root / "rounds" / "proto.jsonl")]
    losses = step_losses(root)
    alpha = cfg.objective.alpha
    for index, model, beta in (
        (0, tiny_model(seed=cfg.seed), cfg.objective.beta_first_round),
        (1, pretrained(str(root / "hf" / "round_000")), cfg.objective.beta),
    ):
        pairs = rows(root / "rounds" / f"round_{index:03d}" / "synthetic.jsonl")
        expected = []
        for i in first_batch(cfg, epoch=index):
            real, synthetic, old = (
                response_logp(model.model, model.tokenizer, pairs[i]["prompt"], y)
                for y in (pairs[i]["real"], pairs[i]["synthetic"], proto[i])
            )
            current = math.log1p(math.exp(-alpha * (real - synthetic)))
            history = math.log1p(math.exp(-alpha * (synthetic - old)))
            expected.append(current + beta * history)
        assert losses[index][0] == pytest.approx(sum(expected) / len(expected), rel=1e-4), index
        # The round's loss: the mean of its pairs' losses, here of its equal batches' losses.
        assert summary[index]["loss"] == pytest.approx(sum(losses[index]) / len(losses[index]), rel=1e-6)


def test_tspin_rounds_move_the_policy(tspin_run):
    root, _, cfg, _ = tspin_run
    start = tiny_model(seed=cfg.seed).model.state_dict()
    r0, r1 = weights(root / "hf" / "round_000"), weights(root / "hf" / "round_001")
    for name, tensor in r0.items():
        assert not torch.equal(tensor, start[name]), name
        assert not torch.equal(r1[name], tensor), name


@pytest.mark.parametrize("epoch, batch", [(1, 0), (1, 2)])
def test_tspin_resume_after_round_zero_keeps_the_proto_responses(tspin_run, tmp_path, epoch, batch):
    root, _, _, _ = tspin_run
    crash = {"_target_": "tests.helpers.CrashAtBatch", "epoch": epoch, "batch": batch}
    with pytest.raises(Crash):
        run(tmp_path, "run", extra_callbacks={"crash": crash})
    proto = tmp_path / "run" / "rounds" / "proto.jsonl"
    before, written = proto.read_bytes(), proto.stat().st_mtime_ns
    assert not (tmp_path / "run" / "hf" / "round_001").exists()
    run(tmp_path, "run")  # the same command again
    assert proto.read_bytes() == before and proto.stat().st_mtime_ns == written  # read back, not rewritten
    assert before == (root / "rounds" / "proto.jsonl").read_bytes()
    for r in ("round_000", "round_001"):
        a, b = weights(root / "hf" / r), weights(tmp_path / "run" / "hf" / r)
        for name in a:
            assert torch.equal(a[name], b[name]), (r, name)


@pytest.mark.parametrize(
    "target, heading",
    [
        ("spinlab.objectives.TSPIN", "T-SPIN rounds (accuracy"),
        ("spinlab.objectives.SPIN", "SPIN rounds (accuracy"),
    ],
)
def test_the_closing_table_names_the_method_that_trained(target, heading, capsys, tmp_path):
    summaries = {0: {"loss": 0.5, "margin": 0.25, "accuracy": 0.75, "pairs": 8, "seconds": 1.0}}
    print_summary(summaries, RunDir(tmp_path), target)
    out = capsys.readouterr().out
    assert f"\n{heading}" in out and "0.2500" in out
