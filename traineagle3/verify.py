"""Prove, against the real server, that a draft serves as it was trained, before anyone benchmarks it.

    python -m traineagle3.verify --target T --draft D --prompts FILE [--num-prompts N] [--k K]
        [--engine vllm|sglang] (--launch | --base-url URL --baseline-url URL) [--trained DIR] [--out verify.json]

Most "good offline, poor when served" reports are silent mismatches while the server
looks healthy.  Each check prints PASS or FAIL with one line of why; the exit status is
0 only when all pass, and the JSON report holds every number.
  config      the draft's max_position_embeddings covers the server's max_model_len
  template    the server's own tokenisation (/tokenize) of each chat prompt a client
              sends equals the tokens training renders for that conversation
  mask        one training sample's loss mask, printed readably; neither all 0 nor all 1
  greedy      the EAGLE-3 server's greedy output equals the plain server's, token for token;
              where it differs, every token it served must still be the target's greedy
              choice up to a near-tie (NEAR_TIE bf16 steps of the target's top logit there): in
              bf16, verifying k+1 tokens in one
              batch rounds differently than decoding one, so two tokens of equal score can
              swap; a token the target clearly did not pick fails
  acceptance  acceptance per draft position served (vLLM: its /metrics, counted per prompt;
              SGLang: each request's spec_correct_drafts_histogram) against the offline
              evaluator forced along the same served outputs, with the trained draft
              (--trained, else the served folder); a gap above TOLERANCE fails, naming the position
Acceptance is also broken down by the prompts' writing system (cjk / latin / code / other).
--launch starts both servers with benchmark/<engine>/serve.sh (the settings users serve with)
and stops them at the end.  SGLang: chain drafting only (topk 1, num-steps k, num-draft-tokens
k+1), where draft position i was accepted in the rounds that accepted more than i drafts; a
server drafting a tree (read from /server_info) is refused, as is a --draft folder that is not
SGLang's export.  vLLM is served chat completions; SGLang /generate of the ids its /tokenize gave.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from .acceptance import summarize
from .cli import Parser, UserError, cli, number
from .decoding import eos_ids, load_models, speculative
from .precision import AUTO
from .records import read_prompts, writing_system
from .serving import ENGINES, Server, launched

# Served vs offline acceptance at one position, on the same outputs: they differ only by
# floating-point order (vLLM's kernels vs HF's) and the bf16 export vs the trained weights.
# A correct draft's largest gap measured here was 0.015 (docs/RESULTS.md): twice that.
TOLERANCE = 0.03
# How far a served token may trail the target's top one and still count as its greedy choice,
# in steps of bfloat16 at the top logit's size (2^(exponent - 7): 0.125 at 16-32, 0.5 at 64-128),
# so that it means the same on every target whatever the size of its logits: two steps in
# bf16; float16 and float32 kernels differ in their last bits only.  The offline target's own
# logits carry this rounding too.
NEAR_TIE = {"bfloat16": 2.0, "float16": 0.5, "float32": 0.125}


def around(tokenizer, ids: list[int], i: int) -> str:
    return repr(tokenizer.decode(ids[max(i - 8, 0) : i])) + " | " + repr(tokenizer.decode(ids[i : i + 8]))


def template_check(tokenizer, served: list[int], trained: list[int]) -> str | None:
    """None when the served prompt is the trained prompt; else both texts at the first difference."""
    if served == trained:
        return None
    i = next((j for j, (a, b) in enumerate(zip(served, trained)) if a != b), min(len(served), len(trained)))
    return f"token {i} differs: served {around(tokenizer, served, i)}; trained {around(tokenizer, trained, i)}"


def mask_dump(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The sample's text with the trained spans in [[...]]."""
    parts, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:
            j += 1
        text = tokenizer.decode(ids[i:j])
        parts.append(f"[[{text}]]" if mask[i] else text)
        i = j
    return "".join(parts)


def compare_acceptance(served: list[float], offline: list[float], tolerance: float) -> str | None:
    gaps = [(i, s - o) for i, (s, o) in enumerate(zip(served, offline)) if abs(s - o) > tolerance]
    if not gaps:
        return None
    return "; ".join(f"position {i}: served {served[i]:.3f} vs offline {offline[i]:.3f} ({g:+.3f})" for i, g in gaps)


