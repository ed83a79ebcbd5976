"""How commands report a user's mistake: one line on stderr, exit status 2, no traceback.

A missing file, an invalid record or a bad flag value is the user's to fix, and a
traceback buries the one line that says what to fix.  Commands wrap their `main` in
`@cli`, parse flags with `Parser` and raise `UserError` naming the file (and record).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

FILE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class UserError(ValueError):
    """A mistake in what the user gave (a file, a record, a flag value)."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (a UserError) instead of the usage and the error."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def number(kind: type, low: float, high: float | None = None):
    """An argparse type: a `kind` value in [low, high]."""

    def convert(text: str):
        value = kind(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{text}: must be " + (f"at least {low}" if high is None else f"from {low} to {high}")
            )
        return value

    convert.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return convert


def read_json_object(path) -> dict:
    """A file holding one JSON object (a config); a missing file raises FileNotFoundError,
    anything else than a JSON object a UserError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, not {type(value).__name__}")
    return value


def cli(main):
    """Run a command's main(argv); a user's mistake ends it with `error: ...` and exit status 2."""

    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except UserError as e:
            message = str(e)
        except FILE_ERRORS as e:
            message = f"{e.filename}: {e.strerror}" if e.filename else str(e)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    return run
