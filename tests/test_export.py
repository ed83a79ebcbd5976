import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import ROOT, make_tiny_target, run_env
from traineagle3.checkpoint import save_draft_folder
from traineagle3.draft import Eagle3Draft, KVCache, derive_draft_config, load_draft
from traineagle3.export import check, export
from traineagle3.vocab import VocabMap

AUX = [1, 2, 3]


@pytest.fixture(scope="module")
def trained(tiny_target, tmp_path_factory):
    """A draft folder as training writes it (fp32, with d2t/t2d, no embedding)."""
    target = AutoModelForCausalLM.from_pretrained(tiny_target)
    vm = VocabMap(torch.arange(0, 3000, 3), target.config.vocab_size)
    torch.manual_seed(0)
    draft = Eagle3Draft(derive_draft_config(target.config, vm.draft_vocab_size, AUX))
    draft.d2t.copy_(vm.d2t)
    draft.t2d.copy_(vm.t2d)
    out = tmp_path_factory.mktemp("trained") / "draft"
    save_draft_folder(draft.state_dict(), draft.config, out)
    return out, draft, target


@pytest.fixture(scope="module")
def exported(trained, tiny_target, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    return {e: export(trained[0], str(tiny_target), e, out / e) for e in ("vllm", "sglang")}


def test_engine_specific_layer_ids_rope_and_dtype(exported, tiny_target):
    v = json.loads((exported["vllm"] / "config.json").read_text())
    s = json.loads((exported["sglang"] / "config.json").read_text())
    assert v["eagle_aux_hidden_state_layer_ids"] == AUX == v["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert "eagle_aux_hidden_state_layer_ids" not in s and s["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    target = AutoConfig.from_pretrained(tiny_target)
    for cfg, folder in [(v, exported["vllm"]), (s, exported["sglang"])]:
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["tie_word_embeddings"] is False
        assert cfg["draft_vocab_size"] == 1000 and cfg["torch_dtype"] == "bfloat16"
        assert cfg["rope_theta"] == target.rope_parameters["rope_theta"]
        assert AutoConfig.from_pretrained(folder).rope_parameters == target.rope_parameters
        w = load_file(str(folder / "model.safetensors"))
        assert w["lm_head.weight"].dtype == torch.bfloat16 and w["d2t"].dtype == torch.int64
        assert not any(k.startswith("embed_tokens") for k in w)


def test_exported_draft_computes_what_was_trained(trained, exported):
    folder, draft, target = trained
    emb = target.get_input_embeddings().weight.data
    draft.embed_tokens.weight.data.copy_(emb)
    again = load_draft(exported["vllm"], emb).float()
    ids, aux = torch.randint(0, 3000, (1, 9)), torch.randn(1, 9, 3 * 64)
    pos = torch.arange(9)[None]
    with torch.no_grad():
        a, _ = draft.step(ids, draft.fc(aux), pos, KVCache())
        b, _ = again.step(ids, again.fc(aux), pos, KVCache())
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)  # bf16 weights
    assert torch.equal(again.d2t, draft.d2t)


def corrupt(folder, tmp_path, config=None, drop=()):
    out = tmp_path / "bad"
    out.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(config or {})
    (out / "config.json").write_text(json.dumps(cfg))
    w = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k not in drop}
    save_file(w, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("engine, change, drop, message", [
    ("vllm", {}, ("d2t",), "d2t is missing"),
    ("vllm", {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}, (), "differ from the top-level"),
    ("vllm", {"architectures": ["LlamaForCausalLM"]}, (), "architectures"),
    ("sglang", {"tie_word_embeddings": True}, (), "tie_word_embeddings"),
    ("sglang", {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}, (), "vLLM-numbered"),
    ("vllm", {"torch_dtype": "float32"}, (), "torch_dtype"),
    ("vllm", {"rope_theta": 500000.0}, (), "rope_theta"),
    ("vllm", {"draft_vocab_size": 999}, (), "lm_head.weight has shape"),
])
def test_check_refuses_folders_that_would_load_wrong(exported, tiny_target, tmp_path, engine, change, drop, message):
    bad = corrupt(exported[engine], tmp_path, change, drop)
    problems = check(bad, str(tiny_target), engine)
    assert any(message in p for p in problems), problems
    assert check(exported[engine], str(tiny_target), engine) == []


def test_check_refuses_another_target_and_cli_names_the_folder(exported, llama3_tokenizer, tmp_path):
    other = make_tiny_target(llama3_tokenizer, tmp_path / "other", layers=6, hidden=96)
    problems = check(exported["vllm"], str(other), "vllm")
    assert any("vocab_size" in p for p in problems) and any("hidden size" in p for p in problems)
    r = subprocess.run([sys.executable, "-m", "traineagle3.export", "--check", str(exported["vllm"]), "--target", str(other),
                        "--engine", "vllm"], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert r.returncode == 1 and f"{exported['vllm']}: vocab_size" in r.stderr
