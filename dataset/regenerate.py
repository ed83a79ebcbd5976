"""Regenerate every assistant turn of every conversation with the target model itself.

    python -m dataset.regenerate --base-url http://127.0.0.1:8000/v1 --model NAME \\
        --in data/raw.jsonl --out data/regen.jsonl --concurrency 96 --temperature 0 --max-tokens 1024

An EAGLE-3 draft learns to predict the target, so it must be trained on the target's
answers, not on whoever wrote the dataset.  For each conversation the user turns are
kept and answer i is generated from the system prompt, the user turns and the target's
own answers 1..i-1 -- exactly the text training will render -- through the server's
`/v1/chat/completions`, so the server applies the target's chat template.

- Any OpenAI-compatible server (vLLM, SGLang); repeat `--base-url` to spread the load
  over data-parallel servers.  A conversation stays on one server (its prefix is cached
  there) unless a request fails, and then moves to the least busy one.
- Timeouts, connection errors, 429 and 5xx are retried with exponential backoff; a
  conversation that still fails goes to the failures file (`<out>.failures.jsonl`) with
  its error, is retried on the next run, and makes the exit status 1.  A request the
  server rejects (other 4xx, e.g. a prompt longer than its context) is not retried: on
  the first turn the conversation goes to the failures file as "rejected" (exit status
  0), on a later turn the conversation ends there and the record says where and why.
- Resumable: the output is append-only, one whole line per conversation, keyed by
  `id`.  A rerun after a kill at any moment skips the ids already written (a torn last
  line is cut first), so nothing is lost or duplicated.
- `--max-turns N` regenerates only the first N user turns (training truncates long
  samples anyway); `--drop-truncated` ends a conversation before the first answer cut by `--max-tokens`
  (finish_reason "length"); by default such answers are kept and marked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from traineagle3.cli import Parser, UserError, cli, number
from traineagle3.records import ReadReport, iter_conversations, record_id

from .jsonl import Appender, read_records, repair_tail


@dataclass
class RegenConfig:
    base_urls: list[str]
    model: str
    temperature: float = 0.0
    max_tokens: int = 1024
    concurrency: int = 96
    timeout: float = 600.0
    max_retries: int = 5
    backoff: float = 1.0  # seconds before the first retry; doubles each time, capped at 60
    drop_truncated: bool = False
    max_turns: int | None = None  # regenerate only the first N user turns; the rest is dropped
    api_key: str = field(default_factory=lambda: os.environ.get("OPENAI_API_KEY", "EMPTY"), repr=False)


class Rejected(Exception):
    """The server refused the request itself (4xx other than 429): retrying will not help."""


class Servers:
    """Base URLs and how many requests each is serving now."""

    def __init__(self, urls: list[str]):
        self.busy = {u.rstrip("/"): 0 for u in urls}

    def pick(self, avoid: str | None = None) -> str:
        choices = [u for u in self.busy if u != avoid] or list(self.busy)
        return min(choices, key=lambda u: (self.busy[u], random.random()))

    async def call(self, url: str, request):
        self.busy[url] += 1
        try:
            return await request
        finally:
            self.busy[url] -= 1


async def complete(client: httpx.AsyncClient, url: str, messages: list[dict], cfg: RegenConfig) -> dict:
    """One chat completion: the answer, its finish reason and token counts."""
    r = await client.post(
        f"{url}/chat/completions",
        json={"model": cfg.model, "messages": messages, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens},
    )
    if r.status_code == 429 or r.status_code >= 500:
        r.raise_for_status()
    if r.status_code >= 400:
        raise Rejected(f"HTTP {r.status_code} from {url}: {r.text[:300]}")
    body = r.json()
    choice, usage = body["choices"][0], body.get("usage") or {}
    return {
        "content": choice["message"]["content"] or "",
        "finish_reason": choice.get("finish_reason"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
    }


async def regenerate_one(client, servers: Servers, conv: list[dict], cfg: RegenConfig) -> dict:
    """The conversation with every answer the target's; raises after the retries are spent."""
    url = servers.pick()
    history = [m for m in conv[:1] if m["role"] == "system"]
    turns, cut = [], None
    for user in [m for m in conv if m["role"] == "user"][: cfg.max_turns]:
        messages = history + [user]
        for attempt in range(cfg.max_retries + 1):
            try:
                answer = await servers.call(url, complete(client, url, messages, cfg))
                break
            except Rejected:
                if not turns:
                    raise
                answer = None
                break
            except (httpx.TransportError, httpx.HTTPStatusError) as e:
                if attempt == cfg.max_retries:
                    raise RuntimeError(f"{type(e).__name__} from {url} after {attempt + 1} attempts: {e}") from None
                await asyncio.sleep(min(cfg.backoff * 2**attempt, 60.0) * (0.5 + random.random()))
                url = servers.pick(avoid=url)
        if answer is None:
            cut = f"turn {len(turns)} rejected by the server (history too long?)"
            break
        if answer["finish_reason"] == "length" and cfg.drop_truncated:
            cut = f"answer {len(turns)} hit max_tokens"
            break
        if not answer["content"].strip():
            cut = f"answer {len(turns)} is empty"
            break
        history = messages + [{"role": "assistant", "content": answer.pop("content")}]
        turns.append(answer)
    if not turns:
        raise Rejected(cut)
    record = {"conversations": history, "model": cfg.model, "turns": turns}
    if cut:
        record["cut"] = cut
    return record


