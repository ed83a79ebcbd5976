import hashlib
import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_tiny_target, run_env
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from traineagle3.card import split_front_matter
from traineagle3.checkpoint import save_draft_folder
from traineagle3.config import TrainConfig, to_dict
from traineagle3.draft import OPTIONS, Eagle3Draft, KVCache, load_draft
from traineagle3.export import check, export
from traineagle3.export import main as export_main
from traineagle3.metrics import MetricsLog
from traineagle3.vocab import VocabMap

AUX = [1, 2, 3]


def trained_draft(target, out, options=None):
    """A draft folder as training writes it (fp32, with d2t/t2d, no embedding); with `options`,
    their norms away from one, so that one not applied shows."""
    vm = VocabMap(torch.arange(0, 3000, 3), target.config.vocab_size)
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(target.config, vm, AUX, overrides=options)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if options and "norm" in name:
                p.uniform_(0.5, 1.5)
    save_draft_folder(draft.state_dict(), draft.config, out)
    return out, draft, target


@pytest.fixture(scope="module")
def trained(tiny_target, tmp_path_factory):
    return trained_draft(
        AutoModelForCausalLM.from_pretrained(tiny_target), tmp_path_factory.mktemp("trained") / "draft"
    )


@pytest.fixture(scope="module")
def exported(trained, tiny_target, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    return {e: export(trained[0], str(tiny_target), e, out / e) for e in ("vllm", "sglang")}


def test_engine_specific_layer_ids_rope_and_dtype(exported, tiny_target):
    v = json.loads((exported["vllm"] / "config.json").read_text())
    s = json.loads((exported["sglang"] / "config.json").read_text())
    assert v["eagle_aux_hidden_state_layer_ids"] == AUX == v["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert "eagle_aux_hidden_state_layer_ids" not in s and s["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [
        0,
        1,
        2,
    ]
    target = AutoConfig.from_pretrained(tiny_target)
    for cfg, folder in [(v, exported["vllm"]), (s, exported["sglang"])]:
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["tie_word_embeddings"] is False
        assert cfg["draft_vocab_size"] == 1000 and cfg["torch_dtype"] == "bfloat16"
        assert {k: cfg[k] for k in OPTIONS} == dict.fromkeys(OPTIONS, False)  # the EAGLE-3 draft, said so
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


def chain(draft, ids, aux, steps=3):
    """Logits of a prefix step and `steps - 1` chained steps, each fed the hidden state the last returned."""
    kv, pos = KVCache(), torch.arange(ids.shape[1])[None]
    logits, hidden = draft.step(ids, draft.fc(aux), pos, kv)
    out = [logits]
    for k in range(1, steps):
        logits, hidden = draft.step(ids[:, -1:], hidden[:, -1:], pos[:, -1:] + k, kv)
        out.append(logits)
    return torch.cat(out, 1)


OPTION_SETS = [
    {"fc_norm": True},
    {"norm_before_fc": True},
    {"norm_output": True},
    {"norm_before_residual": True},
    dict.fromkeys(OPTIONS, True),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids="+".join)
def test_a_draft_with_options_exports_and_loads_back_computing_the_same(tiny_target, tmp_path, options):
    """Saved as training saves it and exported for each engine that runs it as trained, it loads
    back (load_draft) with its options and computes what was trained; SGLang ignores
    norm_before_residual, so such a draft is not exported for it."""
    folder, draft, target = trained_draft(
        AutoModelForCausalLM.from_pretrained(tiny_target), tmp_path / "trained", options
    )
    emb = target.get_input_embeddings().weight.data
    draft.embed_tokens.weight.data.copy_(emb)
    ids, aux = (
        torch.randint(0, 3000, (1, 9)),
        torch.randn(1, 9, 3 * 64) * torch.tensor([0.1] * 64 + [1.0] * 64 + [10.0] * 64),
    )
    with torch.no_grad():
        expected = chain(draft, ids, aux)
        torch.testing.assert_close(chain(load_draft(folder, emb), ids, aux), expected, rtol=0, atol=0)
        engines = [e for e in ("vllm", "sglang") if not (e == "sglang" and options.get("norm_before_residual"))]
        for engine in engines:
            out = export(folder, str(tiny_target), engine, tmp_path / engine)
            cfg = json.loads((out / "config.json").read_text())
            assert {k: cfg[k] for k in OPTIONS} == {k: k in options for k in OPTIONS}
            assert check(out, str(tiny_target), engine) == []
            again = load_draft(out, emb).float()
            assert {k: getattr(again.config, k) for k in OPTIONS} == {k: k in options for k in OPTIONS}
            torch.testing.assert_close(chain(again, ids, aux), expected, rtol=0.05, atol=0.05)  # bf16 weights
            off = load_draft(
                corrupt(
                    out,
                    tmp_path / engine,
                    dict.fromkeys(options, False),
                    drop=("input_norm.weight", "fc_norm.0.weight", "fc_norm.1.weight", "fc_norm.2.weight"),
                ),
                emb,
            )
            assert (chain(off.float(), ids, aux) - expected).abs().max() > 0.2  # so the comparison above can fail


@pytest.mark.parametrize("engine", ["sglang", "both"])
def test_export_for_sglang_refuses_an_option_sglang_ignores_in_one_line(tiny_target, tmp_path, capsys, engine):
    folder, *_ = trained_draft(
        AutoModelForCausalLM.from_pretrained(tiny_target),
        tmp_path / "trained",
        {"norm_before_residual": True, "norm_output": True},
    )
    capsys.readouterr()  # the target's loading progress
    with pytest.raises(SystemExit) as e:
        export_main(
            ["--draft", str(folder), "--target", str(tiny_target), "--engine", engine, "--out", str(tmp_path / "out")]
        )
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and err
        == f"error: {folder}: cannot export for sglang: norm_before_residual: SGLang's Llama draft "
        "ignores it (its residual is always the un-normalised hidden); export it with --engine vllm\n"
    )
    assert not (tmp_path / "out").exists()  # refused before anything is written, the vLLM folder too


@pytest.fixture(scope="module")
def exported_options(tiny_target, tmp_path_factory):
    """A draft with the options both engines run, exported for both."""
    tmp = tmp_path_factory.mktemp("options")
    folder, *_ = trained_draft(
        AutoModelForCausalLM.from_pretrained(tiny_target),
        tmp / "trained",
        {"norm_before_fc": True, "fc_norm": True, "norm_output": True},
    )
    return {e: export(folder, str(tiny_target), e, tmp / e) for e in ("vllm", "sglang")}


@pytest.mark.parametrize(
    "engine, change, drop, message",
    [
        (
            "vllm",
            {"fc_norm": False},
            (),
            "weights ['fc_norm.0.weight', 'fc_norm.1.weight', 'fc_norm.2.weight'] but fc_norm is not true",
        ),
        ("sglang", {"norm_before_fc": False}, (), "weights ['input_norm.weight'] but norm_before_fc is not true"),
        ("vllm", {}, ("input_norm.weight",), "weight input_norm.weight is missing"),
        ("vllm", {"norm_output": "true"}, (), "norm_output is 'true': must be true or false"),
        ("sglang", {"norm_before_residual": True}, (), "norm_before_residual: SGLang's Llama draft ignores it"),
        (
            "vllm",
            {"eagle_config": {"eagle_aux_hidden_state_layer_ids": AUX, "norm_before_fc": False}},
            (),
            "eagle_config norm_before_fc False overrides the top-level True",
        ),
    ],
)
def test_check_knows_the_options(exported_options, tiny_target, tmp_path, engine, change, drop, message):
    assert check(exported_options[engine], str(tiny_target), engine) == []
    problems = check(corrupt(exported_options[engine], tmp_path, change, drop), str(tiny_target), engine)
    assert any(message in p for p in problems), problems


def corrupt(folder, tmp_path, config=None, drop=()):
    out = tmp_path / "bad"
    out.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(config or {})
    (out / "config.json").write_text(json.dumps(cfg))
    w = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k not in drop}
    save_file(w, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize(
    "engine, change, drop, message",
    [
        ("vllm", {}, ("d2t",), "d2t is missing"),
        ("vllm", {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}, (), "differ from the top-level"),
        ("vllm", {"architectures": ["LlamaForCausalLM"]}, (), "architectures"),
        ("sglang", {"tie_word_embeddings": True}, (), "tie_word_embeddings"),
        ("sglang", {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}, (), "vLLM-numbered"),
        ("vllm", {"torch_dtype": "float32"}, (), "torch_dtype"),
        ("vllm", {"rope_theta": 500000.0}, (), "rope_theta"),
        ("vllm", {"draft_vocab_size": 999}, (), "lm_head.weight has shape"),
    ],
)
def test_check_refuses_folders_that_would_load_wrong(exported, tiny_target, tmp_path, engine, change, drop, message):
    bad = corrupt(exported[engine], tmp_path, change, drop)
    problems = check(bad, str(tiny_target), engine)
    assert any(message in p for p in problems), problems
    assert check(exported[engine], str(tiny_target), engine) == []


def test_check_refuses_another_target_and_cli_names_the_folder(exported, llama3_tokenizer, tmp_path):
    other = make_tiny_target(llama3_tokenizer, tmp_path / "other", layers=6, hidden=96)
    problems = check(exported["vllm"], str(other), "vllm")
    assert any("vocab_size" in p for p in problems) and any("hidden size" in p for p in problems)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "traineagle3.export",
            "--check",
            str(exported["vllm"]),
            "--target",
            str(other),
            "--engine",
            "vllm",
        ],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and f"{exported['vllm']}: vocab_size" in r.stderr


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def run_dir(trained, chat_jsonl, tmp_path):
    """A training output dir as main.py leaves it: config, DeepSpeed config, metrics, a checkpoint's draft."""
    run = tmp_path / "run"
    draft = run / "checkpoints" / "step_00000002" / "draft"
    shutil.copytree(trained[0], draft)
    (draft.parent / "trainer_state.json").write_text(json.dumps({"global_step": 2, "epoch": 1, "batches_done": 0}))
    (run / "train_config.json").write_text(json.dumps(to_dict(TrainConfig(train_data=str(chat_jsonl), ttt_steps=3))))
    (run / "ds_config.json").write_text(
        json.dumps(
            {
                "optimizer": {"type": "Muon", "params": {"muon_lr": 0.006, "adam_lr": 0.003, "momentum": 0.95}},
                "train_micro_batch_size_per_gpu": 2,
            }
        )
    )
    log = MetricsLog(run / "metrics.jsonl", True)
    for step, tau in [(2, 1.4321), (4, 1.9876)]:  # the step-4 test comes after this checkpoint
        log.write(
            step=step,
            split="test",
            tau=tau,
            rounds=40,
            round_acceptance=[0.3, 0.1, 0.0321] if step == 2 else [0.5, 0.3, 0.1876],
        )
    return draft


