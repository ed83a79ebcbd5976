#!/usr/bin/env bash
# Benchmark the two servers of serve.sh (baseline :8000, EAGLE-3 :8001) with `vllm bench serve`.
#
#   bash benchmark/vllm/serve.sh && bash benchmark/vllm/serve.sh --eagle
#   bash benchmark/vllm/benchmark.sh [--dataset sharegpt|mt-bench|FILE] [--concurrency "1 4 16"]
#
# Same prompts, greedy, for each concurrency level: baseline, then EAGLE-3.  Saves vLLM's
# result JSONs (with the EAGLE-3 server's acceptance length and per-position acceptance,
# read from its /metrics) and prints the comparison table (benchmark/compare.py).
# The loop and its flags (--help) are benchmark/run.py's.
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
need_project_python
export PYTHON PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m benchmark.run --engine vllm "$@"
