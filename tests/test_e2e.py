"""Whole runs of the tiny model: rounds, run directory, opponent hand-over, resume."""

import csv
import hashlib
import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
from omegaconf import open_dict
from safetensors.torch import load_file

import spinlab.run
from spinlab import losses
from spinlab.collective import score_pairs
from spinlab.data import SelfPlayDataModule
from spinlab.errors import RunDirError
from spinlab.models import pretrained, tiny_model
from spinlab.module import PolicyModule
from spinlab.objectives import SPIN
from tests.conftest import REFERENCE, compose_cfg
from tests.helpers import Crash

NUM_PROMPTS = 16


def run(tmp_path, name, *overrides, extra_callbacks=None, generator=None):
    """A run made as conftest's reference run is, with `overrides`."""
    cfg = compose_cfg([*REFERENCE, *overrides], tmp_path / name)
    with open_dict(cfg):
        for key, value in (extra_callbacks or {}).items():
            cfg.callbacks[key] = value
        if generator is not None:
            cfg.callbacks.self_play.generator = generator
    return spinlab.run.run(cfg), cfg


def weights(path):
    return load_file(str(path / "model.safetensors"))


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Every run of this module on one thread (as conftest sets it, restated: reductions split over
    # another thread count round differently, and test_per_step_losses_of_a_whole_run pins numbers).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(reference_run):
    """conftest's reference run, its summaries (read back, as a rerun returns them) and its config."""
    summaries = {s["round"]: s for s in json.loads((reference_run / "summary.json").read_text())}
    return reference_run, summaries, compose_cfg(REFERENCE, reference_run)


def test_two_rounds_leave_the_documented_run_directory(reference):
    root, _, cfg = reference
    for r in (0, 1):
        rd = root / "rounds" / f"round_{r:03d}"
        pairs = rows(rd / "synthetic.jsonl")
        assert len(pairs) == NUM_PROMPTS
        assert len({p["prompt"] for p in pairs}) == NUM_PROMPTS
        assert set(pairs[0]) == {"prompt", "real", "synthetic", "meta"} and pairs[0]["meta"]["round"] == r
        assert (rd / "opponent_logps.pt").exists() and (rd / "stats.json").exists()
        assert json.loads((rd / "stats.json").read_text())["generation"]["new_tokens"] > 0
        hf = root / "hf" / f"round_{r:03d}"
        assert (hf / "model.safetensors").exists() and (hf / "config.json").exists()
        assert (hf / "tokenizer.json").exists()
    assert (root / "checkpoints" / "last.ckpt").exists()
    assert not list(root.rglob("*.tmp")) and not list(root.rglob("*.partial.jsonl"))
    with open(root / "csv" / "metrics.csv") as f:
        header = next(csv.reader(f))
    for name in (
        "train/loss",
        "train/margin",
        "train/accuracy",
        "train/reward_real",
        "train/reward_synthetic",
        "train/logp_real",
        "train/logp_synthetic",
        "round",
        "gen/tokens_per_s",
        "perf/tokens_per_s",
    ):
        assert name in header, name
    saved = json.loads((root / "summary.json").read_text())
    assert [s["round"] for s in saved] == [0, 1]
    assert saved[0]["pairs"] == NUM_PROMPTS
    with open(root / "csv" / "metrics.csv") as f:
        steps = [r for r in csv.DictReader(f) if r.get("train/accuracy")]
    for entry in saved:
        mine = [r for r in steps if float(r["round"]) == entry["round"]]
        assert len(mine) == NUM_PROMPTS // cfg.data.batch_size
        # A round's loss is the mean of its pairs' losses: with equal batches, the mean of the
        # per-step losses (the per-step rows come from the logging window, not the round's metric).
        step_losses = [float(r["train/loss"]) for r in mine]
        assert entry["loss"] == pytest.approx(sum(step_losses) / len(step_losses), rel=1e-6)
        # A round's accuracy is the share of its pairs with margin > 0: a whole number of pairs,
        # the mean of its equal-sized batches' shares.
        correct = entry["accuracy"] * NUM_PROMPTS
        assert correct == pytest.approx(round(correct), abs=1e-6)
        assert entry["accuracy"] == pytest.approx(sum(float(r["train/accuracy"]) for r in mine) / len(mine))
        # At a round's first step the policy is still its opponent: margin 0, loss log 2.
        first = min(mine, key=lambda r: int(r["step"]))
        assert float(first["train/loss"]) == pytest.approx(math.log(2), abs=1e-5)
        assert float(first["train/margin"]) == pytest.approx(0.0, abs=1e-5)


# The per-step losses of the reference run (conftest.REFERENCE: debug=fast, two rounds of 4 steps,
# one thread), as printed by the run that wrote this test. A change meant to alter training (data,
# sampling, initialisation, loss, optimizer) moves them: rerun the test, paste the new numbers from
# its failure message, and say in the commit why they moved. Steps 0 and 4 start a round: log 2.
REFERENCE_STEP_LOSSES = [
    0.6931471824645996,
    0.036838285624980927,
    0.019104385748505592,
    0.008806641213595867,
    0.6931471824645996,
    0.7828080058097839,
    0.06006711348891258,
    0.0692264512181282,
]


def test_per_step_losses_of_a_whole_run(reference):
    root, _, _ = reference
    with open(root / "csv" / "metrics.csv") as f:
        steps = sorted(
            (int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")
        )
    assert [s for s, _ in steps] == list(range(len(REFERENCE_STEP_LOSSES)))
    assert [loss for _, loss in steps] == pytest.approx(REFERENCE_STEP_LOSSES, rel=1e-4)


def test_policy_moved_each_round(reference):
    root, _, cfg = reference
    start = tiny_model(seed=cfg.seed).model.state_dict()
    r0, r1 = weights(root / "hf" / "round_000"), weights(root / "hf" / "round_001")
    for name, tensor in r0.items():
        assert not torch.equal(tensor, start[name]), name
        assert not torch.equal(r1[name], tensor), name


def test_next_opponent_is_the_previous_final_policy(reference):
    """Round 1's cached opponent log-probs are exactly those of the policy saved after round 0."""
    root, _, cfg = reference
    loaded = pretrained(str(root / "hf" / "round_000"))  # the saved directory reloads as is
    dm = SelfPlayDataModule(
        None,
        loaded.tokenizer,
        batch_size=4,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
    )
    dm.set_pairs(rows(root / "rounds" / "round_001" / "synthetic.jsonl"))
    module = PolicyModule(policy=loaded.model, objective=SPIN(losses.logistic))
    expected = score_pairs(None, module, dm, dm.encoded, "score")
    cached = torch.load(root / "rounds" / "round_001" / "opponent_logps.pt", weights_only=True)
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-4)
    # ... and not those of the initial model: the opponent really changed between rounds.
    initial = PolicyModule(policy=tiny_model(seed=cfg.seed).model, objective=SPIN(losses.logistic))
    assert not torch.allclose(cached, score_pairs(None, initial, dm, dm.encoded, "score"), atol=1e-2)


def test_model_opponent_mode_trains_the_same_policy(reference, tmp_path):
    root, _, _ = reference
    run(tmp_path, "model", "opponent=model")
    for r in ("round_000", "round_001"):
        a, b = weights(root / "hf" / r), weights(tmp_path / "model" / "hf" / r)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def assert_same_run(a, b):
    for r in ("round_000", "round_001"):
        assert (a / "rounds" / r / "synthetic.jsonl").read_bytes() == (
            b / "rounds" / r / "synthetic.jsonl"
        ).read_bytes()
        wa, wb = weights(a / "hf" / r), weights(b / "hf" / r)
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (r, name)


def test_resume_after_a_crash_mid_epoch(reference, tmp_path):
    root, _, _ = reference
    crash = {"_target_": "tests.helpers.CrashAtBatch", "epoch": 1, "batch": 2}
    with pytest.raises(Crash):
        run(tmp_path, "run", extra_callbacks={"crash": crash})
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "run" / "hf" / "round_001").exists()
    first_card = (tmp_path / "run" / "hf" / "round_000" / "README.md").read_bytes()
    run(tmp_path, "run")  # the same command again
    assert_same_run(root, tmp_path / "run")
    # Round 0's card is left as it was; round 1's holds the numbers of the round that finished.
    assert (tmp_path / "run" / "hf" / "round_000" / "README.md").read_bytes() == first_card
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    card = ModelCard.load(tmp_path / "run" / "hf" / "round_001" / "README.md")
    assert card.data.spinlab["metrics"]["loss"] == saved[1]["loss"]
    assert card.data.spinlab["metrics"]["accuracy"] == saved[1]["accuracy"]