def results_files(tmp_path):
    offline = tmp_path / "eval_sharegpt.json"
    offline.write_text(
        json.dumps(
            {
                "total": {
                    "tau": 1.5678,
                    "acceptance_per_position": [0.4, 0.1, 0.0678],
                    "prompts": 8,
                    "k": 3,
                    "identical": True,
                    "speedup": 1.234,
                },
                "prompts": [],
            }
        )
    )
    served = tmp_path / "compare.json"
    served.write_text(
        json.dumps(
            [
                {
                    "engine": "vllm",
                    "concurrency": 1,
                    "server": "baseline",
                    "completed": "8/8",
                    "acceptance_length": None,
                    "speedup": None,
                },
                {
                    "engine": "vllm",
                    "concurrency": 1,
                    "server": "eagle3",
                    "completed": "8/8",
                    "acceptance_length": 1.4567,
                    "acceptance_per_position": [0.3, 0.1, 0.0567],
                    "speedup": 1.111,
                },
            ]
        )
    )
    return [f"sharegpt={offline}", f"sharegpt={served}"]


def test_card_states_the_runs_measurements_and_provenance_pins_the_inputs(run_dir, tiny_target, chat_jsonl, tmp_path):
    out = tmp_path / "exported"
    assert (
        export_main(
            [
                "--draft",
                str(run_dir),
                "--target",
                str(tiny_target),
                "--out",
                str(out),
                *sum((["--results", r] for r in results_files(tmp_path)), []),
            ]
        )
        == 0
    )
    today = datetime.now(timezone.utc).date().isoformat()
    for engine, ids in [("vllm", [1, 2, 3]), ("sglang", [0, 1, 2])]:
        card = (out / engine / "README.md").read_text()
        assert (
            "| 1.43 | 0.30 0.10 0.03 | - | " + today in card and "1.99" not in card
        )  # the checkpoint's step, not later
        assert "| sharegpt (8 prompts) | offline" in card and "| 1.57 | 0.40 0.10 0.07 | 1.23x |" in card
        assert "served by vllm, concurrency 1 | 1.46 | 0.30 0.10 0.06 | 1.11x |" in card
        assert f"- train: `chats.jsonl`, sha256 `{sha(chat_jsonl)}`" in card and str(chat_jsonl) not in card
        assert "| held-out 0.05 of chats.jsonl | replayed" in card  # the card names data files, not their paths
        assert "- optimizer: Muon (muon_lr 0.006, adam_lr 0.003)" in card and "- ttt_steps: 3" in card
        prov = json.loads((out / engine / "provenance.json").read_text())
        assert prov["training_data"]["train"] == {"source": str(chat_jsonl), "sha256": sha(chat_jsonl)}
        assert prov["target"]["weights_sha256"] == {"model.safetensors": sha(tiny_target / "model.safetensors")}
        assert prov["target"]["chat_template_sha256"] == sha(tiny_target / "chat_template.jinja")
        d2t = load_file(str(run_dir / "model.safetensors"))["d2t"]
        assert prov["vocab_map"]["d2t_sha256"] == hashlib.sha256(d2t.numpy().tobytes()).hexdigest()
        assert prov["aux_layer_ids"] == {engine: ids} and prov["packages"]["torch"] == torch.__version__
    vllm = (out / "vllm" / "README.md").read_text()
    spec = {"method": "eagle3", "model": "./vllm", "num_speculative_tokens": 3}  # relative: no local path
    assert f"vllm serve <target hub id or path> --speculative-config '{json.dumps(spec)}'" in vllm
    assert (
        "--speculative-draft-model-path ./sglang --speculative-num-steps 3"
        in (out / "sglang" / "README.md").read_text()
    )


