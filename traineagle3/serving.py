"""Talking to serving engines: one module for every command that starts, asks or times a server.

- `launched`: a vLLM or SGLang server started by benchmark/<engine>/serve.sh (the settings
  users serve with) on a free loopback port, stopped on exit;
- `VllmServer`, `SglangServer`: their clients (tokenize, greedy generation, speculative
  counters, served name and max_model_len), as verify and advise ask them;
- `EngineClock`, `EagleClock`: a running server's decoding and drafting rounds timed from
  outside, for advise and bench_precision;
- `sglang_chain`, `sglang_flags`: the one rule for SGLang's drafting flags (a chain of k
  drafts is k steps, top-k 1, k+1 draft tokens), in SGLang's own names or serve.sh's.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from .cli import UserError
from .ports import free_port

ROOT = Path(__file__).resolve().parents[1]
METRIC = re.compile(
    r"^vllm:(spec_decode_num_drafts|spec_decode_num_accepted_tokens_per_pos|request_success)_total"
    r"\{([^}]*)\}\s+([0-9.e+]+)$",
    re.M,
)


def sglang_chain(k: int) -> tuple[int, int, int]:
    """(num_steps, eagle_topk, num_draft_tokens) of SGLang chain drafting of k tokens."""
    return k, 1, k + 1


def sglang_flags(steps: int, topk: int, tokens: int, serve_sh: bool = False) -> str:
    """SGLang's drafting flags (`--speculative-num-steps ...`), or serve.sh's names for them (`--num-steps ...`)."""
    prefix = "--" if serve_sh else "--speculative-"
    return f"{prefix}num-steps {steps} {prefix}eagle-topk {topk} {prefix}num-draft-tokens {tokens}"


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
                f"acceptance of chain drafting only; serve with {sglang_flags(*sglang_chain(k), serve_sh=True)}"
            )
        if (steps, tokens) != sglang_chain(k)[::2]:
            return f"{self.root} drafts {steps} steps, {tokens} draft tokens; --k {k} needs {k} and {k + 1}"
        return None


ENGINES = {"vllm": VllmServer, "sglang": SglangServer}


def eagle_flags(engine: str, draft: Path, k: int) -> list[str]:
    """serve.sh's flags for an EAGLE-3 chain of k drafts."""
    chain = f"--num-speculative-tokens {k}" if engine == "vllm" else sglang_flags(*sglang_chain(k), serve_sh=True)
    return ["--eagle", "--draft", str(draft), *chain.split()]


@contextmanager
def launched(
    engine: str,
    target: str,
    *,
    dtype: str,
    draft: Path | None = None,
    k: int = 3,
    served_name: str = "target",
    max_model_len: int | None = None,
    log_dir: Path | None = None,
    env: dict | None = None,
    quiet: bool = False,
):
    """The URL of a server started by benchmark/<engine>/serve.sh on a free port (with the EAGLE-3
    `draft` drafting chains of k, if given), stopped on exit.  serve.sh returns once /health answers;
    its lines go to stdout unless `quiet`."""
    port = free_port()
    eagle = eagle_flags(engine, draft, k) if draft else []
    env = dict(env or os.environ, PYTHON=sys.executable) | ({"LOG_DIR": str(log_dir)} if log_dir else {})
    serve = ["bash", str(ROOT / "benchmark" / engine / "serve.sh")]
    flags = ["--target", str(target), "--served-name", served_name, "--port", str(port), "--dtype", dtype]
    flags += ["--max-model-len", str(max_model_len)] if max_model_len else []
    out = subprocess.DEVNULL if quiet else None
    try:
        subprocess.run([*serve, *eagle, *flags], env=env, check=True, stdout=out)
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([*serve, *eagle[:1], "--stop"], env=env, check=False, stdout=out)


class EngineClock:
    """A running plain server (vLLM or SGLang, OpenAI completions API) timed from outside:
    greedy, `ignore_eos`, `batch` requests at once.

    A decoding round is timed on the user's own prompts: (time of `tokens` tokens - time of 1)
    over the rounds between them (on a plain server, one a token), both after the prompts are
    in the engine's prefix cache, so both include the same (cached) prefill.  The extra cost of
    a pass of n new tokens over a pass of 1 is timed after a prefix of random token ids (away
    from the special ids at either end of the vocabulary) that the engine has cached: prefix +
    n fresh tokens vs prefix + 1, one token generated; what prefix caching does not cover is the
    same in both and cancels.
    """

    def __init__(self, url: str, vocab: int, context: int, prompts: list[list[int]], seed: int = 0):
        self.server = VllmServer(url)  # the served name; /metrics for EagleClock
        self.rng, self.vocab, self.context = random.Random(seed), vocab, context
        self.prompts = itertools.cycle(prompts)

    def fresh(self, n: int) -> list[int]:
        return [self.rng.randrange(1000, self.vocab - 1000) for _ in range(n)]

    def _complete(self, prompt: list[int], max_tokens: int) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        got = self.server.post("/v1/completions", {"model": self.server.model, **body})["usage"]["completion_tokens"]
        if got != max_tokens:
            raise UserError(f"{self.server.root} generated {got} tokens, not {max_tokens} (is ignore_eos honoured?)")

    def together(self, prompts: list[list[int]], max_tokens: int) -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            list(pool.map(lambda p: self._complete(p, max_tokens), prompts))
        return time.perf_counter() - start

    def counted(self):
        """What rounds() needs from before the timed request (a plain server: nothing)."""

    def rounds(self, before, batch: int, tokens: int) -> float:
        """Decoding rounds of each sequence since `before`: after the prefill's token, one a token."""
        return tokens - 1

    def round(self, batch: int, tokens: int = 33) -> float:
        """Seconds of one decoding round of the next `batch` of the user's prompts, decoded together."""
        prompts = [next(self.prompts) for _ in range(batch)]
        self.together(prompts, 1)  # into the prefix cache
        one = self.together(prompts, 1)
        before = self.counted()
        many = self.together(prompts, tokens)
        return (many - one) / self.rounds(before, batch, tokens)

    def step(self, batch: int, repeats: int, tokens: int = 33) -> float:
        return statistics.median(self.round(batch, tokens) for _ in range(repeats))

    def extra(self, batch: int, sizes: list[int], repeats: int) -> dict[int, float]:
        """n -> seconds a pass of n new tokens takes over a pass of 1."""
        prefixes = [self.fresh(self.context) for _ in range(batch)]
        self.together(prefixes, 1)  # now cached
        times = {n: [] for n in sorted({1, *sizes})}
        for _ in range(repeats):
            for n, got in times.items():  # every size in turn: a burst of load falls on all, not on one
                got.append(self.together([q + self.fresh(n) for q in prefixes], 1))
        return {n: max(statistics.median(t - one for t, one in zip(times[n], times[1])), 0.0) for n in sizes}


class EagleClock(EngineClock):
    """A running vLLM server with the draft (at any k): its drafting rounds timed like decoding
    steps, counted from its /metrics (VllmServer.counters)."""

    def __init__(self, url: str, vocab: int, context: int, prompts: list[list[int]], seed: int = 1):
        super().__init__(url, vocab, context, prompts, seed)
        positions = self.server.counters()[2]
        if not positions:
            raise UserError(
                f"{url} reports no speculative decoding in /metrics: --eagle-url takes a vLLM server with the draft"
            )
        self.k = max(positions) + 1

    def counted(self):
        return self.server.counters()[:2]  # requests finished, drafting rounds

    def rounds(self, before, batch: int, tokens: int) -> float:
        done, drafts = before
        return (self.server.spec_counts(done + batch)[0] - drafts) / batch
