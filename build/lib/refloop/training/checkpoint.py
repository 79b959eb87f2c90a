"""Atomic, resumable checkpoints: write `checkpoint.tmp` completely, then swap it in, so a kill
at any moment leaves one whole checkpoint (the new one or the previous one)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from refloop.data.jsonl import read_records, write_records, write_text_whole

STATE = "state.json"


def write_json_durably(path: Path, data: dict) -> None:
    write_text_whole(path, json.dumps(data, indent=2))


def save_checkpoint(work: Path, state: dict, write_files: Callable[[Path], None]) -> None:
    """`write_files(dir)` writes the tensors; `state` (JSON) is written last, marking completeness."""
    tmp = work / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_files(tmp)
    write_json_durably(tmp / STATE, state)
    final, old = work / "checkpoint", work / "checkpoint.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def latest_checkpoint(work: Path) -> tuple[Path, dict] | None:
    """The checkpoint directory and its state, finishing a swap that a kill interrupted."""
    final, old = work / "checkpoint", work / "checkpoint.old"
    if not final.exists() and old.exists():
        os.replace(old, final)
    elif old.exists():
        shutil.rmtree(old)
    if not (final / STATE).exists():
        return None
    return final, json.loads((final / STATE).read_text())


def truncate_log(path: Path, step: int) -> None:
    """Keep the log rows up to `step`, so a resumed run's log equals an uninterrupted run's."""
    write_records(path, [r for r in read_records(path) if r["step"] <= step])
