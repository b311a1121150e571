"""A whole run with generation=continuous, killed mid-generation and run again."""

import json

import pytest
from omegaconf import open_dict

import train
from tests.conftest import compose_cfg
from tests.helpers import Crash


def run(tmp_path, generator=None):
    cfg = compose_cfg(
        ["debug=fast", "generation=continuous", "generation.batch_size=4", "rounds=1", "~eval"],
        tmp_path / "run",
    )
    with open_dict(cfg):
        if generator is not None:
            cfg.callbacks.self_play.generator = generator
    return train.run(cfg), cfg


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_killed_continuous_round_keeps_what_it_wrote_and_fills_in_the_rest(tmp_path):
    cfg = compose_cfg(["debug=fast", "generation=continuous", "generation.batch_size=4"])
    crashing = {
        **cfg.generation,
        "_target_": "tests.helpers.CrashingGenerator",
        "backend": "spinlab.generation.ContinuousBatchingGenerator",
        "crash_round": 0,
        "after": 2,
    }
    with pytest.raises(Crash):
        run(tmp_path, generator=crashing)
    round_dir = tmp_path / "run" / "rounds" / "round_000"
    written = {r["index"]: r for path in round_dir.glob("synthetic.partial*.jsonl") for r in rows(path)}
    assert len(written) == 8  # two chunks of 4 finished responses, kept
    run(tmp_path)
    assert not list(round_dir.glob("synthetic.partial*.jsonl"))
    pairs = rows(round_dir / "synthetic.jsonl")
    num_prompts = cfg.data.num_prompts
    assert len(pairs) == num_prompts and len({p["prompt"] for p in pairs}) == num_prompts
    for i, r in written.items():  # the responses on disk before the crash are the ones trained on
        assert (pairs[i]["synthetic"], pairs[i]["meta"]["tokens"]) == (r["synthetic"], r["tokens"])
    stats = json.loads((round_dir / "stats.json").read_text())["generation"]
    assert stats["backend"] == "continuous" and stats["responses"] == num_prompts - 8
