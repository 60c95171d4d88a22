#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh            -> the GPU check (<= 5 minutes on one GPU): merge kernels, the trial-cost
#                                            benchmark and a short demo study on device=cuda, printed as one table
# DEVICE=cpu bash benchmarks/gpu_check.sh -> the same on CPU at small sizes (CI: checks the script runs)
#
# Installs a CUDA build of torch into the venv when DEVICE=cuda and the installed torch has no CUDA (the same
# version, from $TORCH_INDEX, default the cu128 wheel index). Without network or a GPU it says so and runs on
# the CPU at the small sizes instead, so it always ends with a table.
# Sizes: TC_LAYERS TC_HIDDEN TC_VOCAB TC_TRIALS TC_LIMIT (trial cost), KERNEL_LAYERS KERNEL_HIDDEN, TRIALS (demo);
# BUDGET seconds in all (default 280); TC_ARGS extra trial_cost.py arguments.
# The demo zoo is built first if missing (~1-3 min of CPU); MERGE_OPTIMIZER_ZOO points at a copy of a built one.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEVICE=${DEVICE:-cuda}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
BUDGET=${BUDGET:-280}
NOTE=""
export TQDM_DISABLE=1

has_cuda() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

if [ "$DEVICE" != "cpu" ] && ! has_cuda; then
  version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || echo "")
  echo "torch ${version:-?} has no CUDA here; installing torch==${version} from $TORCH_INDEX (2 min limit) ..." >&2
  if [ -n "$version" ] && timeout 120 "$PY" -m pip install -q --timeout 20 --retries 1 \
       "torch==${version}" --index-url "$TORCH_INDEX" >&2 && has_cuda; then
    NOTE="CUDA torch installed by this check"
  else
    echo "no CUDA torch or no GPU available: running the CPU sizes instead" >&2
    NOTE="CPU fallback (no CUDA torch or GPU)"
    DEVICE=cpu
  fi
fi

if [ "$DEVICE" = "cpu" ]; then  # small sizes: the point on CPU is that every part runs
  : "${TC_LAYERS:=2}" "${TC_HIDDEN:=256}" "${TC_VOCAB:=4096}" "${TC_TRIALS:=3}" "${TC_LIMIT:=3}"
  : "${KERNEL_LAYERS:=1}" "${KERNEL_HIDDEN:=256}" "${TRIALS:=3}"
else
  : "${TC_LAYERS:=14}" "${TC_HIDDEN:=768}" "${TC_VOCAB:=31744}" "${TC_TRIALS:=4}" "${TC_LIMIT:=20}"
  : "${KERNEL_LAYERS:=6}" "${KERNEL_HIDDEN:=1024}" "${TRIALS:=6}"
fi
export TC_LAYERS TC_HIDDEN TC_VOCAB TC_TRIALS TC_LIMIT
# mergekit's TIES alone takes ~80 s on CPU (TC_ARGS="" runs it when installed); one study per method, with the
# kernels a study picks (compiled at this size where they build): the kernels part compares compiled and eager
TC_ARGS=${TC_ARGS:---mergekit none --fused auto}

start=$(date +%s)
"$PY" -c "from optimizer.zoo import ensure_zoo; ensure_zoo(progress=False)" >&2 || { echo "demo zoo build failed" >&2; exit 1; }
left=$(( BUDGET - ($(date +%s) - start) ))
[ "$left" -lt 60 ] && left=60
exec timeout $(( left + 20 )) "$PY" benchmarks/gpu_check.py --device "$DEVICE" --budget "$left" \
  --kernel-layers "$KERNEL_LAYERS" --kernel-hidden "$KERNEL_HIDDEN" --trials "$TRIALS" --note "$NOTE" \
  --trial-cost-args "$TC_ARGS"
