"""The GPU check: training at Llama-8B shape on one GPU, with random weights and no download.

    bash benchmark/gpu_check.sh [--out DIR] [--shape llama-8b|tiny]

Three parts, one table (printed, and written to DIR/gpu_check.json):
  bench   `traineagle3.bench_train`, the efficient TTT formulation against the reference,
          at L=2048 with micro-batch 1, 2, 4 and at L=8192 with micro-batch 1 (each
          length in its own process, so that one out-of-memory does not taint the
          next); an out-of-memory is a result and is reported as one.
  train   real `deepspeed main.py` runs (ZeRO-2, the repository's ds_config.json) on a
          random-weights target of the shape, with online features and from the feature
          cache: tokens/s (over the logging windows after the first) and peak memory.
          The target gets a word-level tokenizer and synthetic conversations built here,
          so nothing is downloaded; token ids are what the step's cost depends on.
  equiv   on the device, in bf16: the merged TTT attention and every TTT step against
          token-by-token chain drafting with a KV cache (what vLLM and SGLang run).  Both
          are compared with a float64 evaluation of the same inputs on the CPU: bf16
          rounds differently in every formulation, so the bar is relative, as in
          tests/test_merged_attention.py: the TTT side's error must be within
          EQUIV_FACTOR x the error of the formulation it is checked against.

On a CUDA device it runs --shape llama-8b (the claim to measure: >= 2x tokens/s and
<= 0.5x peak memory at L=2048, micro-batch 4 fits); on a CPU it runs --shape tiny at
short lengths in fp32 (what CI runs, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "traineagle3" / "llama" / "main.py"
EQUIV_FACTOR = 3.0
# per shape: bench_train runs (seq len, micro-batches), bench flags, training-run settings
PLANS = {
    "llama-8b": dict(
        bench=[(2048, [1, 2, 4]), (8192, [1])],
        bench_flags=["--dtype", "bf16"],
        train=dict(seq_len=2048, micro=2, steps=12, log_every=4, conversations=40, draft_vocab=32000, words=50000),
        equiv=dict(heads=32, kv_heads=8, head_dim=128, seq_len=1024, draft_len=64),
    ),
    "tiny": dict(
        bench=[(128, [1, 2]), (256, [1])],
        bench_flags=["--dtype", "fp32", "--draft-vocab", "512", "--warmup", "1", "--iters", "1"],
        train=dict(seq_len=128, micro=2, steps=4, log_every=2, conversations=24, draft_vocab=512, words=8000),
        equiv=dict(heads=4, kv_heads=2, head_dim=16, seq_len=96, draft_len=24),
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "outputs" / "gpu_check"), help="working folder and gpu_check.json")
    p.add_argument("--shape", choices=sorted(PLANS), help="default: llama-8b on CUDA, tiny on a CPU")
    p.add_argument("--parts", nargs="+", choices=["bench", "train", "equiv"], default=["bench", "train", "equiv"])
    args = p.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.shape = args.shape or ("llama-8b" if args.device == "cuda" else "tiny")
    return args


def run_logged(cmd: list[str], log: Path, **kw) -> int:
    """Run `cmd` with its output in `log`; say in one line what ran and how it ended."""
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    print(
        f"  {' '.join(map(str, cmd[:4]))} ... -> rc {rc} in {time.perf_counter() - start:.0f} s (log: {log})",
        flush=True,
    )
    return rc


# bench ------------------------------------------------------------------------------------


def bench(args, plan: dict, out: Path) -> list[dict]:
    rows = []
    for seq_len, batches in plan["bench"]:
        result = out / f"bench_L{seq_len}.json"
        cmd = [
            sys.executable,
            "-m",
            "traineagle3.bench_train",
            "--shape",
            args.shape,
            "--seq-len",
            str(seq_len),
            "--micro-batch",
            *map(str, batches),
            "--ttt-steps",
            "7",
            *plan["bench_flags"],
            "--json",
            str(result),
        ]
        rc = run_logged(cmd, out / f"bench_L{seq_len}.log", cwd=REPO)
        if rc != 0:
            rows.append({"part": "bench", "seq_len": seq_len, "error": f"rc {rc}, see {out / f'bench_L{seq_len}.log'}"})
            continue
        data = json.loads(result.read_text())
        ratio = {q["micro_batch"]: q for q in data["ratios"]}
        for r in data["results"]:
            row = {
                "part": "bench",
                "seq_len": seq_len,
                **{k: r.get(k) for k in ("impl", "micro_batch", "oom", "tokens_per_s", "peak_gib", "step_gib")},
            }
            if r["impl"] == "efficient" and r["micro_batch"] in ratio:
                row["tokens_per_s_x"] = ratio[r["micro_batch"]]["tokens_per_s"]
                row["peak_gib_x"] = ratio[r["micro_batch"]]["peak_gib"]
            rows.append(row)
    return rows


# train ------------------------------------------------------------------------------------


def word_tokenizer(words: int):
    """A word-level tokenizer with a Llama-3-style chat template: real ids, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + ["user", "assistant"] + [f"w{i}" for i in range(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special[0], eos_token=special[3], unk_token="<unk>", pad_token=special[3]
    )
    fast.add_special_tokens({"additional_special_tokens": special[1:3]})
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|> {{ m['role'] }} <|end_header_id|> "
        "{{ m['content'] | trim }} <|eot_id|> {% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|> assistant <|end_header_id|> {% endif %}"
    )
    return fast


