#!/usr/bin/env bash
# One command for a short GPU window: preflight, `pytest -m cuda`, then the acceptance benchmark, each stage with its
# own timeout, each stage's failure recorded and the next stage run anyway. Everything it finds goes into OUT:
#
#   gpu_run.log        all output of all stages, and a summary of each stage's exit code and seconds at the end
#   preflight.json     bench/preflight.py: versions, bitsandbytes' native library, one nf4 step + restart + step
#   pytest_cuda.log    pytest -m cuda -q -rs over tests/ (every cuda-marked test)
#   environment.json   \
#   memory.json         | bench/gpu_acceptance.py --out OUT --skip cuda_tests (pytest ran as its own stage above):
#   restarts.json       | one file per part, each written as soon as its part ends (see its docstring)
#   throughput.json    /
#
# 7 files, one folder: within what a device run hands back (8 files). Time on an H200, estimated (nothing has been
# measured on a GPU yet): wheel install ~15 s, preflight ~30 s, pytest -m cuda ~1-2 min, acceptance ~2-3 min
# (350M and 1.3B memory rows, 350M throughput of 4 variants x 22 steps): about 5 minutes. Stage caps 120/180/330 s
# and a total budget (GPU_RUN_BUDGET, default 540 s) keep the whole under the device's 10-minute command limit; a
# stage stopped at its cap still leaves the files its parts wrote.
#
#   bash bench/gpu_run.sh [--out DIR] [--device cuda|cpu]     # OUT: --out, else $OUT, else results/gpu_run
#   PYTHON=/path/to/python bash bench/gpu_run.sh --device cpu   # the same on a CPU (reduced sizes, 10 rounds in
#                                                               # part b), end to end: 2-4 minutes on 2 loaded cores
#
# Python: $PYTHON, else the repo's .venv/bin/python if there is one, else python3. lean_relora comes from this
# checkout through PYTHONPATH, never `pip install -e .`: that builds with hatchling in an isolated environment,
# which pip must download, and the GPU machine has no network (nor hatchling).
#
# Missing packages travel as wheels in the git-ignored .whl/ folder. The GPU image (see the device notes' package
# list) has torch, transformers, tokenizers, huggingface_hub, safetensors, peft, accelerate, pyarrow, pandas, xxhash,
# fsspec, pytest, but not bitsandbytes or datasets (nor datasets' dill and multiprocess). Download them once, here,
# in the repo root (Python 3.12, manylinux x86_64, one version of each; ~42 MiB, bitsandbytes being 41 of it):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d .whl bitsandbytes==0.50.2 datasets==5.0.0 dill==0.4.1 multiprocess==0.70.19
#
# datasets 5.0.0, not the newest: it accepts the image's huggingface_hub 1.33 (<2.0) and pyarrow >= 21, where 5.2
# wants pyarrow >= 24. The device run then names the folder in carry: run(command="bash bench/gpu_run.sh",
# carry=[".whl"], timeout_s=600). Only the packages that fail to import are installed, into $GPU_RUN_SITE
# (default /tmp/site), which goes on PYTHONPATH.

set -u
DEVICE=cuda
OUT_DIR=""
while (($#)); do
    case "$1" in
        --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
        --out=*) OUT_DIR="${1#--out=}"; shift ;;
        --device) DEVICE="${2:?--device needs cuda or cpu}"; shift 2 ;;
        --device=*) DEVICE="${1#--device=}"; shift ;;
        -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "gpu_run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_run.sh: --device must be cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "$OUT_DIR" ]]; then
    mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
else
    OUT_DIR="${OUT:-$ROOT/results/gpu_run}"
    mkdir -p "$OUT_DIR"
fi
cd "$ROOT" || exit 2
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3
fi
SITE="${GPU_RUN_SITE:-/tmp/site}"
BUDGET="${GPU_RUN_BUDGET:-540}"
STARTED=$(date +%s)
DEADLINE=$((STARTED + BUDGET))

LOG="$OUT_DIR/gpu_run.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

SUMMARY=()
FAILED=0

# stage NAME CAP_SECONDS COMMAND...: run COMMAND under `timeout` (its cap, or what is left of the budget), record it.
stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - $(date +%s) - 5))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "=== $name: not run, ${left}s of the ${BUDGET}s budget left"
        SUMMARY+=("$name: not run (budget spent)")
        FAILED=1
        return
    fi
    echo "=== $name (timeout ${limit}s, $(date -u +%H:%M:%S) UTC)"
    local begun=$(date +%s)
    timeout -k 10 "$limit" "$@"
    local rc=$?
    local took=$(($(date +%s) - begun))
    local what="exit $rc"
    ((rc == 124 || rc == 137)) && what="timed out after ${limit}s (exit $rc)"
    echo "=== $name: $what, ${took}s"
    SUMMARY+=("$name: $what, ${took}s")
    ((rc != 0)) && FAILED=1
    return 0
}

install_missing() {
    local wheels=() missing=() pkg found
    for pkg in bitsandbytes datasets dill multiprocess; do
        "$PY" -c "import $pkg" 2>/dev/null && continue
        missing+=("$pkg")
        found=$(ls .whl/"$pkg"-*.whl 2>/dev/null)
        [[ -n "$found" ]] && wheels+=($found)
    done
    if ((${#missing[@]} == 0)); then
        echo "bitsandbytes, datasets, dill, multiprocess import already: nothing to install"
        return 0
    fi
    echo "missing: ${missing[*]}; installing ${wheels[*]:-no wheel found} into $SITE"
    ((${#wheels[@]})) || { echo "no wheel in .whl/ for ${missing[*]} (see this script's header)"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" || return 1
    "$PY" -c "import bitsandbytes, datasets; print('bitsandbytes', bitsandbytes.__version__, 'datasets', datasets.__version__)"
}

echo "gpu_run.sh: device $DEVICE, out $OUT_DIR, python $PY, budget ${BUDGET}s, $(nproc) cores, $(date -u +%FT%TZ)"
[[ "$DEVICE" == cuda ]] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }

export PY SITE
export -f install_missing
stage install 120 bash -c install_missing
stage preflight 120 "$PY" bench/preflight.py --device "$DEVICE" --out "$OUT_DIR"
stage pytest_cuda 180 bash -c 'set -o pipefail; "$1" -m pytest -m cuda -q -rs -p no:cacheprovider \
    --continue-on-collection-errors tests 2>&1 | tee "$2"' _ "$PY" "$OUT_DIR/pytest_cuda.log"
ROUNDS=20
[[ "$DEVICE" == cpu ]] && ROUNDS=10  # a rehearsal on a CPU: the plumbing, not the figures
stage acceptance 330 "$PY" bench/gpu_acceptance.py --device "$DEVICE" --out "$OUT_DIR" --skip cuda_tests \
    --rounds "$ROUNDS"

echo "=== summary ($(($(date +%s) - STARTED))s in all; files in $OUT_DIR)"
printf '  %s\n' "${SUMMARY[@]}"
ls -l "$OUT_DIR"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit "$FAILED"
