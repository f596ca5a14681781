#!/usr/bin/env bash
# The wheels the GPU machine lacks (DVC, MLflow skinny + its sqlite store, pydantic, fastai 2.8 without spaCy), for
# its Python 3.12, into .whl/ (or $1), then the checks (tags, one version each, Requires-Dist closure, total size).
# benchmarks/device_wheels.py says what and why; benchmarks/README.md how the device run installs them.
#
#   benchmarks/device_wheels.sh                  # -> .whl/ in this checkout
#   benchmarks/device_wheels.sh /work/main/.whl  # -> another checkout's .whl/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
# A CPython 3.12 to resolve for: $PYTHON312, python3.12 on PATH, else pyenv's.
PY312=${PYTHON312:-$(command -v python3.12 2>/dev/null || true)}
if [[ -z "$PY312" ]] || ! "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  PY312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)
fi
[[ -n "$PY312" ]] || { echo "no CPython 3.12 found: set PYTHON312" >&2; exit 2; }
grep -qx '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
  || { mkdir -p "$(git rev-parse --git-common-dir)/info"; echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"; }
exec "$PY" benchmarks/device_wheels.py --python312 "$PY312" "$@"