def read_input(path: Path, limit: int | None) -> tuple[list[tuple[str, list[dict]]], ReadReport]:
    """(id, conversation) of the input; ids must be unique (dataset.download makes them so)."""
    report, items, first = ReadReport(str(path)), [], {}
    for index, rid, conv in iter_conversations(str(path), report, limit=limit):
        rid = record_id(index, rid)
        if rid in first:
            raise UserError(f"{path}: record {index} repeats id {rid!r} of record {first[rid]}")
        first[rid] = index
        items.append((rid, conv))
    if not items:
        raise UserError(f"{report.summary()}: no usable conversations")
    return items, report


def done_ids(out: Path) -> set[str]:
    if not out.exists():
        return set()
    cut = repair_tail(out)
    if cut:
        print(f"{out}: cut an unfinished last line ({cut} bytes) left by an interrupted run")
    return {str(rec["id"]) for _, rec in read_records(out)}


def tally(stats: dict, rec: dict) -> None:
    """A written conversation in the run's counts."""
    stats["written"] += 1
    stats["cut"] += "cut" in rec
    stats["truncated_answers"] += sum(t["finish_reason"] == "length" for t in rec["turns"])
    stats["completion_tokens"] += sum(t["completion_tokens"] or 0 for t in rec["turns"])


async def run(
    cfg: RegenConfig,
    src: Path,
    out: Path,
    limit: int | None = None,
    progress: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict:
    items, report = read_input(src, limit)
    done = done_ids(out)
    pending = [(rid, conv) for rid, conv in items if rid not in done]
    failures_path = out.with_name(out.name.removesuffix(".jsonl") + ".failures.jsonl")
    print(f"{report.summary()}; {len(done)} already in {out}; regenerating {len(pending)}")
    writer, failures = Appender(out), Appender(failures_path, truncate=True)
    servers, queue = Servers(cfg.base_urls), asyncio.Queue()
    for item in pending:
        queue.put_nowait(item)
    stats = {"written": 0, "failed": 0, "rejected": 0, "cut": 0, "truncated_answers": 0, "completion_tokens": 0}
    bar = tqdm(total=len(pending), unit="conv", disable=not progress, smoothing=0.1)
    start = time.perf_counter()

    async def worker(client):
        while not queue.empty():
            rid, conv = queue.get_nowait()
            try:
                rec = await regenerate_one(client, servers, conv, cfg)
            except (Rejected, RuntimeError, ValueError, KeyError) as e:
                failures.write({"id": rid, "error": f"{type(e).__name__}: {e}"})
                stats["rejected" if isinstance(e, Rejected) else "failed"] += 1
            else:
                writer.write({"id": rid} | rec)
                tally(stats, rec)
            bar.update()
            bar.set_postfix_str(
                f"{stats['completion_tokens'] / (time.perf_counter() - start):.0f} tok/s, "
                f"{stats['failed'] + stats['rejected']} failed"
            )

    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    headers = {"Authorization": f"Bearer {cfg.api_key}"}
    async with httpx.AsyncClient(timeout=cfg.timeout, limits=limits, headers=headers, transport=transport) as client:
        await asyncio.gather(*(worker(client) for _ in range(min(cfg.concurrency, len(pending)) or 1)))
    bar.close()
    writer.close()
    failures.close()
    seconds = time.perf_counter() - start
    summary = stats | {"input": len(items), "already_done": len(done), "seconds": round(seconds, 1)}
    summary |= {
        "output_tokens_per_s": round(stats["completion_tokens"] / max(seconds, 1e-9), 1),
        "out": str(out),
        "failures": str(failures_path),
    }
    out.with_name(out.name.removesuffix(".jsonl") + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"wrote {stats['written']} conversations to {out} ({summary['output_tokens_per_s']} output tok/s); "
        f"{stats['failed']} failed (server errors: rerun to retry), {stats['rejected']} rejected by the server"
        + (f"; see {failures_path}" if stats["failed"] or stats["rejected"] else "")
    )
    return summary


@cli
def main(argv=None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--base-url",
        action="append",
        required=True,
        dest="base_urls",
        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; repeat for several servers",
    )
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument(
        "--in",
        dest="src",
        required=True,
        type=Path,
        help="conversations (dataset.download output or any chat JSON/JSONL)",
    )
    p.add_argument("--out", required=True, type=Path, help="regenerated JSONL, appended to and resumed")
    p.add_argument("--concurrency", type=number(int, 1), default=96, help="conversations in flight over all servers")
    p.add_argument("--temperature", type=number(float, 0), default=0.0)
    p.add_argument("--max-tokens", type=number(int, 1), default=1024, help="per answer")
    p.add_argument(
        "--drop-truncated", action="store_true", help="end a conversation before an answer cut by --max-tokens"
    )
    p.add_argument(
        "--max-turns",
        type=number(int, 1),
        help="regenerate only the first N user turns of a conversation (the rest is dropped)",
    )
    p.add_argument("--max-retries", type=number(int, 0), default=5)
    p.add_argument("--timeout", type=number(float, 1), default=600.0, help="seconds per request")
    p.add_argument("--limit", type=number(int, 1), help="only the first N conversations of the input")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = RegenConfig(
        a.base_urls,
        a.model,
        a.temperature,
        a.max_tokens,
        a.concurrency,
        a.timeout,
        a.max_retries,
        drop_truncated=a.drop_truncated,
        max_turns=a.max_turns,
    )
    summary = asyncio.run(run(cfg, a.src, a.out, a.limit, progress=not a.no_progress))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
