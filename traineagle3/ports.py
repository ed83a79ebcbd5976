"""Loopback ports for the processes we start: DeepSpeed's rendezvous, vLLM and SGLang servers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; a race with another binder is possible but rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
