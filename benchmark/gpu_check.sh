#!/usr/bin/env bash
# The GPU check: training at Llama-8B shape on one CUDA GPU (random weights, no download);
# on a CPU the same check at a tiny shape.  Prints one table and writes <out>/gpu_check.json.
#
#   bash benchmark/gpu_check.sh [--out DIR] [--shape llama-8b|tiny] [--parts bench train equiv]
#
# Runs with the project's environment: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ -x "$REPO_DIR/.venv/bin/python" ]] && PYTHON="$REPO_DIR/.venv/bin/python"
fi
cd "$REPO_DIR"
exec "$PYTHON" -m benchmark.gpu_check "$@"
