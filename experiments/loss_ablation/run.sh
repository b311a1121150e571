#!/usr/bin/env bash
# The loss ablation: 4 losses x 3 seeds at λ = 0.1, 3 rounds each, tiny model, built-in task.
# Writes one run directory per point under experiments/loss_ablation/runs/ and, when the sweep
# ends, runs/report.md, runs/report.csv and runs/plot_*.png (spinlab.report.SweepReport).
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}
.venv/bin/python train.py -m name=loss_ablation debug=fast rounds=3 \
  data.num_prompts=32 generation.max_new_tokens=64 \
  eval.heldout_pairs=16 eval.task_prompts=16 eval.max_new_tokens=64 \
  loss=logistic,hinge,exponential,correlation lam=0.1 seed=0,1,2 \
  hydra.sweep.dir=experiments/loss_ablation/runs
