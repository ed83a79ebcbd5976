"""JSON-lines files that survive a kill: whole-line appends, torn tails cut on reopen."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from traineagle3.cli import UserError


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line index, record) of every line; a line that is not a JSON object is an error naming it."""
    with Path(path).open(encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: record {index} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}: record {index} is not a JSON object")
            yield index, rec


def repair_tail(path: Path) -> int:
    """Cut a last line left unfinished by a kill; return the bytes cut.

    A tail that is a whole record missing only its newline gets the newline instead.
    """
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    keep = data.rfind(b"\n") + 1
    tail = data[keep:]
    if not tail:
        return 0
    try:
        json.loads(tail)
        with path.open("ab") as f:
            f.write(b"\n")
        return 0
    except json.JSONDecodeError:
        with path.open("r+b") as f:
            f.truncate(keep)
        return len(tail)


class Appender:
    """Append one record per `os.write`, so a killed writer leaves whole lines or one torn tail."""

    def __init__(self, path: Path, truncate: bool = False):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self.fd = os.open(path, flags, 0o644)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data) :]

    def close(self) -> None:
        os.close(self.fd)
