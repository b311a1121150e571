#!/usr/bin/env bash
# SPIN against continued SFT from the same weak SFT model, 3 seeds, on the built-in arithmetic
# task (experiments/spin_vs_sft/README.md). CPU, 2 cores: about 50 minutes with two streams.
#
#   1. the weak SFT models (one per seed; written to outputs/weak_sft/, read by the spin_vs_sft preset)
#   2. the learning rate of each arm, chosen on the validation split (seed 0, one round)
#   3. four arms x 3 seeds, 4 rounds each, evaluated on the test split, in two parallel streams
#   4. the table and plots: experiments/spin_vs_sft/results/
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}
PY=.venv/bin/python
SEEDS=0,1,2
SPIN_LR=${SPIN_LR:-2e-6}
SFT_LR=${SFT_LR:-1e-3}

# 1. Weak SFT models: a 0.8M-parameter Llama over characters, 3 epochs from scratch.
for seed in 0 1 2; do $PY train.py experiment=weak_sft seed=$seed; done

# 2. Learning-rate selection (validation split, seed 0, round 0): the SPIN and SFT grids.
$PY train.py -m experiment=spin_vs_sft name=lrsel rounds=1 eval.split=validation \
  optimizer.lr=2e-6,1e-5,5e-5,5e-4 hydra.sweep.dir=experiments/spin_vs_sft/runs/lrsel
$PY train.py -m experiment=spin_vs_sft name=lrsel rounds=1 eval.split=validation objective=sft \
  optimizer.lr=5e-5,2e-4,1e-3 hydra.sweep.dir=experiments/spin_vs_sft/runs/lrsel

# 3. The arms, on the test split. One thread per stream: two small processes share 2 cores best.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
arm() { # <sweep subdir> <overrides...>
  local dir=$1; shift
  $PY train.py -m experiment=spin_vs_sft eval.split=test seed=${ARM_SEEDS:-$SEEDS} "$@" \
    hydra.sweep.dir=experiments/spin_vs_sft/runs/$dir
}
(
  arm spin optimizer.lr=$SPIN_LR
  arm sft objective=sft optimizer.lr=$SFT_LR
  arm sft_2x objective=sft epochs_per_round=2 optimizer.lr=$SFT_LR
) &
(
  arm spin_mix optimizer.lr=$SPIN_LR data.mix_previous_rounds=1
  for seed in 0 1 2; do $PY experiments/baseline.py experiment=spin_vs_sft seed=$seed eval.split=test; done
) &
wait
# SPIN with a 5x larger step than the selected one: what a faster-moving SPIN does here.
ARM_SEEDS=0 arm spin_lr1e-5 optimizer.lr=1e-5 &
ARM_SEEDS=1,2 arm spin_lr1e-5 optimizer.lr=1e-5 &
wait

# 4. Table and plots.
$PY experiments/spin_vs_sft/summarize.py
