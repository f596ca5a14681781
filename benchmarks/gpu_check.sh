#!/usr/bin/env bash
# The one prepared GPU run (issues 17 and 20): every number the project needs from a machine with one NVIDIA GPU, in
# ONE call of at most 10 minutes, appended to one markdown file ready to paste into benchmarks/RESULTS.md.
#
#   benchmarks/gpu_check.sh                  # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --dry-run        # every step at tiny sizes on the CPU (CI runs it: it cannot rot)
#
# Python: $PYTHON, else .venv/bin/python where the checkout has one, else python3 (the GPU machine's). Where that
# interpreter lacks DVC and the checkout has .whl/ (benchmarks/device_wheels.sh), the wheels are installed first into
# $GPU_CHECK_SITE (default /tmp/site), put on PYTHONPATH, their commands (dvc) on PATH.
#
# Steps, the lesson first, each under its own time cap (`timeout`; a step that runs out says so in the results and
# the next one runs), all under one budget ($GPU_CHECK_BUDGET seconds, default 570: the script ends inside 9.5
# minutes; a step gets at most what is left, and one with under 15 s left is skipped with a line saying so):
#  1. the whole lesson-1 pipeline (benchmarks/lesson_pipeline.py): 7,390 generated JPEGs of 500x375, 37 classes, the
#     pets profile (resnet34 224 px, presize 460, 4 + 2 epochs, lr_find 100), weights none, bf16, cold stage
#     processes (PETPIPE_WARM=0): per stage wall, work, phases, epochs, non-epoch seconds, disk MB. Cap 300 s.
#  2. fastai 2.8's lesson 1 on the same generated images (benchmarks/fastai_lesson.py, the archive kept by step 1),
#     the same recipe, per phase with its import time; skipped with a line where fastai is not importable. Cap 150 s.
#  3. a model stage's start-up explained (benchmarks/import_cost.py): its imports package by package, twice, and
#     CUDA's initialisation. Cap 40 s.
#  4. the data-path benchmark on CUDA (resnet34, 224 px, bf16, batch 64, presize 460): host loader, then the
#     device store. Cap 75 s.
#  5. the tests that only run with CUDA. Cap 60 s.
#  6. fused against foreach AdamW, with the checkpoint check. Cap 45 s.
#  7. train.compile on and off. Cap 90 s (what is left of the budget, if less).
# Results: $GPU_CHECK_OUT (default gpu_check_results.md); the full log next to it (.log). Exit 1 if a step failed or
# ran out of its cap.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
OUT=${GPU_CHECK_OUT:-gpu_check_results.md}
LOG="${OUT%.md}.log"
SITE=${GPU_CHECK_SITE:-/tmp/site}
FAILED=()
export PYTHONUNBUFFERED=1  # a step killed at its cap still shows what it printed
export PETPIPE_WARM=0      # cold stage processes: no warm variant is measured
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d /tmp/gpu-check-XXXXXX)  # scratch (the lesson's repository, the shared archive), removed at the end
export TMPDIR=$WORK
trap 'rm -rf "$WORK"' EXIT

if (( DRY )); then
  BUDGET=${GPU_CHECK_BUDGET:-300}
  LESSON=(--dry-run)
  FASTAI=(--dry-run)
  DATA=(--preset cpu --arch resnet18 --size 16 --batch-size 8 --images 48 --epochs 1 --data pets-like --no-fastai
        --threads 1 --presize 32)
  STEPS=(--device cpu --arch timm/test_resnet --size 16 --batch-size 4 --steps 2 --warmup 1 --precisions fp32)
  TESTS=(tests/data/test_augment.py tests/data/test_loaders.py)
  CAPS=(150 60 40 60 60 45 90)  # a first torch.compile on the CPU builds C++: 15-45 s