def synthetic_target(shape: str, words: int, folder: Path, device: str) -> Path:
    """A random-weights Llama of `shape` (bf16 on a GPU) with a `words`-word tokenizer, saved once."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from traineagle3.bench_train import SHAPES

    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    word_tokenizer(words).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def synthetic_chats(path: Path, n: int, words: int, answer_words: int, vocab: int) -> Path:
    """`n` two-turn conversations of Zipf-distributed words, long enough to fill a sample."""
    g = torch.Generator().manual_seed(0)
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)

    def text(k):
        return " ".join(f"w{i}" for i in torch.multinomial(p, k, replacement=True, generator=g).tolist())

    with path.open("w") as f:
        for i in range(n):
            messages = [{"role": "user", "content": text(words)}, {"role": "assistant", "content": text(answer_words)}]
            f.write(json.dumps({"id": f"synthetic-{i}", "messages": messages}) + "\n")
    return path


def ds_config(out: Path, device: str, micro: int) -> Path:
    name = "ds_config.json" if device == "cuda" else "ds_config_cpu.json"
    ds = json.loads((MAIN.parent / name).read_text())
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1)
    ds["zero_optimization"]["stage"] = 2
    path = out / name
    path.write_text(json.dumps(ds, indent=1))
    return path


def train_run(args, t: dict, target: Path, data: Path, out: Path, mode: str) -> dict:
    from traineagle3.ports import free_port

    run = out / f"train_{mode}"
    flags = {
        "deepspeed_config": ds_config(out, args.device, t["micro"]),
        "target": target,
        "train_data": data,
        "output_dir": run / "out",
        "cache_dir": run / "cache",
        "max_length": t["seq_len"],
        "draft_vocab_size": t["draft_vocab"],
        "ttt_steps": 7,
        "epochs": 1,
        "max_steps": t["steps"],
        "log_every": t["log_every"],
        "save_every": 1000000,
        "num_proc": 1,
        "progress": "false",
        "test_fraction": 0.1,
        "feature_cache": str(mode == "cached").lower(),
    }
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port())]
    cmd += [str(MAIN), *(x for name, value in flags.items() for x in (f"--{name}", str(value)))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if args.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    run.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rc = run_logged(cmd, run / "run.log", cwd=MAIN.parent, env=env)
    row = {
        "part": "train",
        "features": mode,
        "seq_len": t["seq_len"],
        "micro_batch": t["micro"],
        "wall_s": round(time.perf_counter() - start, 1),
    }
    metrics = run / "out" / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        return {**row, "error": f"rc {rc}, see {run / 'run.log'}"}
    train = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["split"] == "train"]
    windows = train[1:] or train  # the first window holds the warm-up
    return {
        **row,
        "steps": train[-1]["step"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows),
        "peak_gib": train[-1].get("peak_mem_gib"),
        "loss0_first": train[0]["loss"][0],
        "loss0_last": train[-1]["loss"][0],
    }


def train(args, plan: dict, out: Path) -> list[dict]:
    t = plan["train"]
    target = synthetic_target(args.shape, t["words"], out / f"target-{args.shape}", args.device)
    data = synthetic_chats(out / "chats.jsonl", t["conversations"], t["seq_len"] // 8, t["seq_len"], t["words"])
    return [train_run(args, t, target, data, out, mode) for mode in ("online", "cached")]


# equiv ------------------------------------------------------------------------------------


def max_err(got, exact) -> float:
    """Largest absolute difference; a missing gradient counts as zero (the output ignored that input)."""
    return max((e if g is None else g.double().cpu() - e).abs().max().item() for g, e in zip(got, exact))


def attention_errors(device: str, dtype, e: dict, steps: int = 4) -> tuple[float, float]:
    """Max error of the merged and the reference TTT attention (output and gradients) vs float64."""
    from traineagle3.merged_attention import merged_ttt_attention
    from traineagle3.ttt import ttt_attention

    g = torch.Generator().manual_seed(0)
    B, L, d = 1, e["seq_len"], e["head_dim"]
    q = torch.randn(B, L, e["heads"], d, generator=g).transpose(1, 2)
    kv = [torch.randn(B, e["kv_heads"], L, d, generator=g) for _ in range(2 * steps)]
    grad = torch.randn(B, e["heads"], L, d, generator=g)
    inputs = [x.to(dtype).double() for x in [q, *kv, grad]]  # the same (rounded) inputs for all three

    def run(fn, dev, dt):
        leaves = [x.detach().to(dev, dt).requires_grad_() for x in inputs[:-1]]
        o = fn(leaves[0], leaves[1 : 1 + steps], leaves[1 + steps :], 1 / math.sqrt(d))
        o.backward(inputs[-1].to(dev, dt))
        return [o.detach()] + [x.grad for x in leaves]

    exact = run(ttt_attention, "cpu", torch.float64)
    return max_err(run(merged_ttt_attention, device, dtype), exact), max_err(run(ttt_attention, device, dtype), exact)


def ttt_and_chain_logits(draft, aux, ids, t: int, steps: int) -> tuple[list, list]:
    """Draft logits at verified position t for steps 0..steps-1: from one TTT unroll, and
    from chain drafting (the prefix into a KV cache, then one token a step), tokens forced."""
    from traineagle3.draft import KVCache

    captured = []
    hook = draft.lm_head.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        teacher = torch.zeros(*ids.shape, draft.config.draft_vocab_size, device=ids.device, dtype=aux.dtype)
        draft(aux, ids, torch.ones_like(ids), teacher, torch.ones_like(ids, dtype=torch.bool), steps=steps)
        hook.remove()
        ttt = [c[0, t] for c in captured[:steps]]
        kv, fused = KVCache(), draft.fc(aux)
        logits, hidden = draft.step(
            ids[:, 1 : t + 2], fused[:, : t + 1], torch.arange(t + 1, device=ids.device)[None], kv
        )
        chain = [logits[0, -1]]
        hidden = hidden[:, -1:]
        for k in range(1, steps):
            logits, hidden = draft.step(
                ids[:, t + 1 + k : t + 2 + k], hidden, torch.tensor([[t + k]], device=ids.device), kv
            )
            chain.append(logits[0, -1])
    return ttt, chain


def chain_errors(shape: str, device: str, dtype, e: dict, steps: int = 7) -> dict:
    """bf16 TTT logits and bf16 chain-drafting logits, each against float64 chain drafting."""
    from transformers import LlamaConfig

    from traineagle3.bench_train import SHAPES
    from traineagle3.draft import Eagle3Draft, default_aux_layers
    from traineagle3.vocab import VocabMap

    tc = LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    vocab = VocabMap(torch.arange(min(4096, tc.vocab_size)), tc.vocab_size)
    draft64 = Eagle3Draft.from_target(tc, vocab, default_aux_layers(tc.num_hidden_layers)).double()
    L = e["draft_len"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tc.vocab_size, (1, L), generator=g)
    aux = torch.randn(1, L, 3 * tc.hidden_size, generator=g).to(dtype).double()
    ts = [0, L // 2, L - steps - 2]
    exact = [ttt_and_chain_logits(draft64, aux, ids, t, steps)[1] for t in ts]
    low = Eagle3Draft(draft64.config).to(device)
    low.load_state_dict(draft64.state_dict())
    low = low.to(dtype)
    got = [ttt_and_chain_logits(low, aux.to(device, dtype), ids.to(device), t, steps) for t in ts]
    ttt_err = max(max_err(ttt, ex) for (ttt, _), ex in zip(got, exact))
    chain_err = max(max_err(chain, ex) for (_, chain), ex in zip(got, exact))
    agree = [(a.argmax() == b.argmax()).item() for ttt, chain in got for a, b in zip(ttt, chain)]
    scale = max(x.abs().max().item() for ex in exact for x in ex)
    return {"ttt_err": ttt_err, "chain_err": chain_err, "logit_scale": scale, "top1_agree": sum(agree) / len(agree)}


def equiv(args, plan: dict, out: Path) -> list[dict]:
    e, device = plan["equiv"], args.device
    dtype = torch.bfloat16
    merged, reference = attention_errors(device, dtype, e)
    rows = [
        {
            "part": "equiv",
            "check": "merged attention vs float64",
            "err": merged,
            "against": "reference attention",
            "against_err": reference,
            "ok": merged <= EQUIV_FACTOR * reference,
        }
    ]
    c = chain_errors(args.shape, device, dtype, e)
    rows.append(
        {
            "part": "equiv",
            "check": "TTT logits vs float64 chain",
            "err": c["ttt_err"],
            "against": "bf16 chain drafting",
            "against_err": c["chain_err"],
            "logit_scale": c["logit_scale"],
            "top1_agree": c["top1_agree"],
            "ok": c["ttt_err"] <= EQUIV_FACTOR * c["chain_err"],
        }
    )
    return rows


# report -----------------------------------------------------------------------------------


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, float) else str(x)


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['part']:<6} L={r['seq_len']}: FAILED ({r['error']})")
        elif r["part"] == "bench":
            what = (
                "out of memory"
                if r["oom"]
                else (
                    f"{fmt(r['tokens_per_s'], '.0f')} tokens/s, peak {fmt(r['peak_gib'])} GiB"
                    + (
                        f" (x{fmt(r['tokens_per_s_x'])} tokens/s, x{fmt(r['peak_gib_x'])} memory vs reference)"
                        if "tokens_per_s_x" in r
                        else ""
                    )
                )
            )
            lines.append(f"bench  L={r['seq_len']} micro-batch {r['micro_batch']} {r['impl']:<9}: {what}")
        elif r["part"] == "train":
            lines.append(
                f"train  L={r['seq_len']} micro-batch {r['micro_batch']} {r['features']:<6} features: "
                f"{fmt(r['tokens_per_s'], '.0f')} tokens/s, peak {fmt(r['peak_gib'])} GiB, {r['steps']} steps, "
                f"step-0 loss {fmt(r['loss0_first'])} -> {fmt(r['loss0_last'])}, {r['wall_s']:.0f} s in all"
            )
        else:
            lines.append(
                f"equiv  {r['check']}: max error {r['err']:.2e} vs {r['against']}'s {r['against_err']:.2e}"
                + (
                    f" (logits up to {r['logit_scale']:.1f}, top-1 agrees {100 * r['top1_agree']:.0f}%)"
                    if "top1_agree" in r
                    else ""
                )
                + f": {'ok' if r['ok'] else 'FAILED'}"
                f" (bar: within {EQUIV_FACTOR:g}x)"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = PLANS[args.shape]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"GPU check: shape {args.shape} on {device_name}, torch {torch.__version__}; parts {' '.join(args.parts)}")
    rows, start = [], time.perf_counter()
    for part in args.parts:
        print(f"{part}:", flush=True)
        rows += {"bench": bench, "train": train, "equiv": equiv}[part](args, plan, out)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name,
        "shape": args.shape,
        "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(table(rows))
    print(f"{report['wall_s']:.0f} s; written to {out / 'gpu_check.json'}")
    failed = [r for r in rows if "error" in r or r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
