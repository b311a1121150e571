"""Two CPU processes (DDP, gloo) run the same SPIN rounds as one process."""

import json

import pytest
import torch

from tests import forked
from tests.test_e2e import weights
from tests.test_faults import env, train_command


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, reference_run):
    def train(run_dir, *overrides):
        cmd = [c for c in train_command(run_dir) if not c.startswith("hydra.verbose")] + list(overrides)
        forked.run(cmd, check=True, env=env(), capture_output=True, timeout=900)  # rank 0 forked
        return json.loads((run_dir / "summary.json").read_text())

    # One global batch of 4 pairs per step either way: 1 × 4 (conftest's reference run), or 2 processes × 2.
    single = json.loads((reference_run / "summary.json").read_text())
    ddp = train(tmp_path / "ddp", "trainer=ddp_cpu", "data.batch_size=2")

    for r in ("round_000", "round_001"):
        # Generation is sharded across the processes and gathered once, identically.
        a = (reference_run / "rounds" / r / "synthetic.jsonl").read_bytes()
        b = (tmp_path / "ddp" / "rounds" / r / "synthetic.jsonl").read_bytes()
        assert a == b, r
        wa, wb = weights(reference_run / "hf" / r), weights(tmp_path / "ddp" / "hf" / r)
        for name in wa:
            # Only the order of float additions differs (all-reduce); RMSprop magnifies it a little.
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-4)
    assert not list((tmp_path / "ddp" / "rounds").rglob("synthetic.partial*"))
    # Round metrics are synchronised over both processes, not rank 0's half.
    for s, d in zip(single, ddp, strict=True):
        for key in ("loss", "margin", "reward_real", "eval/heldout_margin"):
            assert d[key] == pytest.approx(s[key], rel=1e-4, abs=1e-6), key
        # Accuracy counts margins > 0; a round starts with policy = opponent, where margins are
        # float noise (~1e-7) and the order of additions can flip one pair's sign.
        assert abs(d["accuracy"] - s["accuracy"]) <= 1 / s["pairs"] + 1e-9
        assert d["pairs"] == s["pairs"]
