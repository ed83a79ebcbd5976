"""The precision rule: bf16 on GPUs and on CPUs with AMX bf16 units, float32 on other CPUs,
the same answer for training (main.py, DeepSpeed) and serving (serve.sh)."""

import subprocess

import pytest
from conftest import ROOT, run_env

from traineagle3.precision import choose, cpu_flags, fill_deepspeed

SAPPHIRE = {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
ZEN4 = {"avx512f", "avx512_bf16", "avx2"}  # AVX-512 bf16 dot products, no AMX tiles
SKYLAKE = {"avx512f", "avx512bw", "avx2"}  # AVX-512 without bf16 instructions


@pytest.mark.parametrize(
    "device, flags, expected",
    [
        ("cpu", SAPPHIRE, "bfloat16"),
        ("cpu", ZEN4, "bfloat16"),
        ("cpu", SKYLAKE, "float32"),
        ("cpu", set(), "float32"),
        ("cuda", set(), "bfloat16"),
    ],
)
def test_auto_follows_the_hardware(device, flags, expected):
    dtype, why = choose(device, "auto", flags)
    assert dtype == expected and why


def test_an_explicit_choice_wins_and_a_wrong_one_is_refused():
    assert choose("cpu", "bfloat16", SKYLAKE)[0] == "bfloat16"
    assert choose("cpu", "float32", SAPPHIRE)[0] == "float32"
    with pytest.raises(ValueError, match="float64"):
        choose("cpu", "float64")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "sse2", "amx_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_the_draft_trains_in_the_targets_precision_when_the_config_says_auto():
    assert fill_deepspeed({"bf16": {"enabled": "auto"}}, "bfloat16")["bf16"]["enabled"] is True
    assert fill_deepspeed({"bf16": {"enabled": "auto"}}, "float32")["bf16"]["enabled"] is False
    assert fill_deepspeed({"bf16": {"enabled": False}}, "bfloat16")["bf16"]["enabled"] is False  # the user's choice


def test_serve_sh_picks_what_training_picks_on_this_machine_and_a_flag_wins():
    def served_dtype(*flags):
        out = subprocess.run(
            ["bash", str(ROOT / "benchmark" / "vllm" / "serve.sh"), "--dry-run", "--target", "/m", *flags],
            env=run_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        words = out.stdout.split()
        return words[words.index("--dtype") + 1], out.stderr

    dtype, said = served_dtype()
    assert dtype == choose("cpu")[0]
    assert choose("cpu")[1] in said  # and it says why
    assert served_dtype("--dtype", "float16")[0] == "float16"
