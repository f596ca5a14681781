#!/usr/bin/env bash
# The one prepared GPU run (issue 17): every number the project needs from a machine with one NVIDIA GPU, in
# under 10 minutes, appended to one markdown file ready to paste into benchmarks/RESULTS.md.
#
#   benchmarks/gpu_check.sh                  # on the GPU machine, from the repository root, after `make venv`
#   benchmarks/gpu_check.sh --dry-run        # every step at tiny sizes on the CPU (CI runs it: it cannot rot)
#
# Steps: (1) the data-path benchmark on CUDA, resnet34 224 px bf16 batch 64, host loader and device store at
# presize 460 and 320 (b/a for each); (2) fused against foreach AdamW, with the checkpoint check; (3) train.compile
# on and off; (4) the tests that only run with CUDA; (5) the whole lesson-1 pipeline on a generated Pets-sized
# dataset (7,390 JPEGs of 500x375, 37 classes, weights none, the pets profile's epochs, LRs and sizes), with warm
# stage processes (petpipe.warm: CUDA in forked stage processes) and again cold (PETPIPE_WARM=0).
# Results: $GPU_CHECK_OUT (default gpu_check_results.md); the full log next to it (.log).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-gpu_check_results.md}
LOG="${OUT%.md}.log"
export PATH="$(dirname "$PY"):$PATH"
FAILED=()

if (( DRY )); then
  DATA=(--preset cpu --arch resnet18 --size 16 --batch-size 8 --images 48 --epochs 1 --data pets-like
        --no-fastai --threads 1)
  PRESIZES=(32)
  STEPS=(--device cpu --arch timm/test_resnet --size 16 --batch-size 4 --steps 2 --warmup 1 --precisions fp32)
  TESTS=(tests/test_augment.py tests/test_data.py)
  LESSON=(--dry-run)
else
  DATA=(--preset cuda --arch resnet34 --size 224 --batch-size 64 --precision bf16 --data pets-like --no-fastai)
  PRESIZES=(460 320)
  STEPS=(--device cuda --arch resnet34 --size 224 --batch-size 64 --steps 30 --warmup 5 --precisions bf16,fp16)
  TESTS=(tests/test_augment.py tests/test_data.py tests/test_engine.py)
  LESSON=()
fi

step() {  # step TITLE COMMAND...: run it, its output into the log and the results file, its time in the title
  local title=$1; shift
  local started=$SECONDS
  echo "== $title: $*" | tee -a "$LOG"
  local output
  output=$("$@" 2>>"$LOG")
  local code=$?
  echo "$output" >> "$LOG"
  { echo "### $title ($(( SECONDS - started )) s)"; echo; echo '```'; echo "$output" | tail -40; echo '```'; echo; } >> "$OUT"
  if (( code != 0 )); then
    FAILED+=("$title (exit $code)")
    echo "   failed with exit $code (see $LOG)"
  fi
}

{
  echo "## gpu_check $( (( DRY )) && echo '--dry-run ')$(date -u +%Y-%m-%d)"
  echo
  echo "$("$PY" -c 'import torch; d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"; print(f"torch {torch.__version__}, {d}")')"
  echo
} >> "$OUT"

for presize in "${PRESIZES[@]}"; do
  step "data path, host loader then device store, presize $presize" \
    "$PY" benchmarks/data_throughput.py "${DATA[@]}" --presize "$presize" --store-on-device both
done
step "AdamW fused against foreach, with the check" "$PY" benchmarks/train_throughput.py "${STEPS[@]}" --check --compare-adamw
step "train.compile on and off" "$PY" benchmarks/train_throughput.py "${STEPS[@]}" --compare-compile
step "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step "lesson-1 pipeline" "$PY" benchmarks/lesson_pipeline.py "${LESSON[@]}"
step "lesson-1 pipeline, cold stage processes" env PETPIPE_WARM=0 "$PY" benchmarks/lesson_pipeline.py "${LESSON[@]}"

if (( ${#FAILED[@]} )); then
  printf 'failed: %s\n' "${FAILED[@]}" | tee -a "$OUT"
  exit 1
fi
echo "results: $OUT (log: $LOG)"
