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


def write_records(path: Path, records: Iterable[dict]) -> None:
    """Replace a JSONL file whole: written beside it, fsynced, then renamed over it (a kill leaves
    the old file or the new one, never a mix)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


class ShardedJsonl:
    """One resumable JSONL output written by every process of a run (`accelerate launch`).

    With one process it is a plain `JsonlWriter` on `path`. With P processes each appends to its
    own shard, `<path stem>.shards/<rank>.jsonl`; every process counts as done the keys of the
    output and of all shards (so all of them agree on what is left, and a rerun resumes every
    shard), and after the work the main process merges the shards into `path` in the items'
    order: the merged file equals a one-process run's."""

    def __init__(self, path: str | Path, key: str, rank: int = 0, world: int = 1) -> None:
        self.path, self.key, self.rank, self.world = Path(path), key, rank, world
        self.shards = self.path.with_name(self.path.stem + ".shards")
        if world == 1:
            self.writer = JsonlWriter(self.path, key=key)
            self.done = self.writer.done
            return
        self.shards.mkdir(parents=True, exist_ok=True)
        own = self.shards / f"{rank:03d}.jsonl"
        self.writer = JsonlWriter(own, key=key)
        others = [p for p in sorted(self.shards.glob("*.jsonl")) if p != own]
        self.done = self.writer.done | {r[key] for p in [self.path, *others] for r in read_records(p) if key in r}
        self.writer.done = self.done  # keys written by this process join the shared set

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        self.writer.write_many(records)

    def close(self) -> None:
        self.writer.close()

    def merge(self, order: Iterable[object]) -> None:
        """Main process, after every process finished: rows of the output and the shards, one per
        key, in `order` (keys not in `order` follow in file order), written whole to `path`."""
        if self.world == 1 and not self.shards.exists():
            return
        rows: dict[object, dict] = {}
        for source in [self.path, *sorted(self.shards.glob("*.jsonl"))]:
            for r in read_records(source):
                rows.setdefault(r.get(self.key), r)
        write_records(self.path, [rows.pop(k) for k in order if k in rows] + list(rows.values()))
        for shard in self.shards.glob("*.jsonl"):
            shard.unlink()
        self.shards.rmdir()

    def __enter__(self) -> ShardedJsonl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