def test_a_draft_nobody_measured_has_a_card_that_says_so(exported):
    for folder in exported.values():
        card = (folder / "README.md").read_text()
        assert "No measurement" in card and "| tau |" not in card
        assert json.loads((folder / "provenance.json").read_text())["training_run"] is None


def test_one_layout_whatever_the_engine(trained, tiny_target, tmp_path):
    assert (
        export_main(
            ["--draft", str(trained[0]), "--target", str(tiny_target), "--engine", "vllm", "--out", str(tmp_path)]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vllm"]
    assert {"config.json", "model.safetensors", "README.md", "provenance.json"} <= {
        p.name for p in (tmp_path / "vllm").iterdir()
    }


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--draft", "{tmp}/nowhere"], "{tmp}/nowhere: no draft here"),
        (["--target", "{tmp}/no-target"], "{tmp}/no-target: no such model folder"),
        (["--results", "{tmp}/missing.json"], "{tmp}/missing.json: no such results file"),
        (["--results", "{tmp}/bad.json"], "{tmp}/bad.json: not JSON"),
        (["--results", "{tmp}/other.json"], "{tmp}/other.json: neither an evaluate.py result"),
        (["--engine", "tensorrt"], "argument --engine: invalid choice: 'tensorrt'"),
    ],
)
def test_bad_input_is_one_line_naming_it_with_exit_status_2(trained, tiny_target, tmp_path, capsys, flags, names):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text("[1, 2]")
    args = {"--draft": str(trained[0]), "--target": str(tiny_target), "--out": str(tmp_path / "out")}
    flags = [f.format(tmp=tmp_path) for f in flags]
    args.update(dict(zip(flags[::2], flags[1::2])))
    try:
        code = export_main([x for kv in args.items() for x in kv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and names.format(tmp=tmp_path) in err, err


def test_the_command_line_prints_no_traceback(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "traineagle3.export",
            "--draft",
            str(tmp_path / "nowhere"),
            "--target",
            "smollm2-135m-instruct",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 2
        and r.stderr
        == f"error: {tmp_path / 'nowhere'}: no draft here (expected config.json + "
        "model.safetensors, or draft/ with them)\n"
    )


def test_push_to_hub_uploads_both_engine_folders_with_their_cards(trained, tiny_target, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or f"https://hub/{repo_id}",
    )
    monkeypatch.setattr(
        HfApi,
        "upload_folder",
        lambda self, **kw: calls.append(
            (
                "folder",
                kw,
                sorted(
                    str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*") if p.is_file()
                ),
            )
        ),
    )
    monkeypatch.setattr(HfApi, "upload_file", lambda self, **kw: calls.append(("file", kw)))
    out = tmp_path / "exported"
    assert (
        export_main(
            [
                "--draft",
                str(trained[0]),
                "--target",
                str(tiny_target),
                "--out",
                str(out),
                "--push-to-hub",
                "org/draft-x",
                "--private",
            ]
        )
        == 0
    )
    (_, repo, create), (_, folder, files), (_, root) = calls
    assert repo == "org/draft-x" and create["private"] is True and create["exist_ok"] is True
    assert folder["repo_id"] == "org/draft-x" and folder["folder_path"] == str(out)
    assert sorted(folder["allow_patterns"]) == ["sglang/*", "vllm/*"]
    assert files == sorted(
        f"{e}/{f}"
        for e in ("sglang", "vllm")
        for f in ("README.md", "config.json", "model.safetensors", "provenance.json")
    )
    assert root["repo_id"] == "org/draft-x" and root["path_in_repo"] == "README.md"
    assert b"hf download org/draft-x --local-dir draft-x" in root["path_or_fileobj"]
    card = (out / "vllm" / "README.md").read_text()  # what a downloader runs
    front, body = split_front_matter(card)  # the repository's page shows a card, its front matter at the top
    page = root["path_or_fileobj"].decode()
    assert front and page.startswith(front) and page.endswith(body)
    assert '"model": "draft-x/vllm"' in card and "hf download org/draft-x --local-dir draft-x" in card
