"""Serving benchmarks: baseline vs EAGLE-3 on vLLM and SGLang.

serve.sh + benchmark.sh launch; run.py, prompts.py and compare.py do the work.
"""
