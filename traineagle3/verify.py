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
              choice up to a near-tie (NEAR_TIE logits): in bf16, verifying k+1 tokens in one
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
import os
import re
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import torch

from .cli import Parser, UserError, cli, number
from .evaluate import speculative, summarize
from .precision import AUTO
from .precision import choose as choose_precision
from .records import read_prompts, writing_system

ROOT = Path(__file__).resolve().parents[1]
# Served vs offline acceptance at one position, on the same outputs: they differ only by
# floating-point order (vLLM's kernels vs HF's) and the bf16 export vs the trained weights.
# A correct draft's largest gap measured here was 0.015 (docs/RESULTS.md): twice that.
TOLERANCE = 0.03
# How far (in logits) a served token may trail the target's top one and still count as its
# greedy choice: about two bf16 steps at logit sizes of 16-32; float32 kernels differ in the
# last bits only.  The offline target's own logits carry this rounding too.
NEAR_TIE = {"bfloat16": 0.25, "float16": 0.05, "float32": 0.01}
METRIC = re.compile(
    r"^vllm:(spec_decode_num_drafts|spec_decode_num_accepted_tokens_per_pos|request_success)_total"
    r"\{([^}]*)\}\s+([0-9.e+]+)$",
    re.M,
)


class Server:
    """One served model: its tokeniser, greedy decoding and, with a draft, its acceptance per prompt.

    `/v1/models` gives the served name and max_model_len on both engines."""

    def __init__(self, url: str):
        self.root = url.rstrip("/").removesuffix("/v1")
        self.http = httpx.Client(timeout=900)
        card = self.get("/v1/models")["data"][0]
        self.model, self.max_model_len = card["id"], card.get("max_model_len")

    def get(self, path: str) -> dict:
        return self.http.get(f"{self.root}{path}").raise_for_status().json()

    def post(self, path: str, body: dict) -> dict:
        return self.http.post(f"{self.root}{path}", json=body).raise_for_status().json()

    def drafting_problem(self, k: int) -> str | None:
        """Why the server's drafting is not the chain of k drafts verify compares with; None if it is."""
        return None


class VllmServer(Server):
    """An OpenAI-compatible vLLM server: greedy chat, speculative counters from /metrics."""

    def tokenize(self, messages: list[dict]) -> list[int]:
        body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        return self.post("/tokenize", body)["tokens"]

    def greedy(self, messages: list[dict], prompt_ids: list[int], max_tokens: int) -> list[int]:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
        }
        return self.post("/v1/chat/completions", body)["choices"][0]["token_ids"]

    def speculative(self, messages, prompt_ids, max_tokens: int, k: int) -> tuple[list[int], float, list[float]]:
        """(greedy output, drafts, accepted per draft position) of one request: /metrics before and after."""
        finished = self.counters()[0]
        before = self.spec_counts(finished)
        out = self.greedy(messages, prompt_ids, max_tokens)
        after = self.spec_counts(finished + 1)
        return out, after[0] - before[0], [after[1].get(i, 0) - before[1].get(i, 0) for i in range(k)]

    def counters(self) -> tuple[float, float, dict[int, float]]:
        """(requests finished, drafts, accepted tokens per draft position) so far."""
        done = drafts = 0.0
        per_pos: dict[int, float] = {}
        for kind, labels, value in METRIC.findall(self.http.get(f"{self.root}/metrics").text):
            if kind == "request_success":
                done += float(value)
            elif kind == "spec_decode_num_drafts":
                drafts += float(value)
            else:
                pos = int(re.search(r'position="(\d+)"', labels).group(1))
                per_pos[pos] = per_pos.get(pos, 0.0) + float(value)
        return done, drafts, per_pos

    def spec_counts(self, finished: float, timeout: float = 30.0) -> tuple[float, dict[int, float]]:
        """(drafts, accepted per position) once `finished` requests are in the metrics: the
        server publishes them a moment after it answers."""
        deadline = time.monotonic() + timeout
        while (now := self.counters())[0] < finished and time.monotonic() < deadline:
            time.sleep(0.1)
        return now[1], now[2]


class SglangServer(Server):
    """An SGLang server: /tokenize renders `messages` as its chat endpoint does (generation prompt
    included); /generate decodes the prompt's ids; a speculative request's meta_info holds
    spec_verify_ct (rounds) and spec_correct_drafts_histogram (rounds that accepted j drafts)."""

    def tokenize(self, messages: list[dict]) -> list[int]:
        return self.post("/tokenize", {"model": self.model, "messages": messages})["tokens"]

    def generate(self, prompt_ids: list[int], max_tokens: int) -> dict:
        params = {"temperature": 0, "max_new_tokens": max_tokens}
        return self.post("/generate", {"input_ids": prompt_ids, "sampling_params": params})

    def greedy(self, messages, prompt_ids: list[int], max_tokens: int) -> list[int]:
        return self.generate(prompt_ids, max_tokens)["output_ids"]

    def speculative(self, messages, prompt_ids, max_tokens: int, k: int) -> tuple[list[int], float, list[float]]:
        """In a chain, draft position i is accepted in the rounds that accepted more than i drafts."""
        r = self.generate(prompt_ids, max_tokens)
        hist = r["meta_info"].get("spec_correct_drafts_histogram") or []
        return r["output_ids"], r["meta_info"].get("spec_verify_ct", 0), [sum(hist[i + 1 :]) for i in range(k)]

    def drafting_problem(self, k: int) -> str | None:
        info = self.get("/server_info")
        algo, topk, steps, tokens = (
            info.get(f"speculative_{name}") for name in ("algorithm", "eagle_topk", "num_steps", "num_draft_tokens")
        )
        if str(algo).upper() not in ("EAGLE", "EAGLE3"):
            return f"{self.root} does not draft with EAGLE-3 (speculative_algorithm {algo})"
        if (topk or 1) > 1:
            return (
                f"{self.root} drafts a tree (speculative_eagle_topk {topk}): verify compares per-position "
                f"acceptance of chain drafting only; serve with --eagle-topk 1 --num-steps {k} "
                f"--num-draft-tokens {k + 1}"
            )
        if (steps, tokens) != (k, k + 1):
            return f"{self.root} drafts {steps} steps, {tokens} draft tokens; --k {k} needs {k} and {k + 1}"
        return None


