#!/usr/bin/env bash
# Everything that needs a GPU, in under 10 minutes on one GPU: the GPU tests, a two-round sharded
# run (trainer=fsdp), and the GPU throughput benchmarks. Not part of `make test` (CI has no GPU).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # default: $OUT if set, else ./gpu_check_out
#
# Run from the repository root on a machine with one CUDA GPU, after changing the model, the
# sharding, generation or training code. Every step has its own time limit, so the script ends
# within ~10 minutes even when a step hangs; a failed or timed-out step is recorded in
# OUT_DIR/steps.tsv and the others still run. Nothing is installed from the network: packages that
# the machine lacks are installed from wheels in ./.whl if that folder exists (see
# benchmarks/README.md, "GPU check").
set -u
cd "$(dirname "$0")/.."
DIR="${1:-${OUT:-./gpu_check_out}}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
PY="${PYTHON:-python3}"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/spinlab-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/spinlab-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1

missing=$("$PY" - <<'EOF'
import importlib.util
# wandb only for logger=wandb, trl only for the training benchmark (its step reports it missing)
names = ["torch", "lightning", "transformers", "hydra", "omegaconf", "datasets", "pytest"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing" >&2
    echo "carry them as wheels in ./.whl (benchmarks/README.md, 'GPU check'); nothing is installed from the network" >&2
    exit 2
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')" || exit 2

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
    git rev-parse HEAD 2>/dev/null
} >"$DIR/machine.txt" 2>&1

printf 'step\tstatus\tseconds\n' >"$DIR/steps.tsv"
failed=0
# Seven files in all (a device tool that returns few files gets every one): machine.txt, steps.tsv,
# log.txt (every step's stderr and the tests' and the run's stdout), pytest_gpu.xml,
# train_fsdp_summary.json, train_throughput.jsonl, generation_throughput.jsonl.
: >"$DIR/log.txt"
# step NAME SECONDS STDOUT_FILE COMMAND...: a time limit, stderr to log.txt, a row in steps.tsv
step() {
    local name=$1 limit=$2 out=$3 start rc
    shift 3
    echo "== $name (limit ${limit} s)" | tee -a "$DIR/log.txt"
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$out" 2>>"$DIR/log.txt"
    rc=$?
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && rc="timeout"
    [ "$rc" = 0 ] || failed=1
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" | tee -a "$DIR/steps.tsv"
}

# 1. the GPU tests (tests/test_gpu.py: two rounds with trainer=gpu and trainer=fsdp, bf16)
# (only the GPU file: collecting the others would need packages the GPU machine lacks, e.g. nbformat)
step pytest_gpu 150 "$DIR/log.txt" "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$DIR/pytest_gpu.xml" tests/test_gpu.py

# 2. two sharded rounds through the user's command, on the one GPU
RUN=$(mktemp -d)/train_fsdp  # checkpoints and HF directories stay out of OUT_DIR
step train_fsdp 75 "$DIR/log.txt" "$PY" train.py trainer=fsdp trainer.devices=1 debug=fast rounds=2 \
    hydra.run.dir="$RUN"
cp "$RUN/summary.json" "$DIR/train_fsdp_summary.json" 2>/dev/null

# 3. training throughput against TRL as SPIN, the SmolLM2-135M shape (20 timed steps per side)
step train_throughput 130 "$DIR/train_throughput.jsonl" "$PY" benchmarks/train_throughput.py --device cuda --shape smollm2-135m --timeout 60

# 4. generation throughput, every backend against plain generate, at the generation issue's target
#    shape: Llama-1B config, batch 256, prompt 256, 256 new tokens, bf16 (--gpu-suite adds the 135M
#    shape and batch 64: ~15 min, run it apart)
step generation_throughput 230 "$DIR/generation_throughput.jsonl" "$PY" benchmarks/generation_throughput.py --device cuda \
    --shape llama-1b --batch 256 --backends hf,static,continuous --timeout 55

echo "gpu_check: results in $DIR"
exit "$failed"