else
  BUDGET=${GPU_CHECK_BUDGET:-570}
  LESSON=(--precision bf16)
  FASTAI=(--precision bf16)
  DATA=(--preset cuda --arch resnet34 --size 224 --batch-size 64 --precision bf16 --data pets-like --no-fastai
        --presize 460)
  STEPS=(--device cuda --arch resnet34 --size 224 --batch-size 64 --steps 30 --warmup 5 --precisions bf16,fp16)
  TESTS=(tests/data/test_augment.py tests/data/test_loaders.py tests/train/test_engine.py tests/data/test_device_store.py)
  CAPS=(300 150 40 75 60 45 90)
fi

step() {  # step CAP TITLE COMMAND...: run it under min(CAP, what the budget has left); output to the log and results
  local cap=$1 title=$2; shift 2
  local left=$(( BUDGET - SECONDS ))
  (( cap > left - 5 )) && cap=$(( left - 5 ))
  if (( cap < 15 )); then
    echo "== $title: skipped, ${left} s of the ${BUDGET} s budget left" | tee -a "$LOG"
    { echo "### $title: skipped (the budget of ${BUDGET} s was spent)"; echo; } >> "$OUT"
    FAILED+=("$title (skipped: budget)")
    return
  fi
  local started=$SECONDS
  echo "== $title (cap ${cap} s): $*" | tee -a "$LOG"
  local output errors="$WORK/stderr"
  output=$(timeout --kill-after=10 "$cap" "$@" 2>"$errors")
  local code=$?
  cat "$errors" >> "$LOG"
  echo "$output" >> "$LOG"
  local note=""
  if (( code == 124 || code == 137 )); then
    note=", ran out of its ${cap} s cap: stopped"
    FAILED+=("$title (cap ${cap} s)")
  elif (( code != 0 )); then
    note=", failed with exit $code"
    FAILED+=("$title (exit $code)")
    output+=$'\n'"--- stderr (last lines):"$'\n'"$(tail -15 "$errors")"
  fi
  { echo "### $title ($(( SECONDS - started )) s$note)"; echo; echo '```'; echo "$output" | tail -60; echo '```'; echo; } >> "$OUT"
  echo "   $(( SECONDS - started )) s$note"
}

if [[ -d .whl ]] && ! "$PY" -c 'import dvc, mlflow' 2>/dev/null; then
  started=$SECONDS
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "installing the wheels of .whl/ failed" | tee -a "$OUT"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:$SITE" PATH="$SITE/bin:$PATH"
  echo "wheels of .whl/ installed into $SITE in $(( SECONDS - started )) s"
fi
PATH="$(cd "$(dirname "$(command -v "$PY")")" && pwd):$PATH"  # `python` in the stage commands: this one

{
  echo "## gpu_check $( (( DRY )) && echo '--dry-run ')$(date -u +%Y-%m-%d)"
  echo
  "$PY" -c 'import os, sys, torch; d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {d}, {os.cpu_count()} cores")'
  echo
} >> "$OUT"

step "${CAPS[0]}" "lesson-1 pipeline, cold stage processes" "$PY" benchmarks/lesson_pipeline.py "${LESSON[@]}" --archive "$WORK/archive"
step "${CAPS[1]}" "fastai lesson 1, same images and recipe" "$PY" benchmarks/fastai_lesson.py "${FASTAI[@]}" --archive "$WORK/archive"
step "${CAPS[2]}" "a model stage's imports and CUDA's start" "$PY" benchmarks/import_cost.py
step "${CAPS[3]}" "data path, host loader then device store" \
  "$PY" benchmarks/data_throughput.py "${DATA[@]}" --store-on-device both
step "${CAPS[4]}" "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step "${CAPS[5]}" "AdamW fused against foreach, with the check" "$PY" benchmarks/train_throughput.py "${STEPS[@]}" --check --compare-adamw
step "${CAPS[6]}" "train.compile on and off" "$PY" benchmarks/train_throughput.py "${STEPS[@]}" --compare-compile

echo "total $SECONDS s of the ${BUDGET} s budget" | tee -a "$OUT"
if (( ${#FAILED[@]} )); then
  printf 'failed: %s\n' "${FAILED[@]}" | tee -a "$OUT"
  exit 1
fi
echo "results: $OUT (log: $LOG)"
