"""Append-only JSONL that survives being killed: each batch is flushed and fsynced, and a
torn last line (a write cut short) is dropped when the file is reopened."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from refloop.errors import DataError
from refloop.runs import replaced_whole, write_text_whole  # noqa: F401  (replaced_whole importable from here, as before)


def complete_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(byte offset, raw line) of each complete line of a JSONL file, in file order; a torn last
    line (a write cut short by a kill) is left out."""
    with open(path, "rb") as f:
        offset = 0
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            yield offset, raw
            offset += len(raw)


def parse_line(path: Path, number: int, raw: bytes) -> dict:
    """One complete line as a record. A damaged line is a DataError naming it: resuming past it
    would silently lose or redo records."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError(path, f"line {number}", f"damaged record ({exc}); delete the file or rerun with --overwrite") from None
    if not isinstance(record, dict):
        raise DataError(path, f"line {number}", f"expected a JSON object, got {type(record).__name__}")
    return record


def iter_records(path: Path) -> Iterator[dict]:
    """Complete records of a JSONL file, streamed (blank lines skipped, a torn last line ignored)."""
    if not Path(path).exists():
        return
    for number, (_, raw) in enumerate(complete_lines(path), start=1):
        if raw.strip():
            yield parse_line(path, number, raw)


def read_records(path: Path) -> list[dict]:
    """Complete records of a JSONL file (see `iter_records`)."""
    return list(iter_records(path))


def write_records(path: Path, records: Iterable[dict]) -> None:
    """Replace a JSONL file whole (`write_text_whole`)."""
    write_text_whole(path, (json.dumps(r) + "\n" for r in records))


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
