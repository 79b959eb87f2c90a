"""Output directories of resumable runs: one writer at a time, and never a silent mix of runs.

Every command that writes a resumable output (evaluation samples, training checkpoints,
bootstrapped data) opens its directory through `run_directory`:
- an exclusive lock (`.refloop.lock`, flock) is held while the run writes; a second run into the
  same directory stops at once with a message instead of writing every record twice;
- a fingerprint (`run.json`: the model, the data and every option that changes results) is
  stored with the outputs; a rerun with another fingerprint refuses to reuse them (or, with
  `overwrite`, clears the directory first), so a resumed run is never reported under the wrong
  model's name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from refloop.errors import RefloopError

LOCK = ".refloop.lock"
FINGERPRINT = "run.json"


def prepare_output_dir(out: Path) -> Path:
    """Create `out` (and parents); an existing file or an unwritable place is a RefloopError."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RefloopError(f"output {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RefloopError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RefloopError(f"output directory {out} is not writable")
    return out


def file_digest(path: Path, limit: int = 1 << 20) -> str:
    """A short content digest (the first `limit` bytes, plus the size): cheap, and different for a
    retrained checkpoint saved under the same path."""
    path = Path(path)
    if not path.is_file():
        return ""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:16]


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


@contextmanager
def run_directory(out: Path, fingerprint: dict | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Hold `out` exclusively while a run writes it; refuse outputs of a run with another
    fingerprint (JSON-comparable), or clear them first when `overwrite`."""
    out = prepare_output_dir(out)
    lock_path = out / LOCK
    handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RefloopError(f"{out} is being written by another refloop run ({holder}); wait for it or choose another output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        if fingerprint is not None:
            _check_fingerprint(out, json.loads(json.dumps(fingerprint)), overwrite)
        yield out
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _check_fingerprint(out: Path, fingerprint: dict, overwrite: bool) -> None:
    path = out / FINGERPRINT
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {"unreadable": str(path)}
        if old != fingerprint:
            if not overwrite:
                changes = "; ".join(_differences(old, fingerprint)[:6])
                raise RefloopError(
                    f"{out} holds outputs of another run ({changes}); rerun with the same settings to resume, "
                    "choose another output directory, or pass --overwrite to replace them"
                )
            for child in out.iterdir():
                if child.name != LOCK:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    elif overwrite:
        for child in out.iterdir():
            if child.name != LOCK:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def tensors_digest(tensors: dict) -> str:
    """A digest of named tensors' values (adapters: megabytes, cheap next to a run)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_fingerprint(vlm) -> dict:
    """What identifies the model behind a VLM for a run's fingerprint: its name, the adapter a
    view has active and a digest of the adapters' values, its prompt profile, weight dtype,
    digests of its config and weights on disk, and `lineage` for a model changed in memory (a
    tuned model merged without being saved): two different models never share a fingerprint,
    so an output directory of one is never resumed by the other."""
    out = {"name": str(getattr(vlm, "name", type(vlm).__name__)), "profile": type(getattr(vlm, "profile", None)).__name__}
    backend = getattr(vlm, "backend", None)
    if isinstance(backend, str):  # only non-HF backends say so: HF fingerprints stay as recorded
        out["backend"] = backend
    adapter = getattr(vlm, "adapter", None)
    if isinstance(adapter, str):
        out["adapter"] = adapter
        adapters = getattr(vlm, "adapters", None)
        if adapters is not None and hasattr(adapters, "state_dict"):
            out["adapter_digest"] = tensors_digest(adapters.state_dict())
    lineage = getattr(vlm, "lineage", None)  # an HFVLM field; other VLMs may lack it
    if lineage:
        out["lineage"] = lineage
    model = getattr(vlm, "model", None)
    if model is not None:
        try:
            out["dtype"] = str(next(model.parameters()).dtype)
        except (StopIteration, AttributeError, TypeError):
            pass
    return out | checkpoint_digest(Path(out["name"]))


def checkpoint_digest(directory: Path) -> dict:
    """Digests of a checkpoint directory's config and first weight files ({} for a hub id): a model
    retrained under the same path is another model."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    weights = sorted(directory.glob("*.safetensors"))
    return {"config": file_digest(directory / "config.json"), "weights": [file_digest(w) for w in weights[:4]]}


@contextmanager
def shared_run_directory(out_dir: Path, fingerprint: dict, overwrite: bool = False) -> Iterator:
    """`run_directory` for a job all processes of an `accelerate launch` share: the main process
    locks and checks (or clears) the directory, the others wait for it; yields the PartialState."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        with run_directory(out_dir, fingerprint, overwrite):
            state.wait_for_everyone()
            yield state
    else:
        state.wait_for_everyone()
        yield state
