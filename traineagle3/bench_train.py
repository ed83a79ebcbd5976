"""Speed and memory of one draft training step: the efficient TTT formulation against the reference.

    python -m traineagle3.bench_train --shape llama-8b --seq-len 2048 --micro-batch 1 2 4 --ttt-steps 7 --dtype bf16

Weights and features are random, of the target's shape (nothing is downloaded): a
training step needs the target only for its features, which training from the feature
cache reads from disk.  --with-target runs a random-weights target forward in every
step instead, as online training does.  Both formulations (ttt.py: "reference" and
"efficient") run in this one process, one after the other, on the same inputs and the
same initial draft, so their first losses must agree.

Measured per formulation and micro-batch:
  tokens/s     positions x micro-batch / seconds, over --iters steps (forward, backward,
               AdamW step) after --warmup steps
  static GiB   allocated before a step: weights, optimizer state, inputs (the same for both)
  step GiB     the most allocated above that during a step: on CUDA from
               torch.cuda.max_memory_allocated; on the CPU from the allocations the torch
               profiler records (a resident-set size would not show memory freed and reused)
  peak GiB     static + step
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from .draft import Eagle3Draft, default_aux_layers
from .features import Features, TargetFeatures
from .ttt import IMPLS
from .vocab import VocabMap

LLAMA3 = dict(
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
SHAPES = {  # the targets' shapes (their published configs)
    "tiny": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
    "llama-1b": dict(
        LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    ),
    "llama-8b": dict(
        LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "llama-70b": dict(
        LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, nargs="+", default=[1])
    p.add_argument("--ttt-steps", type=int, default=7)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--draft-vocab", type=int, default=32000)
    p.add_argument("--impl", choices=IMPLS, nargs="+", default=["reference", "efficient"])
    p.add_argument("--with-target", action="store_true", help="run a random-weights target forward in every step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument(
        "--find-max-micro-batch",
        type=int,
        metavar="LIMIT",
        default=0,
        help="CUDA: also search the largest micro-batch up to LIMIT that fits (doubling, then bisection)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


class Setup:
    """The target's shape, its draft, and the inputs of a step (random, or from a random target)."""

    def __init__(self, args):
        self.args, self.device, self.dtype = args, torch.device(args.device), DTYPES[args.dtype]
        self.target_config = LlamaConfig(**SHAPES[args.shape])
        tc = self.target_config
        self.aux = default_aux_layers(tc.num_hidden_layers)
        self.vocab = VocabMap(torch.arange(min(args.draft_vocab, tc.vocab_size)), tc.vocab_size)
        g = torch.Generator(device=self.device).manual_seed(args.seed)
        self.draft_head = (
            torch.randn(self.vocab.draft_vocab_size, tc.hidden_size, generator=g, device=self.device)
            / math.sqrt(tc.hidden_size)
            * 8
        ).to(self.dtype)  # teacher logits of a few units
        self.target = None
        if args.with_target:
            torch.manual_seed(args.seed)
            with torch.device(self.device):
                target = AutoModelForCausalLM.from_config(tc, dtype=self.dtype)
            self.target = TargetFeatures(target, self.aux, self.vocab)

    def inputs(self, batch: int, seed: int) -> dict:
        tc, L, d = self.target_config, self.args.seq_len, self.device
        g = torch.Generator(device=d).manual_seed(seed)
        return {
            "input_ids": torch.randint(0, tc.vocab_size, (batch, L), generator=g, device=d),
            "loss_mask": (torch.rand(batch, L, generator=g, device=d) > 0.2).long(),
            "aux_hidden": torch.randn(batch, L, 3 * tc.hidden_size, generator=g, device=d).to(self.dtype),
            "last_hidden": torch.randn(batch, L, tc.hidden_size, generator=g, device=d).to(self.dtype),
            "teacher_ok": torch.rand(batch, L, generator=g, device=d) > 0.05,
        }

    def features(self, x: dict) -> Features:
        if self.target is not None:
            return self.target(x["input_ids"])
        return Features.from_last_hidden(x["aux_hidden"], x["last_hidden"], x["teacher_ok"], self.draft_head)

    def trainer(self):
        """A fresh draft (the same initial weights every time) and its optimizer."""
        release(self.device)  # the previous trainer's memory, even after an out-of-memory error
        torch.manual_seed(self.args.seed)
        with torch.device(self.device):
            draft = Eagle3Draft.from_target(self.target_config, self.vocab, self.aux, dtype=self.dtype)
        params = [p for p in draft.parameters() if p.requires_grad]
        return draft, torch.optim.AdamW(params, lr=1e-5, **({"fused": True} if self.device.type == "cuda" else {}))

    def step(self, draft, opt, x: dict, impl: str) -> float:
        f = self.features(x)
        r = draft(
            f.aux_hidden, x["input_ids"], x["loss_mask"], f.teacher, f.teacher_ok, steps=self.args.ttt_steps, impl=impl
        )
        r.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return r.loss.item()  # also waits for the device