def test_resume_after_a_crash_mid_generation(reference, tmp_path):
    root, _, cfg = reference
    crashing = {
        **cfg.callbacks.self_play.generator,
        "_target_": "tests.helpers.CrashingGenerator",
        "crash_round": 1,
        "after": 1,
    }
    with pytest.raises(Crash):
        run(tmp_path, "run", generator=crashing)
    partial = tmp_path / "run" / "rounds" / "round_001" / "synthetic.partial.jsonl"
    assert len(rows(partial)) == cfg.generation.batch_size  # one batch kept, not lost
    run(tmp_path, "run")
    assert not partial.exists()
    assert_same_run(root, tmp_path / "run")


def results(summary):
    """A summary's numbers without its timings."""
    return {r: {k: v for k, v in row.items() if not k.endswith("seconds")} for r, row in summary.items()}


def files(root):
    """Every file of a run directory: its content's hash and when it was last written."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


RESULTS = {"rounds", "hf", "checkpoints", "csv", "summary.json"}


def test_rerunning_a_finished_run_changes_nothing(reference, tmp_path):
    root, summary, _ = reference
    first, _ = run(tmp_path, "run")
    # Made the same way as the reference: the same numbers, responses and weights.
    assert results(first) == results(summary) and sorted(first) == [0, 1]
    assert_same_run(root, tmp_path / "run")
    before = files(tmp_path / "run")
    again, _ = run(tmp_path, "run")
    assert again == first  # the finished run's summaries, read back
    after = files(tmp_path / "run")
    assert after.keys() == before.keys()
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    # Nothing of the results is written again (the run's record and lock may be).
    results_written = [k for k in after if after[k] != before[k] and k.split("/")[0] in RESULTS]
    assert not results_written


def test_resume_never_refuses_an_existing_run(reference, tmp_path):
    run(tmp_path, "run")
    with pytest.raises(RunDirError, match="already holds a run"):
        run(tmp_path, "run", "resume=never")


@pytest.mark.parametrize(
    "override, message",
    [
        ("lam=0", r"lam must be a finite number in \(0, 1e\+06\]"),
        ("rounds=0", "rounds must be >= 1"),
        ("data.max_length=600", "over the model.s position limit of 512"),
        ("+round_overrides.5.lr=1", "round_overrides key"),
        ("+round_overrides.1.beta=1", "unknown setting"),
    ],
)
def test_impossible_values_fail_at_start(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, "bad", override)
    assert not (tmp_path / "bad" / "rounds").exists()


def test_extending_a_finished_run_trains_the_new_rounds_as_a_longer_run_would(tmp_path):
    """rounds=2 finished, then rounds=3 on the same run directory: round 2 starts at step 8 with
    the full schedule and ends with the weights of a run started with rounds=3."""
    run(tmp_path, "extended", "rounds=2")
    summary, _ = run(tmp_path, "extended", "rounds=3")
    straight, _ = run(tmp_path, "straight", "rounds=3")
    assert summary[2]["start_step"] == 8 == straight[2]["start_step"]
    assert summary[2]["loss"] == pytest.approx(straight[2]["loss"], abs=1e-6)
    assert abs(summary[2]["margin"]) > 1e-3  # it trained: the policy moved away from its opponent
    a, b = (
        weights(tmp_path / "extended" / "hf" / "round_002"),
        weights(tmp_path / "straight" / "hf" / "round_002"),
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    before = weights(tmp_path / "extended" / "hf" / "round_001")
    assert any(not torch.equal(a[k], before[k]) for k in a)
    with open(tmp_path / "extended" / "csv" / "metrics.csv") as f:
        lrs = [
            float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr") and r.get("round") == "2.0"
        ]
    assert len(lrs) == 4 and min(lrs) > 0
