"""Image paths from annotation files, resolved under an image root and never outside it.

Resolution follows symlinks (a path escaping the root through a link is an error too) but never
needs the file to exist: annotation-only work (the appendix-9 filter) runs without the images.
"""

from __future__ import annotations

import os
import reprlib
import stat
from pathlib import Path
from typing import Any

from refloop.errors import DataError

_FAST = os.name == "posix"


class _Short(reprlib.Repr):
    """repr bounded in depth, length and digits: safe on anything a data file holds (a list nested
    900 deep, a 5000-digit integer from a pickle, a megabyte string)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 80, 80, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = self.maxdeque = 6

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 1000:
            return f"<an integer of about {int(x.bit_length() * 0.30103)} digits>"
        return super().repr_int(x, level)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return super().repr_instance(x[: self.maxother], level) + ("..." if len(x) > self.maxother else "")

    repr_bytearray = repr_bytes


_short = _Short()


def shown(value: Any) -> str:
    """A value read from a data file, for an error message: its repr, bounded in size and depth."""
    try:
        return _short.repr(value)
    except Exception:  # a repr that fails: say what it is
        return f"<{type(value).__name__}>"


class ImageRoot:
    """Resolves the many image paths of one annotation file under one root.

    Same result as `resolve_image_path` for every name, cheaper at Objects365 scale (1.7M names in
    a few dozen folders): the root and each folder are resolved once, then a name costs one
    `lstat` when its folder exists (a full resolve only when the file itself is a symlink) and
    nothing when it does not. The image is never opened.
    """

    def __init__(self, root: str | Path) -> None:
        try:
            self.root = Path(root).resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            raise DataError(root, None, f"cannot resolve the image root: {exc}") from None
        self._root_str = str(self.root)
        self._prefix = self._root_str if self._root_str.endswith(os.sep) else self._root_str + os.sep
        self._folders: dict[str, tuple[str, bool]] = {}  # folder as written -> (resolved prefix, is a directory)

    def resolve(self, file_name: object, source: object, record: object) -> Path:
        return Path(self.resolve_str(file_name, source, record))

    def resolve_str(self, file_name: object, source: object, record: object) -> str:
        if not isinstance(file_name, str) or not file_name:
            raise DataError(source, record, f"image path must be a non-empty string, got {shown(file_name)}")
        if "\x00" in file_name or not (file_name.isascii() or _encodable(file_name)):
            raise DataError(
                source, record, f"image path {shown(file_name)} is not a usable file name (a NUL byte or an unencodable character)"
            )
        if _FAST and not file_name.startswith("/"):
            folder, name = os.path.split(file_name)
            if name not in ("", ".", ".."):
                known = self._folders.get(folder)
                if known is None:
                    resolved = str(_resolve(self.root / folder, file_name, source, record)) if folder else self._root_str
                    prefix = resolved if resolved.endswith(os.sep) else resolved + os.sep
                    known = self._folders[folder] = (prefix, os.path.isdir(resolved))
                prefix, folder_exists = known
                path = prefix + name
                is_link = False  # no folder, no file: nothing to look at (annotation-only work without the images)
                if folder_exists:
                    try:
                        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
                    except OSError:  # absent (or unreadable): resolve() keeps the name as written
                        pass
                    except ValueError:  # e.g. an embedded NUL: the general path reports it
                        is_link = True
                if not is_link:
                    if not (path.startswith(self._prefix) or path == self._root_str):
                        raise DataError(source, record, f"image path {shown(file_name)} escapes the image root {self.root}")
                    return path
        return str(self._resolve_general(file_name, source, record))

    def _resolve_general(self, file_name: str, source: object, record: object) -> Path:
        candidate = Path(file_name)
        if candidate.is_absolute():
            raise DataError(source, record, f"image path {shown(file_name)} is absolute; paths must be relative to the image root")
        resolved = _resolve(self.root / candidate, file_name, source, record)
        if not resolved.is_relative_to(self.root):
            raise DataError(source, record, f"image path {shown(file_name)} escapes the image root {self.root}")
        return resolved


def _encodable(name: str) -> bool:
    try:
        os.fsencode(name)
    except UnicodeError:
        return False
    return True


def _resolve(path: Path, file_name: str, source: object, record: object) -> Path:
    """Path.resolve, its failures (a symlink loop: RuntimeError; an unusable name) a DataError."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataError(source, record, f"cannot resolve image path {shown(file_name)}: {exc}") from None


def resolve_image_path(root: Path, file_name: str, source: object, record: object) -> Path:
    """`root / file_name` with symlinks resolved; a DataError naming the record if it is absolute
    or escapes the root. The file need not exist. Many names under one root: use `ImageRoot`."""
    return ImageRoot(root).resolve(file_name, source, record)
