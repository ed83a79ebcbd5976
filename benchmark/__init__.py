"""Serving benchmarks: baseline vs EAGLE-3 on vLLM and SGLang (shell scripts + prompts.py + compare.py)."""
