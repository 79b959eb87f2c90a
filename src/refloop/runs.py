"""Output directories of resumable runs: one writer at a time, never a silent mix of runs, and
never a file deleted or replaced that refloop did not write.

Every command that writes a resumable output (evaluation samples, training checkpoints,
bootstrapped data) opens its directory through `run_directory`:
- an exclusive lock (`.refloop.lock`, flock) is held while the run writes; a second run into the
  same directory stops at once with a message instead of writing every record twice;
- a fingerprint (`run.json`: the model, the data and every option that changes results) is
  stored with the outputs; a rerun with another fingerprint refuses to reuse them (or, with
  `overwrite`, replaces them), so a resumed run is never reported under the wrong model's name;
- ownership: a run starts only in an empty or new directory (or resumes or replaces one of
  refloop's own runs), and a manifest (`.refloop-manifest.json`) records every file and folder
  refloop created there, at any depth. `overwrite` deletes exactly those: a file a user put beside
  them (or a directory holding no refloop run at all) is never touched, and one put inside a folder
  of refloop's stops `overwrite` before anything is deleted.

`check_output` applies the same rules, and the shape rules of an output path (a directory where a
directory is expected, never equal to or inside an input, a writable place), before any work, so
a command refuses a bad `--out` before its data or weights load.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from refloop.errors import RefloopError

log = logging.getLogger(__name__)

LOCK = ".refloop.lock"
FINGERPRINT = "run.json"
MANIFEST = ".refloop-manifest.json"
MANIFEST_VERSION = 2  # 1 (no "version"): top-level names only, a folder owned with its contents
# the .tmp names: what an older refloop left when killed while writing its bookkeeping
_BOOKKEEPING = frozenset({LOCK, FINGERPRINT, MANIFEST, FINGERPRINT + ".tmp", MANIFEST + ".tmp"})
EMPTY_OR_NEW = "choose an empty or new directory"


# ---- output paths ---------------------------------------------------------------------------------
def _absolute(path: Path) -> Path:
    """`path` made absolute with symlinks resolved (as far as it exists)."""
    try:
        return Path(os.path.realpath(Path(path).expanduser()))
    except (OSError, ValueError) as exc:
        raise RefloopError(f"cannot resolve {path}: {exc}") from None


def _writable_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of `path` is a directory refloop may create entries in."""
    parent = _absolute(path).parent
    while not parent.exists():
        if parent.is_symlink() or parent == parent.parent:  # a dangling link on the way
            raise RefloopError(f"{option} {path}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise RefloopError(f"{option} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RefloopError(f"{option} {path}: {parent} is not writable")


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, restored at once


@contextmanager
def replaced_whole(path: Path) -> Iterator[Path]:
    """Yields a new temporary file beside `path` (a fresh name: never an existing file, never a
    symlink followed) to write; on success it is renamed over `path` (a kill leaves the old file or
    the new one, never a mix), on failure removed."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would outlive the rename: the mode open() gives
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


def write_text_whole(path: Path, text: str | Iterable[str]) -> None:
    """Replace a text file whole (`replaced_whole`): the text, or its pieces in order, fsynced
    before the rename."""
    with replaced_whole(path) as tmp, open(tmp, "w") as f:
        f.writelines([text] if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())


def input_paths(*values: object) -> list[Path]:
    """The values (strings, paths, or nested lists/dicts of them, e.g. a recipe's dump) that name
    an existing file or directory: the inputs an output may not replace or live in."""
    found: list[Path] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                walk(v)
        elif isinstance(value, (str, Path)) and str(value) and "\x00" not in str(value):
            try:
                if os.path.lexists(value):
                    found.append(Path(value))
            except (OSError, ValueError):
                pass

    for value in values:
        walk(value)
    return found


def check_output(
    path: Path,
    *,
    kind: str = "dir",
    inputs: Iterable[object] = (),
    option: str = "--out",
    fingerprint: dict | None = None,
    overwrite: bool = False,
    apart_from: dict[str, Path] | None = None,
    written_by_us: Callable[[Path], bool] | None = None,
) -> Path:
    """The one rule for output paths, checked before any work and creating nothing: `kind="dir"`
    is a directory that is new, empty or one of refloop's runs (`fingerprint`, when known, must
    match unless `overwrite`); `kind="file"` is a file (never a directory) that is new, or with
    `overwrite` one this command wrote (`written_by_us` recognises it: refloop replaces only files
    it wrote). Either way its nearest existing ancestor is a writable directory and it is neither
    equal to nor inside an input. `apart_from` names the command's other outputs ({option: path},
    existing or not): neither holds the other."""
    path = Path(path)
    target = _absolute(path)
    for other_option, other in (apart_from or {}).items():
        resolved = _absolute(other)
        if target.is_relative_to(resolved) or resolved.is_relative_to(target):
            raise RefloopError(f"{option} {path} and {other_option} {other} overlap; give them separate directories")
    package = _absolute(Path(__file__).parent)
    if target.is_relative_to(package):  # the default model is an input no command names
        raise RefloopError(
            f"{option} {path} is inside refloop's own package ({package}: its packaged model and recipes); write the output elsewhere"
        )
    for source in input_paths(*inputs):
        resolved = _absolute(source)
        if target == resolved:
            raise RefloopError(f"{option} {path} is one of the input files ({source}); write the output elsewhere")
        if resolved.is_dir() and target.is_relative_to(resolved) and kind == "dir":
            raise RefloopError(f"{option} {path} is inside the input {source}; write the output elsewhere")
        if kind == "dir" and resolved.is_relative_to(target) and overwrite:
            raise RefloopError(f"{option} {path} holds the input {source}; --overwrite would replace it: write the output elsewhere")
    if kind == "file":
        if path.is_dir():
            raise RefloopError(f"{option} {path} is a directory; name a file")
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise RefloopError(f"{option} {path} exists; name a new file, or pass --overwrite to replace an output this command wrote")
            if written_by_us is None or not written_by_us(path):
                raise RefloopError(
                    f"{option} {path} exists and is not a file this command writes; refloop replaces only files it wrote: "
                    "remove it yourself or name another file"
                )
            if not os.access(path, os.W_OK):
                raise RefloopError(f"{option} {path} is not writable")
        _writable_parent(path, option)
        return path
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise RefloopError(f"{option} {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise RefloopError(f"{option} {path} is not writable")
        _owned(path, option)
        if fingerprint is not None:
            _compare(path, json.loads(json.dumps(fingerprint)), overwrite)
    else:
        _writable_parent(path, option)
    return path


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


def _by_content(fingerprint: object) -> object:
    """An evaluation fingerprint with its data file named by its content, not by the path it was
    given as: the same file given by another path (absolute, from another working directory) is
    the same run's data. Only where the fingerprint also holds where the images are, resolved
    (`first_image`): an annotation file's images are found relative to it, so the same content in
    another folder may be other images (recipes record no such path and compare paths as given)."""
    if not isinstance(fingerprint, dict) or not fingerprint.get("first_image") or not isinstance(fingerprint.get("data_files"), dict):
        return fingerprint
    digest_of = fingerprint["data_files"]
    if not digest_of:
        return fingerprint

    def named(value: object) -> object:
        if isinstance(value, dict):
            return {k: named(v) for k, v in value.items()}
        if isinstance(value, list):
            return [named(v) for v in value]
        if isinstance(value, str) and (value in digest_of or str(Path(value)) in digest_of):
            return f"<file {digest_of.get(value) or digest_of[str(Path(value))]}>"
        return value

    return named({k: v for k, v in fingerprint.items() if k != "data_files"}) | {"data_files": sorted(digest_of.values())}


# What a key absent from a fingerprint stands for (fields left out at their default, so older runs match).
_ABSENT = {"backend": "'hf'", "generation_backend": "'hf'"}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            absent = _ABSENT.get(key, "(not set)")
            shown_a, shown_b = (absent if key not in side else repr(side[key]) for side in (old, new))
            out.append(f"{prefix}{key}: {shown_a} -> {shown_b}")
    return out


# ---- ownership ------------------------------------------------------------------------------------
def _entries(out: Path) -> set[str]:
    """The names at the top of `out`, refloop's bookkeeping files left out."""
    try:
        return {name for name in os.listdir(out) if name not in _BOOKKEEPING}
    except OSError as exc:
        raise RefloopError(f"cannot list {out}: {exc.strerror or exc}") from None


