"""Caches shared by every rank and node: converted models, tokenised data, vocab maps.

Entries are built in a private temporary folder and published with one rename, so a
reader never sees half an entry, a killed build leaves only litter, and two builders
(nodes sharing a file system) race harmlessly: the first rename wins.  A single JSON
file (a manifest, a checkpoint's state) is written the same way by `write_json_atomic`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """`EAGLE3_CACHE`, else ~/.cache/eagle3-train."""
    return Path(os.environ.get("EAGLE3_CACHE", Path.home() / ".cache" / "eagle3-train"))


def _replace(tmp: Path, final: Path) -> None:
    """Move tmp to final; another process publishing the same entry first is no error."""
    try:
        os.replace(tmp, final)  # a file may replace a file; a folder only an absent one
    except FileExistsError:
        pass
    except OSError:
        if not final.exists():
            raise


@contextmanager
def publish(final: Path, overwrite: bool = False):
    """Yield a temporary path to build into; move it to `final` unless `final` appeared
    (a cache entry, built alike by whoever came first) or `overwrite` (a command's output file)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        yield tmp
        if overwrite or not final.exists():
            _replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, obj) -> None:
    """`obj` as JSON at `path`, whole or not at all: written to a side file, synced, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
