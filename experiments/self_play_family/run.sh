#!/usr/bin/env bash
# SPIN, T-SPIN and continued SFT from the same converged SFT model, 3 seeds, on the built-in
# arithmetic task (experiments/self_play_family/README.md). CPU, 2 cores: about 1 h 15 min.
# Every step maps to fixed run directories, so running the script again resumes where it stopped.
#
#   1. the converged SFT model: SFT rounds until validation log p(real) plateaus; runs/start links it
#   2. the learning rate of each method, chosen on the validation split (seed 0, one round)
#   3. three methods x 3 seeds, 3 rounds each, evaluated on the test split, in two parallel streams
#   4. the sweep report (table and plots over seeds) and the summary table: results/
#   5. one round of each method from the embedded SmolLM2-135M-Instruct (64 prompts, seed 0)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}
PY=.venv/bin/python
HERE=experiments/self_play_family
SEEDS=${SEEDS:-0,1,2}

# 1. The converged SFT model (2 epochs per round, each round evaluated on validation and saved).
$PY train.py experiment=converged_sft hydra.run.dir=$HERE/runs/sft_start
$PY $HERE/choose.py start   # fails, naming the command to extend the run, if the curve still rises

# 2. Learning rates (validation split, seed 0, round 0), two streams of one thread each.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
lrsel() { $PY train.py -m experiment=self_play_family name=lrsel rounds=1 eval.split=validation "$@" \
  hydra.sweep.dir=$HERE/runs/lrsel; }
lrsel objective=spin optimizer.lr=2e-6,1e-5,5e-5 &
( lrsel objective=tspin optimizer.lr=2e-6,1e-5,5e-5 && lrsel objective=sft optimizer.lr=5e-5,2e-4,1e-3 ) &
wait
$PY $HERE/choose.py lr | tee $HERE/runs/lr.txt
lr() { awk -v o="$1" '$1 == o {print $2}' $HERE/runs/lr.txt; }

# 3. The methods on the test split.
arm() { # <objective>
  $PY train.py -m experiment=self_play_family objective=$1 optimizer.lr=$(lr $1) seed=$SEEDS \
    hydra.sweep.dir=$HERE/runs/family/$1
}
( arm spin && arm sft ) &
( arm tspin && for seed in ${SEEDS//,/ }; do $PY experiments/baseline.py experiment=self_play_family seed=$seed; done ) &
wait

# 4. Table and plots.
$PY -m spinlab.report $HERE/runs/family --out $HERE/results/report
$PY $HERE/summarize.py

# 5. SmolLM2-135M-Instruct, one round per method, on the demo's settings with 64 prompts.
$PY train.py -m experiment=demo objective=spin,tspin,sft rounds=1 data.num_prompts=64 eval.split=test \
  eval.task_prompts=64 eval.heldout_pairs=32 hydra.sweep.dir=$HERE/runs/smollm2
$PY experiments/baseline.py --out $HERE/runs/smollm2_start experiment=demo data.num_prompts=64 eval.split=test \
  eval.task_prompts=64 eval.heldout_pairs=32
$PY -m spinlab.report $HERE/runs/smollm2 --out $HERE/results/smollm2
