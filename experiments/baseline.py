"""Evaluate an experiment's starting model θ_0 exactly as its runs evaluate their rounds:

    python experiments/baseline.py experiment=spin_vs_sft seed=0 [eval.split=test]
    python experiments/baseline.py experiment=self_play_family seed=0
    python experiments/baseline.py --out DIR experiment=demo data.num_prompts=64   # any start

Writes experiments/<experiment>/runs/baseline/<split>/seed=<seed>/eval.json, or DIR/eval.json.
"""

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from spinlab.collective import SingleProcess
from spinlab.config import own_keys  # importing it registers the schema and the run-directory resolver
from spinlab.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def main(overrides: list[str], out: Path | None = None) -> dict:
    experiments = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    if len(experiments) != 1:
        raise SystemExit("name the experiment once, e.g. experiment=spin_vs_sft")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    out = (
        out
        or ROOT / "experiments" / experiments[0] / "runs" / "baseline" / cfg.eval.split / f"seed={cfg.seed}"
    )
    with open_dict(cfg):
        cfg.run_dir = str(out)
    loaded = instantiate(cfg.model)
    dm = instantiate(own_keys(cfg, "data"), tokenizer=loaded.tokenizer)
    dm.setup()
    module = instantiate(cfg.module, policy=loaded.model)
    evaluator, generator = instantiate(cfg.eval), instantiate(cfg.generation)
    run_dir, trainer = RunDir(out), SingleProcess()
    # Policy = opponent here, so the held-out margin is 0 by construction; the rest is θ_0's.
    evaluator.prepare(0, trainer, module, dm, generator, run_dir)
    results = evaluator.evaluate(0, trainer, module, dm, run_dir)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    args = sys.argv[1:]
    out = None
    if args[:1] == ["--out"] and len(args) > 1:
        out, args = Path(args[1]), args[2:]
    print(json.dumps(main(args, out), indent=2))
