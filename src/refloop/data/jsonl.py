"""Append-only JSONL that survives being killed: each batch is flushed and fsynced, and a
torn last line (a write cut short) is dropped when the file is reopened."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from refloop.errors import DataError


def read_records(path: Path) -> list[dict]:
    """Complete records of a JSONL file; a torn trailing line (a write cut short by a kill) is
    ignored. A damaged complete line is a DataError naming the line: resuming past it would
    silently lose or redo records."""
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise DataError(path, f"line {number}", f"damaged record ({exc}); delete the file or rerun with --overwrite") from None
            if not isinstance(record, dict):
                raise DataError(path, f"line {number}", f"expected a JSON object, got {type(record).__name__}")
            out.append(record)
    return out


class JsonlWriter:
    """Appends records; `done` holds the keys already written, so a resumed job skips them."""

    def __init__(self, path: str | Path, key: str = "id", resume: bool = True) -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = read_records(self.path) if resume else []
        if resume:
            self._truncate_torn_tail()
        self.done = {r[key] for r in records if key in r}
        self._handle = open(self.path, "a" if resume else "w")

    def _truncate_torn_tail(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        cut = raw.rfind(b"\n") + 1
        if cut != len(raw):
            self.path.write_bytes(raw[:cut])

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self._handle.write(json.dumps(r) + "\n")
            if self.key in r:
                self.done.add(r[self.key])
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