ENGINES = {"vllm": VllmServer, "sglang": SglangServer}


def eagle_flags(engine: str, draft: Path, k: int) -> list[str]:
    """serve.sh's flags for an EAGLE-3 chain of k drafts."""
    chain = {
        "vllm": f"--num-speculative-tokens {k}",
        "sglang": f"--num-steps {k} --eagle-topk 1 --num-draft-tokens {k + 1}",
    }
    return ["--eagle", "--draft", str(draft), *chain[engine].split()]


@contextmanager
def launched(engine: str, target: str, draft: Path | None, k: int, max_model_len: int, log_dir: Path, dtype: str):
    """A server started by benchmark/<engine>/serve.sh on a free port, stopped on exit."""
    from .net import free_port

    port = free_port()
    eagle = eagle_flags(engine, draft, k) if draft else []
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(log_dir))
    serve = ["bash", str(ROOT / "benchmark" / engine / "serve.sh")]
    try:
        subprocess.run(
            [
                *serve,
                *eagle,
                "--target",
                target,
                "--served-name",
                "verify",
                "--port",
                str(port),
                "--max-model-len",
                str(max_model_len),
                "--dtype",
                dtype,
            ],
            env=env,
            check=True,
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([*serve, *eagle[:1], "--stop"], env=env, check=False)


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
        from .evaluate import _eos_ids
        from .features import AuxHooks

        hooks = AuxHooks(self.target, self.draft.config.eagle_aux_hidden_state_layer_ids)
        eos = _eos_ids(self.target, self.tokenizer)
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


def greedy_gaps(target, prompt_ids: list[int], output: list[int]) -> list[float]:
    """Per output token, how far (in logits) it trails the target's top token after the same
    prefix: 0 where it is the greedy choice.  One target pass over prompt + output."""
    with torch.no_grad():
        logits = target(torch.tensor([prompt_ids + output])).logits[0, len(prompt_ids) - 1 : -1].float()
    chosen = logits.gather(-1, torch.tensor(output)[:, None])[:, 0]
    return (logits.max(-1).values - chosen).tolist()


def greedy_check(target, rows: list[dict], tolerance: float) -> tuple[str | None, str, int]:
    """(problem or None, the line when it passes, how many outputs differ at near-ties only).

    An output that differs from plain greedy passes when each of its tokens trails the
    target's top token by at most `tolerance` logits: two near-equal candidates swapped by
    rounding, after which the two answers go their own ways.
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
    worst = max(differ, key=lambda r: max(r["greedy_gaps"]))
    gap = max(worst["greedy_gaps"])
    at = worst["greedy_gaps"].index(gap)
    if gap > tolerance:
        return (
            f"{len(differ)} of {len(rows)} outputs differ from plain greedy; prompt {worst['id']}'s output token "
            f"{at} trails the target's greedy choice by {gap:.3f} logits (a near-tie is <= {tolerance})",
            "",
            0,
        )
    return (
        None,
        (
            f"{len(rows) - len(differ)} of {len(rows)} outputs identical to plain greedy; {len(differ)} part "
            f"at a near-tie (first at token {min(r['first_difference'] for r in differ)}), every served token "
            f"within {gap:.3f} logits of the target's greedy choice (<= {tolerance})"
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .default_model import resolve_target
    from .evaluate import draft_for
    from .export import check, find_draft_folder

    args = parse_args(argv)
    prompts = read_prompts(args.prompts, args.num_prompts, max_turns=1)  # the user's files first, before any model
    if not prompts:
        raise UserError(f"{args.prompts}: no usable prompts")
    served, trained = find_draft_folder(args.draft), find_draft_folder(args.trained or args.draft)
    path = resolve_target(args.target)
    if args.engine == "sglang" and (problems := check(served, str(path), "sglang")):
        raise UserError(f"{served} is not an SGLang draft folder for this target: {'; '.join(problems)}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    args.dtype = choose_precision("cpu", args.dtype)[0]
    target = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    draft = draft_for(trained, target, "cpu", getattr(torch, args.dtype))
    with ExitStack() as stack:
        if args.launch:
            settings = (args.k, args.max_model_len, Path(args.out).resolve().parent / "verify-serve", args.dtype)
            for name, draft_folder in (("baseline_url", None), ("base_url", served)):
                setattr(args, name, stack.enter_context(launched(args.engine, path, draft_folder, *settings)))
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
