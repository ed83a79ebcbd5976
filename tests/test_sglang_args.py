"""benchmark/sglang/serve.sh and `export --engine sglang` against SGLang's own code, on this CPU.

SGLang serves on GPUs only, so no server is started.  tests/sglang_probe.py runs, in a
subprocess with PYTHONPATH=.venv/sglang (make setup installs SGLang 0.5.18 there, sglang.def's
version), SGLang's `ServerArgs` parser and config readers on every command line serve.sh builds
(--dry-run).  What is really checked, per line:
- SGLang's argparse: unknown flags, value types and choices; and no deprecated alias used;
- `ServerArgs.__post_init__`, all of it, run with `--device cpu` added (without a device SGLang
  stops at "No accelerator is available"): it reads the target's and the draft's config.json
  with SGLang's config code, validates the speculative algorithm name, checks --context-length
  against the target, and resolves the EAGLE-3 step/topk/draft-token settings.  The values it
  ends with must be the ones serve.sh meant (SGLang resets some with only a warning).
Not checked, because they depend on the GPU: whether an attention backend exists for it
(a CPU run accepts fa3 or triton without looking), memory and CUDA-graph sizing.
For the EAGLE-3 lines, with the draft that `export --engine sglang` writes: SGLang's model
registry maps both architectures to its Llama / LlamaForCausalLMEagle3 classes, its aux-state
resolution reads `eagle_config`, and its Llama's own `set_eagle3_layers_to_capture` (called on
a stand-in object, the model needs torch.distributed) captures the inputs of exactly the target
layers the draft was trained on.  Weights are not loaded (that needs SGLang's GPU kernels).
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, export_random_draft
from safetensors import safe_open

from traineagle3.draft import default_aux_layers

SGLANG = Path(sys.prefix) / "sglang"
TREE = ("--num-steps", "5", "--eagle-topk", "8", "--num-draft-tokens", "32")
ALL = (
    "--served-name",
    "smol",
    "--host",
    "0.0.0.0",
    "--port",
    "9000",
    "--dtype",
    "bfloat16",
    "--tp",
    "2",
    "--max-model-len",
    "2048",
    "--attention-backend",
    "triton",
    "--mem-fraction-static",
    "0.8",
    "--max-total-tokens",
    "65536",
    "--cuda-graph-max-bs",
    "16",
)
ALL_MEANT = {
    "served_model_name": "smol",
    "host": "0.0.0.0",
    "port": 9000,
    "dtype": "bfloat16",
    "tp_size": 2,
    "context_length": 2048,
    "attention_backend": "triton",
    "mem_fraction_static": 0.8,
    "max_total_tokens": 65536,
    "cuda_graph_max_bs_decode": 16,
}
CHAIN_MEANT = {
    "speculative_algorithm": "EAGLE3",
    "speculative_num_steps": 3,
    "speculative_eagle_topk": 1,
    "speculative_num_draft_tokens": 4,
}
TREE_MEANT = {
    "speculative_algorithm": "EAGLE3",
    "speculative_num_steps": 5,
    "speculative_eagle_topk": 8,
    "speculative_num_draft_tokens": 32,
}
# serve.sh flags -> the SGLang settings they must end as (besides model and draft paths)
CASES = {
    "baseline": (
        (),
        {"port": 8000, "context_length": 4096, "tp_size": 1, "dtype": "auto", "speculative_algorithm": None},
    ),
    "eagle": (("--eagle",), {"port": 8001, "context_length": 4096, **CHAIN_MEANT}),
    "eagle-tree": (("--eagle", *TREE), TREE_MEANT),
    "baseline-all-flags": (ALL, ALL_MEANT),
    "eagle-tree-all-flags": (("--eagle", *TREE, *ALL), {**ALL_MEANT, **TREE_MEANT}),
    "eagle-singularity": (("--eagle", "--runtime", "singularity", "--image", "sglang.sif"), CHAIN_MEANT),
    "eagle-docker": (("--eagle", "--runtime", "docker", "--image", "lmsysorg/sglang:v0.5.18"), CHAIN_MEANT),
    "eagle-passthrough": (("--eagle", "--", "--max-running-requests", "8"), CHAIN_MEANT),
}


def serve_line(target, draft, flags) -> list[str]:
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmark" / "sglang" / "serve.sh"),
            "--dry-run",
            "--target",
            str(target),
            "--draft",
            str(draft),
            *flags,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (line,) = r.stdout.splitlines()
    return shlex.split(line)


def run_probe(lines: list[list[str]], work: Path) -> list[dict]:
    if not (SGLANG / "sglang").is_dir():
        pytest.fail(f"no SGLang in {SGLANG}: run make setup")
    (work / "lines.json").write_text(json.dumps(lines))
    env = dict(os.environ, PYTHONPATH=str(SGLANG), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sglang_probe.py"), str(work / "lines.json"), str(work / "results.json")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-5000:]
    return json.loads((work / "results.json").read_text())


def test_the_sglang_tested_is_the_one_sglang_def_serves_with():
    (version,) = re.findall(r"^From: lmsysorg/sglang:v(\S+)$", (ROOT / "sglang.def").read_text(), re.M)
    assert (SGLANG / f"sglang-{version}.dist-info").is_dir(), (
        f"sglang.def serves with SGLang {version}; make setup must install the same into {SGLANG}"
    )


@pytest.fixture(scope="module")
def exported(smol_path, tmp_path_factory):
    return export_random_draft(smol_path, tmp_path_factory.mktemp("sglang-export"))


@pytest.fixture(scope="module")
def probed(smol_path, exported, tmp_path_factory):
    """SGLang's verdict on each case's serve.sh line, the draft being the exported SGLang folder."""
    lines = [serve_line(smol_path, exported["sglang"], flags) for flags, _ in CASES.values()]
    return dict(zip(CASES, run_probe(lines, tmp_path_factory.mktemp("sglang-probe"))))


@pytest.mark.parametrize("case", CASES)
def test_sglang_accepts_every_serve_line(case, probed, smol_path, exported):
    result, (flags, meant) = probed[case], CASES[case]
    assert result["error"] is None, f"SGLang rejects serve.sh {' '.join(flags)}: {result['error']}\n{result['args']}"
    assert result["deprecated"] == [], f"serve.sh passes flags SGLang 0.5.18 deprecates: {result['deprecated']}"
    got = result["server_args"]
    assert got["model_path"] == str(smol_path)
    if "--eagle" in flags:
        assert got["speculative_draft_model_path"] == str(exported["sglang"])
    assert {k: got[k] for k in meant} == meant


def test_sglang_reads_the_exported_draft_as_trained(probed, exported, smol_path):
    """The layers SGLang feeds the draft are the ones training fed it, and `fc` fits them."""
    trained = json.loads((exported["sglang"].parent / "trained" / "config.json").read_text())
    reading = probed["eagle"]["eagle3"]
    layers = json.loads((smol_path / "config.json").read_text())["num_hidden_layers"]
    assert (reading["is_eagle3"], reading["target_class"], reading["draft_class"]) == (
        True,
        "LlamaForCausalLM",
        "LlamaForCausalLMEagle3",
    )
    assert (reading["use_aux_hidden_state"], reading["draft_num_layers"], reading["draft_dtype"]) == (
        True,
        1,
        "bfloat16",
    )
    assert reading["target_num_layers"] == layers
    assert reading["captures_aux"] is True
    # training captures the inputs of these layers (vLLM's numbering); SGLang must capture the same
    assert trained["eagle_aux_hidden_state_layer_ids"] == default_aux_layers(layers)
    assert reading["captured_layer_inputs"] == trained["eagle_aux_hidden_state_layer_ids"], (
        f"SGLang reads aux ids {reading['aux_layer_ids']} from {exported['sglang']} and captures the inputs "
        f"of layers {reading['captured_layer_inputs']}; the draft was trained on "
        f"{trained['eagle_aux_hidden_state_layer_ids']}"
    )
    with safe_open(exported["sglang"] / "model.safetensors", "pt") as f:
        fc_in = f.get_slice("fc.weight").get_shape()[1]
    assert reading["fc_in_features"] == fc_in
