"""Serving benchmarks: baseline vs EAGLE-3 on vLLM and SGLang (serve.sh + benchmark.sh; run.py, prompts.py, compare.py)."""