def _tree(out: Path) -> tuple[set[str], set[str]]:
    """Every path under `out`, relative and '/'-separated, refloop's bookkeeping at its top left out:
    (files and symlinks, directories). Symlinks are listed, never followed."""
    files: set[str] = set()
    dirs: set[str] = set()

    def fail(exc: OSError) -> None:
        raise RefloopError(f"cannot list {exc.filename or out}: {exc.strerror or exc}")

    for root, dirnames, filenames in os.walk(out, onerror=fail):
        rel = Path(root).relative_to(out).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for name in list(dirnames):
            if os.path.islink(os.path.join(root, name)):
                dirnames.remove(name)
                files.add(prefix + name)
            else:
                dirs.add(prefix + name)
        files.update(prefix + name for name in filenames if prefix or name not in _BOOKKEEPING)
    return files, dirs


def _read_manifest(out: Path) -> dict | None:
    """The manifest of `out`: {"files": refloop's files and symlinks, "dirs": the directories it
    created, "foreign": paths it found and did not write (the user's), "open": a run holds or held
    the directory without closing}, paths relative to `out`. A manifest of an older refloop named
    top-level entries only; its folders are read as refloop's with everything in them, as that
    refloop treated them."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {"damaged": True}
    keys = ("files", "dirs", "foreign")
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(k, []), list) for k in keys):
        return {"damaged": True}
    if not all(isinstance(v, str) and "\x00" not in v for k in keys for v in manifest.get(k, [])):
        return {"damaged": True}
    version = manifest.get("version", 1)
    if not isinstance(version, int) or version > MANIFEST_VERSION:  # a newer refloop's: not read by guesswork
        return {"damaged": True}
    if version < MANIFEST_VERSION:
        manifest = _upgraded(out, manifest)
    return manifest


def _upgraded(out: Path, old: dict) -> dict:
    """A version-1 manifest (top-level names) read at any depth. A closed run's folders were
    refloop's with their contents; what changed in them after the manifest was last written (its
    modification or status-change time: a file moved in keeps the first, not the second) is the
    user's, as a version-2 manifest would have recorded it. A copy that keeps both times reads as
    refloop's."""
    files, dirs, foreign = set(), set(), set()
    written = (out / MANIFEST).stat().st_mtime
    for key, into in (("files", files), ("foreign", foreign)):
        for name in old.get(key, []):
            child = out / name
            if "/" in name or name in (".", "..", "") or not os.path.lexists(child):
                continue
            if not child.is_dir() or child.is_symlink():
                into.add(name)
                continue
            inner_files, inner_dirs = _tree(child)
            if key == "foreign":
                foreign.update({name} | {f"{name}/{q}" for q in inner_files | inner_dirs})
                continue
            dirs.add(name)
            for q in inner_files | inner_dirs:
                stat = os.lstat(child / q)  # a move keeps the mtime but not the ctime
                later = not old.get("open") and max(stat.st_mtime, stat.st_ctime) > written
                (foreign if later else files if q in inner_files else dirs).add(f"{name}/{q}")
    return {
        "version": MANIFEST_VERSION,
        "files": sorted(files),
        "dirs": sorted(dirs),
        "foreign": sorted(foreign),
        "open": bool(old.get("open")),
    }