def cpu_step_bytes(fn) -> int:
    """The most bytes allocated on the CPU while `fn` runs, above what was allocated before."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes += node.children
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
    if not allocations:
        return 0
    allocations.sort()
    before = allocations[0][1] - allocations[0][2]
    return max(total for _, total, _ in allocations) - before


def allocated_bytes(*objects) -> int:
    """Bytes of the tensors in `objects` (modules, optimizers, dicts): the CPU's static memory."""
    seen, total = set(), 0
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors = [t for s in obj.state.values() for t in s.values() if torch.is_tensor(t)]
        else:
            tensors = [t for t in obj.values() if torch.is_tensor(t)]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(setup: Setup, impl: str, batch: int) -> dict:
    args, device = setup.args, setup.device
    draft, opt = setup.trainer()
    try:
        x = setup.inputs(batch, args.seed + 1)
        losses = [setup.step(draft, opt, x, impl) for _ in range(max(args.warmup, 1))]
        cuda = device.type == "cuda"
        if cuda:
            static = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            static = allocated_bytes(
                draft, opt, x, {"head": setup.draft_head}, *([setup.target.target] if setup.target else [])
            )
        start = time.perf_counter()
        for _ in range(args.iters):
            setup.step(draft, opt, x, impl)
        seconds = (time.perf_counter() - start) / args.iters
        step = (
            torch.cuda.max_memory_allocated(device) - static
            if cuda
            else cpu_step_bytes(lambda: setup.step(draft, opt, x, impl))
        )
    except torch.OutOfMemoryError:
        return {"impl": impl, "micro_batch": batch, "oom": True}
    finally:
        draft = opt = x = None  # drop the references so that release() frees them
        release(device)
    return {
        "impl": impl,
        "micro_batch": batch,
        "oom": False,
        "first_loss": losses[0],
        "tokens_per_s": batch * args.seq_len / seconds,
        "step_s": seconds,
        "static_gib": static / GIB,
        "step_gib": step / GIB,
        "peak_gib": (static + step) / GIB,
    }


def fits(setup: Setup, impl: str, batch: int) -> bool:
    draft, opt = setup.trainer()
    try:
        setup.step(draft, opt, setup.inputs(batch, 0), impl)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        draft = opt = None  # drop the references so that release() frees them
        release(setup.device)


def max_micro_batch(setup: Setup, impl: str, limit: int) -> int:
    """The largest micro-batch <= limit whose training step fits in device memory."""
    good, b = 0, 1
    while b <= limit and fits(setup, impl, b):  # doubling up to the first that does not fit
        good, b = b, 2 * b
    bad = min(b, limit + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(setup, impl, mid) else (good, mid)
    return good


def ratios(rows: list[dict]) -> list[dict]:
    """efficient / reference, per micro-batch where both ran."""
    out = []
    for b in sorted({r["micro_batch"] for r in rows}):
        pair = {r["impl"]: r for r in rows if r["micro_batch"] == b and not r["oom"]}
        if {"efficient", "reference"} <= set(pair):
            e, r = pair["efficient"], pair["reference"]
            out.append(
                {
                    "micro_batch": b,
                    "tokens_per_s": e["tokens_per_s"] / r["tokens_per_s"],
                    "peak_gib": e["peak_gib"] / r["peak_gib"],
                    "step_gib": e["step_gib"] / r["step_gib"],
                    "first_loss_rel_diff": abs(e["first_loss"] - r["first_loss"]) / abs(r["first_loss"]),
                }
            )
    return out


def table(rows: list[dict], ratio_rows: list[dict]) -> str:
    lines = [
        f"{'impl':<10} {'batch':>5} {'tokens/s':>10} {'step s':>8} {'static GiB':>10} {'step GiB':>9} "
        f"{'peak GiB':>9} {'loss':>9}"
    ]
    for r in rows:
        if r["oom"]:
            lines.append(f"{r['impl']:<10} {r['micro_batch']:>5}   out of memory")
        else:
            lines.append(
                f"{r['impl']:<10} {r['micro_batch']:>5} {r['tokens_per_s']:>10.1f} {r['step_s']:>8.3f} "
                f"{r['static_gib']:>10.3f} {r['step_gib']:>9.3f} {r['peak_gib']:>9.3f} {r['first_loss']:>9.4f}"
            )
    for q in ratio_rows:
        lines.append(
            f"efficient/reference at micro-batch {q['micro_batch']}: tokens/s x{q['tokens_per_s']:.2f}, "
            f"peak memory x{q['peak_gib']:.2f}, step memory x{q['step_gib']:.2f}, "
            f"first losses differ by {q['first_loss_rel_diff']:.1e} (relative)"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup = Setup(args)
    device = setup.device
    rows = [measure(setup, impl, b) for b in args.micro_batch for impl in args.impl]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "results": rows,
        "ratios": ratios(rows),
    }
    print(
        f"{args.shape}, L={args.seq_len}, TTT {args.ttt_steps}, {args.dtype}, draft vocab "
        f"{setup.vocab.draft_vocab_size}, {'target forward' if args.with_target else 'cached features'}, "
        f"{result['device']}"
    )
    print(table(rows, result["ratios"]))
    if args.find_max_micro_batch:
        if device.type != "cuda":
            raise SystemExit("--find-max-micro-batch needs a CUDA device")
        result["max_micro_batch"] = {
            impl: max_micro_batch(setup, impl, args.find_max_micro_batch) for impl in args.impl
        }
        print("largest micro-batch that fits:", result["max_micro_batch"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
