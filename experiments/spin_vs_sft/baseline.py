"""Evaluate the weak SFT model (the starting point θ_0 of every arm) exactly as the runs
evaluate their rounds: python experiments/spin_vs_sft/baseline.py seed=0 [eval.split=test]

Writes experiments/spin_vs_sft/runs/baseline/<split>/seed=<seed>/eval.json.
"""

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

import spinlab.config  # noqa: F401  (registers the schema and the run-directory resolver)
from spinlab.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


def main(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=spin_vs_sft", *overrides])
    out = ROOT / "experiments" / "spin_vs_sft" / "runs" / "baseline" / cfg.eval.split / f"seed={cfg.seed}"
    with open_dict(cfg):
        cfg.run_dir = str(out)
    loaded = instantiate(cfg.model)
    dm = instantiate(cfg.data, tokenizer=loaded.tokenizer)
    dm.setup()
    module = instantiate(cfg.module, policy=loaded.model)
    evaluator, generator = instantiate(cfg.eval), instantiate(cfg.generation)
    run_dir = RunDir(out)
    # Policy = opponent here, so the held-out margin is 0 by construction; the rest is θ_0's.
    evaluator.prepare(0, module, dm, generator, run_dir)
    results = evaluator.evaluate(0, module, dm, run_dir)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