def _write_json(path: Path, data: dict) -> None:
    write_text_whole(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _owned(out: Path, option: str = "output") -> None:
    """`out` is empty (bookkeeping aside) or holds a refloop run; else a RefloopError."""
    if (out / FINGERPRINT).is_file():
        return
    entries = sorted(_entries(out))
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise RefloopError(
            f"{option} {out} is not empty ({shown}) and holds no refloop run; refloop writes only into a directory of its own "
            f"and never deletes what it did not write: {EMPTY_OR_NEW}"
        )


def _old_fingerprint(out: Path) -> dict | None:
    path = out / FINGERPRINT
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {"unreadable": str(path)}


def _compare(out: Path, fingerprint: dict, overwrite: bool) -> bool:
    """Whether `out` holds a run of another fingerprint that `overwrite` may replace (refused
    without it, or when refloop cannot tell its files from others)."""
    old = _old_fingerprint(out)
    if old is None or old == fingerprint or _by_content(old) == _by_content(fingerprint):
        return False
    if not overwrite:
        tasks = (old.get("task"), fingerprint.get("task")) if isinstance(old, dict) else (None, None)
        if all(tasks) and tasks[0] != tasks[1]:  # another command's run: its settings' differences say nothing useful
            raise RefloopError(
                f"{out} holds a `{tasks[0]}` run, not a `{tasks[1]}` one; choose another output directory, "
                "or pass --overwrite to replace it"
            )
        changes = "; ".join(_differences(old, fingerprint)[:6]) if isinstance(old, dict) else "unreadable run.json"
        raise RefloopError(
            f"{out} holds outputs of another run ({changes}); rerun with the same settings to resume, "
            "choose another output directory, or pass --overwrite to replace them"
        )
    manifest = _read_manifest(out)
    if manifest is None or manifest.get("damaged"):
        raise RefloopError(
            f"{out} holds a refloop run without a readable manifest of the files it wrote ({MANIFEST}; an older refloop "
            f"wrote none), so --overwrite cannot tell them from yours: delete them yourself or {EMPTY_OR_NEW}"
        )
    return True


def _folders_above(rel: str) -> list[str]:
    """The folders a relative path lies in: 'a/b/c' -> ['a', 'a/b']."""
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _safe(out: Path, rel: str) -> Path | None:
    """`out / rel` when `rel` is a plain relative path whose every parent is a real directory
    inside `out` (a damaged manifest is never followed out of `out`, nor through a symlink)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] in _BOOKKEEPING:
        return None
    parent = out
    for part in parts[:-1]:
        parent = parent / part
        if parent.is_symlink() or not parent.is_dir():
            return None
    return parent / parts[-1]


def _remove(out: Path, manifest: dict) -> None:
    """Delete the files refloop wrote (a symlink itself, never its target), then the folders it
    created. A folder of refloop's holding something it did not write is refused first, before
    anything is deleted: the user's file stays, and so would the folder's stale outputs beside it."""
    files, dirs = _tree(out)
    ours, folders = set(manifest["files"]) | set(manifest.get("dirs", [])), set(manifest.get("dirs", []))
    theirs = sorted(p for p in (files | dirs) - ours if folders.intersection(_folders_above(p)))
    if theirs:
        shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
        raise RefloopError(
            f"--overwrite would replace the earlier run in {out}, but folders refloop created there hold files it did not write "
            f"({shown}); refloop never deletes those: move them out, or {EMPTY_OR_NEW}"
        )
    for rel in sorted(set(manifest["files"])):
        child = _safe(out, rel)
        if child is None or (child.is_dir() and not child.is_symlink()):
            continue  # a folder where refloop wrote a file: someone else's since
        try:
            child.unlink(missing_ok=True)
        except OSError as exc:
            raise RefloopError(f"cannot remove {child} of the earlier run: {exc.strerror or exc}") from None
    for rel in sorted(folders, key=lambda d: -d.count("/")):  # the deepest first
        child = _safe(out, rel)
        if child is not None and child.is_dir() and not child.is_symlink():
            with suppress(OSError):  # a file appeared since the check: it stays, with its folder
                child.rmdir()


_HELD: dict[str, int] = {}  # directories this process holds: a nested open of one is a no-op


@contextmanager
def run_directory(out: Path, fingerprint: dict | None = None, overwrite: bool = False, setup_files: Iterable[str] = ()) -> Iterator[Path]:
    """Hold `out` exclusively while a run writes it; refuse outputs of a run with another
    fingerprint (JSON-comparable), or replace them (the manifest's files only) when `overwrite`.
    Without a fingerprint only the lock is taken. A new run that fails before writing anything but
    `setup_files` (e.g. the recipe it records first) leaves nothing behind, no fingerprint to block
    the corrected rerun."""
    key = str(_absolute(Path(out)))
    if key in _HELD and fingerprint is None:
        yield Path(out)
        return
    created = not Path(out).exists()
    out = prepare_output_dir(out)
    lock_path = out / LOCK
    lock_existed = lock_path.exists()
    handle = open(lock_path, "a+")
    fresh = False
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
        manifest = None
        if fingerprint is not None:
            try:
                fresh, manifest = _open_run(out, json.loads(json.dumps(fingerprint)), overwrite)
            except RefloopError:
                if not lock_existed:  # refused (e.g. a folder of the user's): leave it as it was found
                    lock_path.unlink(missing_ok=True)
                raise
        at_start = set().union(*_tree(out)) if manifest is not None else set()
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield out
        except BaseException:
            if manifest is not None and fresh and _entries(out) <= set(setup_files):
                _discard(out, created, setup_files)  # nothing done: no fingerprint to block the corrected rerun
                manifest = None
            raise
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
            if manifest is not None:
                _close_run(out, manifest, at_start)
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _open_run(out: Path, fingerprint: dict, overwrite: bool) -> tuple[bool, dict | None]:
    """Check (or replace) the run in `out` under its lock; returns (whether the run is new, its
    manifest, now marked open; None for a run of an older refloop, which --overwrite refuses)."""
    _owned(out)
    old = _old_fingerprint(out)
    replace = _compare(out, fingerprint, overwrite)
    manifest = _read_manifest(out)
    if manifest is not None and not manifest.get("damaged") and manifest.get("open"):
        # the last run was killed before recording what it wrote: what it left is refloop's
        _record(out, manifest, set())
    if replace:
        _remove(out, manifest)
        files, dirs = _tree(out)
        manifest = {"files": [], "dirs": [], "foreign": sorted(files | dirs)}  # what is left is the user's
    elif old is None:
        manifest = {"files": [], "dirs": [], "foreign": []}  # `_owned`: the directory is empty
    elif manifest is None or manifest.get("damaged"):
        return False, None  # which files are refloop's is unknown: resumable, never replaced
    elif not manifest.get("open"):  # added since the last run closed: the user's, never replaced
        files, dirs = _tree(out)
        ours = set(manifest["files"]) | set(manifest.get("dirs", []))
        manifest["foreign"] = sorted((files | dirs) - ours)  # a user's path that is gone is no one's
    manifest |= {"version": MANIFEST_VERSION, "open": True}
    _write_json(out / FINGERPRINT, fingerprint)
    _write_json(out / MANIFEST, manifest)
    return old is None or replace, manifest


def _record(out: Path, manifest: dict, before: set[str]) -> None:
    """Add to `manifest` every path in `out` that is not in `before` and not the user's (a foreign
    path); forget recorded and foreign paths that are gone."""
    files, dirs = _tree(out)
    foreign = set(manifest.get("foreign", [])) & (files | dirs)  # a user's path that is gone is no one's
    manifest["foreign"] = sorted(foreign)
    for key, now in (("files", files), ("dirs", dirs)):
        new = (now - before) - foreign  # written while the run held the directory, even inside a folder of the user's
        manifest[key] = sorted((set(manifest.get(key, [])) | new) & now)


def _close_run(out: Path, manifest: dict, at_start: set[str]) -> None:
    """Record what the run created: every path that appeared while it held the directory."""
    try:
        _record(out, manifest, at_start)
        manifest["open"] = False
        _write_json(out / MANIFEST, manifest)
    except (OSError, RefloopError):
        pass  # the directory went away (or is unwritable): nothing left to record


def claim_outputs(out: Path, *paths: Path) -> None:
    """Record in `out`'s manifest files written into a run directory after its run closed (a
    report drawn from finished samples), so that --overwrite replaces them too."""
    _in_each_run(Path(out), lambda run: _claim(run, paths), f"{', '.join(str(p) for p in paths)} not recorded as refloop's")


def _in_each_run(out: Path, action, failed: str) -> None:
    """`action(run)` for `out`'s run and each run it is nested in, under that run's lock (a run
    opened meanwhile is not raced). The outputs are written already: a run holding a directory, or
    a manifest that cannot be updated (a RefloopError), is said (`failed`, then why), not fatal."""
    for run in [d for d in (out, *out.parents) if (d / FINGERPRINT).is_file()]:
        try:
            with run_directory(run):
                action(run)
        except RefloopError as exc:
            log.warning(f"{failed} in {run / MANIFEST}: {exc}")


def _claim(out: Path, paths: tuple[Path, ...]) -> None:
    manifest = _read_manifest(out)
    if manifest is None or manifest.get("damaged") or not (out / FINGERPRINT).is_file():
        return
    files, dirs = set(), set()
    for path in map(Path, paths):
        if not path.is_relative_to(out) or path == out:
            continue
        rel = path.relative_to(out).as_posix()
        dirs.update(_folders_above(rel))  # the folders on the way
        if path.is_dir() and not path.is_symlink():
            inner_files, inner_dirs = _tree(path)
            dirs |= {rel} | {f"{rel}/{d}" for d in inner_dirs}
            files |= {f"{rel}/{f}" for f in inner_files}
        else:
            files.add(rel)
    foreign = set(manifest.get("foreign", []))
    dirs = {d for d in dirs if d not in foreign}  # a folder of the user's holding a report stays the user's
    manifest["files"] = sorted(set(manifest["files"]) | files)
    manifest["dirs"] = sorted(set(manifest.get("dirs", [])) | dirs)
    manifest["foreign"] = sorted(foreign - files)
    try:
        _write_json(out / MANIFEST, manifest)
    except OSError as exc:
        raise RefloopError(f"cannot record the outputs in {out / MANIFEST}: {exc.strerror or exc}") from None


def release_outputs(out: Path, *paths: Path) -> None:
    """Delete files an earlier run of `out` wrote after it closed (its report: `claim_outputs`) and
    a rerun does not write again (`--no-report`), so none is left stale beside the new results.
    Only files the manifests record as refloop's are deleted; a user's file of that name stays."""
    out = Path(out)

    def release(run: Path) -> None:
        manifest = _read_manifest(run)
        if manifest is None or manifest.get("damaged"):
            return
        ours = {Path(p).relative_to(run).as_posix() for p in paths if Path(p).is_relative_to(run)} & set(manifest["files"])
        try:
            if run == out:  # the files are in this run's folder; the runs around it only record them
                for rel in ours:
                    (run / rel).unlink(missing_ok=True)
            manifest["files"] = sorted(set(manifest["files"]) - ours)
            _write_json(run / MANIFEST, manifest)
        except OSError as exc:
            raise RefloopError(exc.strerror or str(exc)) from None

    _in_each_run(out, release, f"{', '.join(str(p) for p in paths)}: an earlier report not removed")


def _discard(out: Path, created: bool, setup_files: Iterable[str]) -> None:
    for name in (FINGERPRINT, MANIFEST, *setup_files):
        (out / name).unlink(missing_ok=True)
    if created:
        (out / LOCK).unlink(missing_ok=True)
        try:
            out.rmdir()
        except OSError:
            pass


def records_digest(records: Iterable) -> str:
    """What the outputs depend on in the data (ids, files, sizes, boxes, categories, expressions),
    for a run's fingerprint: a resumed run never mixes records of two datasets."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.image_id!r}|{r.file_name}|{r.width}x{r.height}".encode())
        for o in r.objects:
            h.update(f"|{o.ann_id!r},{o.category},{o.box.as_list()},{o.expressions}".encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def files_digest(*values: object) -> dict[str, str]:
    """A digest of the whole content of every file among `values` (see `input_paths`; directories
    and names that are not paths, such as shapes-world domains, left out), for a fingerprint: a
    training rerun on a data file changed in place is another run."""
    return {str(path): content_digest(path) for path in input_paths(*values) if path.is_file()}


def content_digest(path: Path) -> str:
    """A digest of a file's whole content (`file_digest` reads only its start)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    except OSError as exc:
        raise RefloopError(f"cannot read {path}: {exc.strerror or exc}") from None
    return h.hexdigest()[:16]


def tensors_digest(tensors: dict) -> str:
    """A digest of named tensors' values (adapters: megabytes, cheap next to a run)."""
    import torch  # here, not at the top: the base layer (run directories, whole-file writes) stays torch-free

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
    elif getattr(vlm, "weights_dtype", None) is not None:  # an engine holding the weights (vLLM): its dtype
        out["dtype"] = str(vlm.weights_dtype)
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
def shared_run_directory(
    out_dir: Path, fingerprint: dict, overwrite: bool = False, setup_files: Iterable[str] = (), cpu: bool = False
) -> Iterator:
    """`run_directory` for a job all processes of an `accelerate launch` share: the main process
    locks and checks (or replaces) the directory, the others wait for it before writing anything
    (a file of theirs would make the directory look foreign); yields the PartialState."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    if state.is_main_process:
        with run_directory(out_dir, fingerprint, overwrite, setup_files):
            state.wait_for_everyone()
            yield state
    else:
        state.wait_for_everyone()
        yield state


def earlier_value(path: Path, key: str) -> Any:
    """`key` of the JSON object an earlier run wrote at `path` (None when there is none): what a
    rerun that found all its work done keeps (e.g. the rate of the run that did the work)."""
    try:
        return json.loads(Path(path).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