class Verifier:
    def __init__(self, args, tokenizer, target, draft, served_config: dict, base: Server, eagle: Server):
        self.args, self.tokenizer, self.target, self.draft = args, tokenizer, target, draft
        self.served_config = served_config  # the config.json of the folder the server loads
        self.base, self.eagle = base, eagle
        self.failures: list[str] = []
        self.report: dict = {"checks": {}}

    def check(self, name: str, problem: str | None, ok_line: str) -> None:
        self.report["checks"][name] = {"ok": problem is None, "detail": problem or ok_line}
        print(f"{'PASS' if problem is None else 'FAIL'} {name}: {problem or ok_line}", flush=True)
        if problem is not None:
            self.failures.append(f"{name}: {problem}")

    def config(self) -> bool:
        limit = self.served_config["max_position_embeddings"]
        served = self.eagle.max_model_len
        self.check(
            "config",
            None
            if served is None or limit >= served
            else f"the draft's max_position_embeddings {limit} is below the server's max_model_len {served}: "
            "positions past it get RoPE the draft never saw",
            f"max_position_embeddings {limit} >= {served}",
        )
        return limit >= (served or 0)

    def run_prompts(self, prompts: list[dict]) -> list[dict]:
        from .data import special_token_ids, tokenize_conversation

        special, rows = special_token_ids(self.tokenizer), []
        for p in prompts:
            messages = [{"role": "user", "content": p["turns"][0]}]
            prompt_ids = self.eagle.tokenize(messages)
            out, drafts, accepted = self.eagle.speculative(messages, prompt_ids, self.args.max_tokens, self.args.k)
            plain = self.base.greedy(messages, prompt_ids, self.args.max_tokens)
            answer = self.tokenizer.decode(out, skip_special_tokens=True)
            ids, mask = tokenize_conversation(
                self.tokenizer, messages + [{"role": "assistant", "content": answer}], special
            )
            first = mask.index(1) if 1 in mask else len(ids)
            rows.append(
                {
                    "id": p["id"],
                    "script": writing_system(p["turns"][0]),
                    "prompt_ids": prompt_ids,
                    "trained_prompt_ids": ids[:first],
                    "output": out,
                    "plain_output": plain,
                    "drafts": drafts,
                    "accepted": accepted,
                    "sample": (ids, mask),
                }
            )
        return rows

    def offline(self, rows: list[dict]) -> None:
        """Each row's drafts accepted per round, offline, forced along the served output."""
        from .features import AuxHooks

        hooks = AuxHooks(self.target, self.draft.config.eagle_aux_hidden_state_layer_ids)
        eos = eos_ids(self.target, self.tokenizer)
        try:
            for r in rows:
                gen = speculative(
                    self.target,
                    hooks,
                    self.draft,
                    torch.tensor([r["prompt_ids"]]),
                    len(r["output"]),
                    self.args.k,
                    eos,
                    forced=r["output"],
                )
                r["offline_accepted"] = gen.accepted
        finally:
            hooks.remove()

    def acceptance(self, rows: list[dict]) -> None:
        self.offline(rows)
        total = self.summary(rows)
        table = {
            name: self.summary([r for r in rows if r["script"] == name]) for name in sorted({r["script"] for r in rows})
        }
        self.report["acceptance"] = {"total": total, "by_script": table, "tolerance": self.args.tolerance}
        print("| prompts | served tau | served acceptance | offline tau | offline acceptance |\n|---|---|---|---|---|")
        for name, s in [("all", total), *table.items()]:
            print(
                f"| {name} ({s['prompts']}) | {s['served_tau']:.3f} | {' '.join(f'{x:.3f}' for x in s['served'])} | "
                f"{s['offline_tau']:.3f} | {' '.join(f'{x:.3f}' for x in s['offline'])} |"
            )
        self.check(
            "acceptance",
            compare_acceptance(total["served"], total["offline"], self.args.tolerance),
            f"served tau {total['served_tau']:.3f} vs offline {total['offline_tau']:.3f}, every position "
            f"within {self.args.tolerance}",
        )

    def summary(self, rows: list[dict]) -> dict:
        """Served and offline acceptance of `rows` together: served from the summed counts."""
        drafts = sum(r["drafts"] for r in rows)
        served = [sum(r["accepted"][i] for r in rows) / drafts if drafts else 0.0 for i in range(self.args.k)]
        off = summarize([a for r in rows for a in r["offline_accepted"]], self.args.k)
        return {
            "prompts": len(rows),
            "drafts": drafts,
            "served": served,
            "served_tau": 1 + sum(served),
            "offline": off["acceptance_per_position"],
            "offline_tau": off["tau"],
        }

    def run(self, prompts: list[dict]) -> None:
        if not self.config():
            return
        rows = self.run_prompts(prompts)
        bad = [(r["id"], template_check(self.tokenizer, r["prompt_ids"], r["trained_prompt_ids"])) for r in rows]
        bad = [(i, p) for i, p in bad if p]
        self.check(
            "template",
            f"prompt {bad[0][0]}: {bad[0][1]} ({len(bad)} of {len(rows)} prompts differ)" if bad else None,
            f"{len(rows)} prompts tokenised by the server as training renders them",
        )
        ids, mask = rows[0]["sample"]
        print(f"loss mask of one training sample ([[trained]]):\n{mask_dump(self.tokenizer, ids, mask)}")
        self.check(
            "mask",
            None if 0 < sum(mask) < len(mask) else f"{sum(mask)} of {len(mask)} tokens trained",
            f"{sum(mask)} of {len(mask)} tokens trained",
        )
        problem, ok_line, near_ties = greedy_check(self.target, rows, NEAR_TIE[self.args.dtype])
        self.check("greedy", problem, ok_line)
        self.report["checks"]["greedy"]["near_ties"] = near_ties
        self.acceptance(rows)
        self.report["prompts"] = [{k: v for k, v in r.items() if k != "sample"} for r in rows]


def bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits): 2^(exponent - 7)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)


def greedy_gaps(target, prompt_ids: list[int], output: list[int]) -> list[tuple[float, float]]:
    """Per output token, (how far in logits it trails the target's top token after the same
    prefix, one bf16 step at that top logit): 0 where it is the greedy choice.  One target pass."""
    with torch.no_grad():
        logits = target(torch.tensor([prompt_ids + output])).logits[0, len(prompt_ids) - 1 : -1].float()
    chosen = logits.gather(-1, torch.tensor(output)[:, None])[:, 0]
    top = logits.max(-1).values
    return list(zip((top - chosen).tolist(), bf16_step(top).tolist()))


def greedy_check(target, rows: list[dict], tolerance: float) -> tuple[str | None, str, int]:
    """(problem or None, the line when it passes, how many outputs differ at near-ties only).

    An output that differs from plain greedy passes when each of its tokens trails the
    target's top token by at most `tolerance` bf16 steps of that top logit: two near-equal
    candidates swapped by rounding, after which the two answers go their own ways.
    """
    differ = [r for r in rows if r["output"] != r["plain_output"]]
    if not differ:
        return None, f"{len(rows)} outputs identical to plain greedy, token for token", 0
    for r in differ:
        r["greedy_gaps"] = greedy_gaps(target, r["prompt_ids"], r["output"])
        r["first_difference"] = next(
            (i for i, (a, b) in enumerate(zip(r["output"], r["plain_output"])) if a != b),
            min(len(r["output"]), len(r["plain_output"])),
        )
    _, worst, at = max(
        ((gap / step, r, i) for r in differ for i, (gap, step) in enumerate(r["greedy_gaps"])), key=lambda t: t[0]
    )
    gap, step = worst["greedy_gaps"][at]
    if gap > tolerance * step:
        return (
            f"{len(differ)} of {len(rows)} outputs differ from plain greedy; prompt {worst['id']}'s output token "
            f"{at} trails the target's greedy choice by {gap:.3f} logits, {gap / step:.2f} bf16 steps of "
            f"{step:g} (a near-tie is <= {tolerance:g} steps)",
            "",
            0,
        )
    return (
        None,
        (
            f"{len(rows) - len(differ)} of {len(rows)} outputs identical to plain greedy; {len(differ)} part "
            f"at a near-tie (first at token {min(r['first_difference'] for r in differ)}), every served token "
            f"within {gap / step:.2f} bf16 steps ({gap:.3f} logits) of the target's greedy choice "
            f"(<= {tolerance:g} steps)"
        ),
        len(differ),
    )


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the target folder or name the server serves")
    p.add_argument("--draft", required=True, help="the exported draft folder the EAGLE-3 server loads (of --engine)")
    p.add_argument("--trained", help="the draft as trained (training output or its draft/): what the offline side runs")
    p.add_argument(
        "--engine",
        default="vllm",
        choices=list(ENGINES),
        help="the servers' engine; sglang: chain drafting only (topk 1, num-steps k, num-draft-tokens k+1)",
    )
    p.add_argument("--prompts", required=True)
    p.add_argument("--num-prompts", type=number(int, 1), default=10)
    p.add_argument(
        "--k",
        type=number(int, 1),
        default=3,
        help="the server's num_speculative_tokens (SGLang: speculative_num_steps)",
    )
    p.add_argument("--max-tokens", type=number(int, 1), default=64)
    p.add_argument("--tolerance", type=number(float, 0.0, 1.0), default=TOLERANCE)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--launch", action="store_true", help="start both servers with benchmark/<engine>/serve.sh")
    g.add_argument("--base-url", help="the EAGLE-3 server (then --baseline-url is the plain one)")
    p.add_argument("--baseline-url")
    p.add_argument("--max-model-len", type=number(int, 16), default=2048, help="with --launch")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help=f"the servers' dtype, which the offline side runs in too; auto, as benchmark/vllm/serve.sh: {AUTO}",
    )
    p.add_argument("--out", default="verify.json")
    args = p.parse_args(argv)
    if args.base_url and not args.baseline_url:
        p.error("--base-url needs --baseline-url (the plain server to compare greedy outputs with)")
    return args


