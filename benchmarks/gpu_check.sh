#!/usr/bin/env bash
# Everything that needs a GPU, in about 11 minutes on one GPU: generation and training throughput
# against the peers with every speed lever on and off, then the GPU tests (two-round runs with
# trainer=gpu and trainer=fsdp, compared with the same rounds on the CPU). Not part of `make test`
# (CI has no GPU), but its --device cpu check is.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # default: $OUT if set, else ./gpu_check_out
#   bash benchmarks/gpu_check.sh --device cpu [OUT_DIR]   # every step at toy size on the CPU
#
# --device cpu is a check of the script, not a measurement: each step runs its own command with
# the toy-size options of its script appended (argparse takes an option's last value), so a
# renamed script, option or test file fails there too. tests/test_benchmarks.py runs it in
# `make test`. A new step appends its script's toy options the same way ($GEN_TOY, $TRAIN_TOY,
# $FAMILY_TOY).
#
# Run from the repository root on a machine with one CUDA GPU, after changing the model, the
# sharding, generation or training code. Every step has its own time limit, so the script ends
# within ~12 minutes even when a step hangs; a failed or timed-out step is recorded in
# OUT_DIR/steps.tsv and the others still run. Nothing is installed from the network: packages that
# the machine lacks are installed from wheels in ./.whl if that folder exists (see
# benchmarks/README.md, "GPU check").
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then
    DEVICE="${2:-}"
    shift 2 || true
fi
case "$DEVICE" in
cuda)
    GEN_TOY=() TRAIN_TOY=() FAMILY_TOY=()
    ;;
cpu)
    GEN_TOY=(--device cpu --shape toy --batch 2 --batches 1 --prompt-len 8 --new-tokens 4 --repeats 1 --timeout 120)
    TRAIN_TOY=(--device cpu --shape toy --batch 2 --prompt-len 8 --response-len 8 --steps 1 --warmup 1
        --threads 1 --timeout 120)
    FAMILY_TOY=(--device cpu --shape toy --batch 2 --steps 2 --prompts 3 --new-tokens 6 --compile off)
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh [--device cuda|cpu] [OUT_DIR]" >&2
    exit 2
    ;;
esac
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
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')" || exit 2
fi

{
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    else
        echo "--device cpu: toy sizes, not a measurement"
    fi
    "$PY" -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
    git rev-parse HEAD 2>/dev/null
} >"$DIR/machine.txt" 2>&1

GEN_BACKENDS="${GEN_BACKENDS:-static,static@eager}"
printf 'step\tstatus\tseconds\n' >"$DIR/steps.tsv"
failed=0
# Nine files in all (a device tool that returns few files gets every one): machine.txt, steps.tsv,
# log.txt (every step's stderr and the tests' output), pytest_gpu.xml, train_throughput.jsonl
# (one line per shape), generation_throughput.jsonl, profile_static.txt, profile_static_eager.txt,
# families_check.jsonl.
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

# Order: the figures first (generation, then training at both shapes), the GPU tests last, so a
# slow test cannot starve a measurement. Limits sum to 700 s.

# 1. generation at the Llama-1B shape (batch 256, prompt 256, 256 new tokens, bf16): our decode
#    loop with its CUDA graph (static) and the same loop eager (static@eager: the step's kernels one
#    by one in its profile) against plain generate, one warm-up and two timed batches each; then one
#    batch under torch.profiler (profile_<backend>.txt: operators by device time) and the greedy
#    tokens compared with generate's in float32. GEN_BACKENDS=static,static@eager,hf adds
#    generation=hf (~45 s)
step generation_throughput 150 "$DIR/generation_throughput.jsonl" "$PY" benchmarks/generation_throughput.py --device cuda \
    --shape llama-1b --batch 256 --batches 2 --backends $GEN_BACKENDS --timeout 70 --check-greedy float32 \
    --profile "$DIR" "${GEN_TOY[@]}"

# 2. training against TRL as SPIN, SmolLM2-135M shape (batch 16 pairs, 256 + 256): TRL with
#    precomputed reference log-probs, and with its documented speed options on top (`fastest`:
#    use_liger_kernel, padding_free), against our defaults (compiled layers, chunk 4096, no
#    per-step synchronisation) and each lever turned back (our Liger variant, measured slower on
#    2026-11-30, is left out: add ";liger" to measure it)
step train_135m 170 "$DIR/train_throughput.jsonl" "$PY" benchmarks/train_throughput.py --device cuda \
    --shape smollm2-135m --peer-settings precompute_ref_log_probs,fastest --timeout 120 \
    --ours-variants "default,eager,sync,chunk256,chunk1024,unchunked,fsdp1" "${TRAIN_TOY[@]}"

# 3. the same at the Llama-1B shape (batch 8 pairs), our defaults (~180 s: each side builds a 1.2B
#    model and the peer tokenizes its pairs; eager layers at this shape: 1/1.30 of compiled on
#    2026-11-30, add ";eager" to measure again)
step train_1b 180 "$DIR/train_throughput.jsonl" "$PY" benchmarks/train_throughput.py --device cuda \
    --shape llama-1b --peer-settings precompute_ref_log_probs,fastest --timeout 80 \
    --ours-variants "default" "${TRAIN_TOY[@]}"

# 4. the families beyond Llama (Qwen3 and Gemma-2 at the SmolLM2-135M shape): bf16 with compiled
#    layers, the chunked log-prob path's check against the model's own logits, training steps, and
#    the static decoder's greedy tokens (CUDA graph, float32) against generate
step families 90 "$DIR/families_check.jsonl" "$PY" benchmarks/families_check.py --device cuda "${FAMILY_TOY[@]}"

# 5. the GPU tests: tests/test_gpu.py (two rounds with trainer=gpu and trainer=fsdp, eager and with
#    compiled layers, bf16; Liger's kernels and compiled layers against the eager loss) and
#    tests/test_generation_static.py's (the captured decode step against the eager one, greedy
#    against generate). Only these files: collecting the others would need packages the GPU
#    machine lacks (e.g. nbformat).
step pytest_gpu 110 "$DIR/log.txt" "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$DIR/pytest_gpu.xml" \
    tests/test_gpu.py tests/test_generation_static.py tests/test_sync.py

echo "gpu_check: results in $DIR"
exit "$failed"
