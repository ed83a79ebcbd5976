"""End-to-end runs of `main.py` on the CPU: ranks vs accumulation, and SIGKILL + resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env
from safetensors.torch import load_file

MAIN = ROOT / "traineagle3" / "llama" / "main.py"


def ds_config(tmp, accum, stage=2):
    cfg = json.loads((MAIN.parent / "ds_config_cpu.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=accum)
    cfg["zero_optimization"]["stage"] = stage
    path = tmp / f"ds_accum{accum}_zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def train_args(target, data, out, ds, cache, *extra):
    return [
        "--deepspeed_config",
        str(ds),
        "--target",
        str(target),
        "--train_data",
        str(data),
        "--output_dir",
        str(out),
        "--cache_dir",
        str(cache),
        "--max_length",
        "192",
        "--draft_vocab_size",
        "2000",
        "--aux_layers",
        "1,2,3",
        "--epochs",
        "2",
        "--target_dtype",
        "float32",
        "--save_every",
        "2",
        "--log_every",
        "1",
        "--num_proc",
        "1",
        "--progress",
        "false",
        *extra,
    ]


def launch(args, ranks=1, **kw):
    if ranks == 1:
        cmd = [sys.executable, str(MAIN), *args]
    else:
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(ranks),
            "--master_port",
            "29533",
            str(MAIN),
            *args,
        ]
    return subprocess.Popen(
        cmd,
        cwd=MAIN.parent,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def weights(out):
    return load_file(str(out / "draft" / "model.safetensors"))


@pytest.fixture(scope="module")
def baseline(tiny_target, chat_jsonl, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    args = train_args(
        tiny_target, chat_jsonl, tmp / "out", ds_config(tmp, accum=2), tmp / "cache", "--report_to", "tensorboard"
    )
    log = finish(launch(args))
    (tmp / "run.log").write_text(log)
    return tmp / "out"


def test_run_writes_serving_folder_and_metrics(baseline):
    cfg = json.loads((baseline / "draft" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    w = weights(baseline)
    assert {
        "fc.weight",
        "norm.weight",
        "lm_head.weight",
        "d2t",
        "t2d",
        "midlayer.hidden_norm.weight",
        "midlayer.self_attn.q_proj.weight",
    } <= set(w) and not any(k.startswith("embed_tokens") for k in w)
    assert w["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * cfg["hidden_size"]
    lines = [json.loads(x) for x in (baseline / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert {x["epoch"] for x in lines if x["split"] == "test"} == {1, 2}
    assert len(train[0]["acc"]) == 7 and train[-1]["tokens_per_s"] > 0
    for x in lines:  # chained acceptance: step 0 is its accuracy over all positions (out-of-vocabulary ones
        # are misses), then it can only fall
        assert 0 < x["in_draft_vocab"] <= 1 and x["acceptance"] == sorted(x["acceptance"], reverse=True)
        assert x["acceptance"][0] == pytest.approx(x["acc"][0] * x["in_draft_vocab"], abs=2e-5)
    assert train[-1]["loss"][0] < train[0]["loss"][0]
    for x in lines:  # the test split also replays decoding: tau and the rates a round reaches each position
        test = x["split"] == "test"
        assert ("tau" in x) == test and ("round_acceptance" in x) == test
        if test:
            assert x["rounds"] > 0 and x["tau"] == pytest.approx(1 + sum(x["round_acceptance"]), abs=5e-5)
            assert x["round_acceptance"] == sorted(x["round_acceptance"], reverse=True)


def test_tensorboard_reads_back_what_the_run_logged(baseline):
    """--report_to tensorboard: loss and acceptance per TTT position, replayed tau, lr, tokens/s, memory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(baseline / "tensorboard"))
    events.Reload()
    lines = [json.loads(x) for x in (baseline / "metrics.jsonl").read_text().splitlines()]
    for split, tag, value in [
        ("train", "train/loss/0", lambda r: r["loss"][0]),
        ("train", "train/lr", lambda r: r["lr"]),
        ("train", "train/acceptance/6", lambda r: r["acceptance"][6]),
        ("train", "train/tokens_per_s", lambda r: r["tokens_per_s"]),
        ("train", "train/peak_rss_gib", lambda r: r["peak_rss_gib"]),
        ("test", "test/tau", lambda r: r["tau"]),
        ("test", "test/loss/6", lambda r: r["loss"][6]),
    ]:
        logged = [(r["step"], pytest.approx(value(r), rel=1e-6)) for r in lines if r["split"] == split]
        assert len(logged) >= 2 and [(e.step, e.value) for e in events.Scalars(tag)] == logged, tag