@cli
def main(argv=None) -> int:
    from .default_model import resolve_target
    from .draft import find_draft_folder
    from .export import check

    args = parse_args(argv)
    prompts = read_prompts(args.prompts, args.num_prompts, max_turns=1)  # the user's files first, before any model
    if not prompts:
        raise UserError(f"{args.prompts}: no usable prompts")
    served, path = find_draft_folder(args.draft), resolve_target(args.target)
    if args.engine == "sglang" and (problems := check(served, str(path), "sglang")):
        raise UserError(f"{served} is not an SGLang draft folder for this target: {'; '.join(problems)}")
    tokenizer, target, draft, args.dtype, _ = load_models(args.target, args.trained or args.draft, args.dtype, "cpu")
    with ExitStack() as stack:
        if args.launch:
            log_dir = Path(args.out).resolve().parent / "verify-serve"
            for name, draft_folder in (("baseline_url", None), ("base_url", served)):
                server = launched(
                    args.engine,
                    path,
                    draft=draft_folder,
                    k=args.k,
                    dtype=args.dtype,
                    served_name="verify",
                    max_model_len=args.max_model_len,
                    log_dir=log_dir,
                )
                setattr(args, name, stack.enter_context(server))
        base, eagle = ENGINES[args.engine](args.baseline_url), ENGINES[args.engine](args.base_url)
        if problem := eagle.drafting_problem(args.k):
            raise UserError(problem)
        verifier = Verifier(
            args,
            tokenizer,
            target,
            draft,
            json.loads((served / "config.json").read_text()),
            base=base,
            eagle=eagle,
        )
        verifier.run(prompts)
    Path(args.out).write_text(
        json.dumps({**verifier.report, "failures": verifier.failures, "args": vars(args)}, indent=1)
    )
    for line in verifier.failures:
        print(f"verify failed: {line}")
    print(
        f"{'all checks passed' if not verifier.failures else f'{len(verifier.failures)} check(s) failed'}; "
        f"report: {args.out}"
    )
    return 1 if verifier.failures else 0


if __name__ == "__main__":
    sys.exit(main())
