#!/usr/bin/env bash
# Benchmark the two servers of serve.sh (baseline :8000, EAGLE-3 :8001) with `vllm bench serve`.
#
#   bash benchmark/sglang/serve.sh && bash benchmark/sglang/serve.sh --eagle
#   bash benchmark/sglang/benchmark.sh [--dataset sharegpt|mt-bench|FILE] [--concurrency "1 4 16"]
#
# Same prompts, greedy, for each concurrency level: baseline, then EAGLE-3, through SGLang's
# OpenAI completions API.  After each run the server's /get_server_info (which holds
# SGLang's average acceptance length) is saved next to the result JSON.
# The loop and its flags (--help) are benchmark/run.py's.
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
need_project_python
export PYTHON PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m benchmark.run --engine sglang "$@"