def test_exported_card_states_the_runs_replayed_tau(baseline, tiny_target, tmp_path):
    from traineagle3.export import main as export_main

    assert export_main(["--draft", str(baseline), "--target", str(tiny_target), "--out", str(tmp_path)]) == 0
    last = [json.loads(x) for x in (baseline / "metrics.jsonl").read_text().splitlines()][-1]
    card = (tmp_path / "sglang" / "README.md").read_text()
    assert (
        f"| {last['tau']:.2f} | {' '.join(f'{x:.2f}' for x in last['round_acceptance'])} | - | {last['time'][:10]} |"
        in card
    )
    prov = json.loads((tmp_path / "vllm" / "provenance.json").read_text())
    assert prov["ds_config"]["gradient_accumulation_steps"] == 2 and prov["train_config"]["report_to"] == "tensorboard"


def test_one_cpu_rank_skips_the_shared_memory_op(baseline):
    """DeepSpeed JIT-builds it (~1 min on a fresh machine) and loads it for any world size."""
    assert "shm_comm" not in (baseline.parent / "run.log").read_text()


def test_two_ranks_match_one_rank_with_doubled_accumulation(tiny_target, chat_jsonl, tmp_path):
    """With Muon (ds_config_cpu.json's optimizer) under ZeRO-2, a matrix split between the two
    ranks' partitions must still be orthogonalised whole. An MLP of 96 puts the middle of the
    Muon group's flattened matrices inside v_proj (asserted below), so one is split."""
    (tmp_path / "draft.json").write_text(json.dumps({"intermediate_size": 96}))
    runs = {}
    for ranks, accum in [(1, 2), (2, 1)]:
        out = tmp_path / f"ranks{ranks}"
        ds, cache = ds_config(tmp_path, accum=accum), tmp_path / "cache"
        args = train_args(tiny_target, chat_jsonl, out, ds, cache, "--draft_config", str(tmp_path / "draft.json"))
        finish(launch(args, ranks=ranks))
        runs[ranks] = weights(out)
    one, two = runs[1], runs[2]
    order = ["fc.", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the model's
    muon = [next(v.numel() for k, v in one.items() if name in k) for name in order]
    assert sum(muon) == sum(v.numel() for k, v in one.items() if v.dim() == 2 and "lm_head" not in k)
    ends = torch.tensor(muon).cumsum(0)
    assert not (ends == sum(muon) // 2).any(), "no Muon matrix straddles the two partitions"
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any((one[k] != 0).any() and k.endswith("weight") for k in one)


def test_sigkill_then_resume_matches_uninterrupted_run(baseline, tiny_target, chat_jsonl, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny_target, chat_jsonl, out, ds_config(tmp_path, accum=2), tmp_path / "cache")
    proc = launch(args)
    first = out / "checkpoints" / "step_00000002" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "draft").exists()  # it really died before the end
    log = finish(launch(args + ["--resume"]))
    assert "resumed from" in log
    one, resumed = weights(baseline), weights(out)
    for k in one:
        torch.testing.assert_close(resumed[k], one[k], rtol=1e-5, atol=1e-6, msg=k)


def test_run_stopped_by_max_steps_resumes_mid_epoch(baseline, tiny_target, chat_jsonl, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny_target, chat_jsonl, out, ds_config(tmp_path, accum=2), tmp_path / "cache")
    finish(launch(args + ["--max_steps", "3"]))
    state = json.loads((out / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state == {"global_step": 3, "epoch": 0, "batches_done": 6}
    finish(launch(args + ["--resume"]))
    one, resumed = weights(baseline), weights(out)
    for k in one:
        torch.testing.assert_close(resumed[k], one[k], rtol=1e-5, atol=1e-6, msg=k)


def test_log_plot_renders_a_real_runs_metrics(baseline, tmp_path):
    png = tmp_path / "log_plot.png"
    metrics = str(baseline / "metrics.jsonl")
    subprocess.run(
        [sys.executable, str(ROOT / "log_plot.py"), metrics, metrics, "-o", str(png)], check=True, env=run_env()
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_training_from_the_feature_cache_matches_online(baseline, tiny_target, chat_jsonl, tmp_path):
    """An fp32 cache reproduces the online run; once complete, a run never loads the target."""
    args = train_args(
        tiny_target,
        chat_jsonl,
        tmp_path / "out",
        ds_config(tmp_path, accum=2),
        tmp_path / "cache",
        "--feature_cache",
        "--feature_cache_dtype",
        "float32",
    )
    log = finish(launch(args))
    assert "loading the target" in log and "train features from" in log
    one, cached = weights(baseline), weights(tmp_path / "out")
    for k in one:
        torch.testing.assert_close(cached[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    args[args.index("--output_dir") + 1] = str(tmp_path / "again")
    log = finish(launch(args + ["--max_steps", "1"]))
    assert "loading the target" not in log and "train features from" in log
    assert (tmp_path / "again" / "draft" / "model.safetensors").exists()


def test_frozen_head_stays_the_targets_rows_through_a_resume(baseline, tiny_target, chat_jsonl, tmp_path):
    """--freeze_lm_head: DeepSpeed's checkpoints leave the frozen head out; stopped and resumed,
    the run still ends with the target's rows of the draft vocabulary, and everything else trained."""
    out = tmp_path / "out"
    args = train_args(
        tiny_target,
        chat_jsonl,
        out,
        ds_config(tmp_path, accum=2),
        tmp_path / "cache",
        "--freeze_lm_head",
        "true",
        "--draft_init",
        "target_head",
    )
    finish(launch(args + ["--max_steps", "3"]))
    assert "resumed from" in finish(launch(args + ["--resume"]))
    w, trained = weights(out), weights(baseline)
    rows = target_head_rows(tiny_target, w)
    torch.testing.assert_close(w["lm_head.weight"], rows)
    assert not torch.allclose(trained["lm_head.weight"], rows)  # trained, the head moves


def target_head_rows(target, w):
    """The target's lm_head rows of the draft vocabulary that `w` (a draft's weights) maps."""
    t = load_file(str(Path(target) / "model.safetensors"))
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return head[torch.arange(len(w["d2t"])) + w["d2t"]].to(w["lm_head.weight"].dtype)


def test_the_gpu_recipe_trains_as_shipped(tiny_target, chat_jsonl, tmp_path):
    """taide.json with ds_config.json (bf16, ZeRO-2, Muon), from traineagle3/llama as users run
    them, on a tiny target: the draft gets draft_options.json's norms and starts from the target's head."""
    out = tmp_path / "out"
    args = ["--deepspeed_config", "ds_config.json", "--config", "taide.json", "--target", str(tiny_target)]
    args += ["--train_data", str(chat_jsonl), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")]
    args += ["--max_length", "128", "--draft_vocab_size", "2000", "--aux_layers", "1,2,3", "--max_steps", "2"]
    finish(launch(args + ["--num_proc", "1", "--progress", "false"]))
    config = json.loads((out / "draft" / "config.json").read_text())
    assert config["norm_before_fc"] is True and config["norm_output"] is True
    assert json.loads((out / "ds_config.json").read_text())["optimizer"]["type"] == "Muon"
    train = json.loads((out / "train_config.json").read_text())
    assert (train["freeze_lm_head"], train["draft_init"], train["ttt_decay"]) == (False, "target_head", 1.0)
    # two steps of the 2000-step warm-up move the trained head by ~1e-6 from the target's rows
    w = weights(out)
    torch.testing.assert_close(w["lm_head.weight"], target_head_rows(tiny_target, w), atol=1e-3, rtol=0)
