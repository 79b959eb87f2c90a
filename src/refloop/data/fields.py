"""Field checks every loader shares (COCO, referring JSONL, RefCOCO, Visual Genome, OpenImages,
parquet): reading a file as text or JSON with a DataError for every way it can fail, checking
ids, numbers, image sizes, texts and boxes with a DataError naming file, record and field, and
the on_error policy that raises or skips and counts. No other exception escapes a loader built
on these, whatever the file holds."""

from __future__ import annotations

import codecs
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from refloop.boxes import Box, InvalidBoxError, OutsidePolicy, validate_box
from refloop.data.paths import shown
from refloop.errors import DataError

OnError = Literal["fail", "skip"]


@dataclass
class LoadReport:
    """What a loader kept and skipped, with the reason of each skip."""

    source: str
    kept: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)

    def skip(self, error: DataError) -> None:
        self.skipped += 1
        self.reasons[error.problem.split(":")[0]] += 1

    def skipped_note(self) -> str:
        """Why nothing may be left to work on: "; N records were skipped (reason: count, ...)", or ""."""
        if not self.skipped:
            return ""
        reasons = ", ".join(f"{reason}: {count}" for reason, count in self.reasons.most_common())
        counted = "1 record was" if self.skipped == 1 else f"{self.skipped} records were"
        return f"; {counted} skipped under --on-error skip ({reasons})"


class Policy:
    def __init__(self, on_error: OnError, report: LoadReport) -> None:
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.on_error, self.report = on_error, report

    def handle(self, error: DataError) -> None:
        if self.on_error == "fail":
            raise error
        self.report.skip(error)


# ---- reading files ------------------------------------------------------------------------------
_BOMS = (  # longest first: the UTF-32-LE mark begins with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as errors="surrogateescape" decodes them


def _encoding(head: bytes) -> str:
    """The encoding a file's first bytes announce: its byte-order mark, else UTF-8."""
    return next((name for bom, name in _BOMS if head.startswith(bom)), "utf-8")


def open_binary(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, not a file") from None
    except OSError as exc:
        raise DataError(path, None, f"cannot read the file: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL
        raise DataError(path, None, f"not a usable file name: {exc}") from None


def open_text(path: Path, newline: str | None = None) -> IO[str]:
    """A text file as `open` would give it, in the encoding its byte-order mark announces (UTF-8
    without one); every failure to open it a DataError. UTF-8 is decoded with errors="surrogateescape":
    a byte that is not UTF-8 shows as a character of U+DC80..U+DCFF (see `ESCAPED`), so one bad line
    can be named and skipped; other encodings fail strictly (UnicodeDecodeError while reading)."""
    raw = open_binary(path)
    try:
        encoding = _encoding(raw.peek(4)[:4])  # type: ignore[attr-defined]
    except OSError as exc:
        raw.close()
        raise DataError(path, None, f"cannot read the file: {exc.strerror or exc}") from None
    errors = "surrogateescape" if encoding.startswith("utf-8") else "strict"
    return io.TextIOWrapper(raw, encoding=encoding, errors=errors, newline=newline)  # type: ignore[arg-type]


def read_text(path: Path) -> str:
    """A whole text file (UTF-8, or the encoding of its byte-order mark); a DataError naming the line
    of the first byte that does not decode."""
    with open_binary(path) as handle:
        try:
            raw = handle.read()
        except OSError as exc:
            raise DataError(path, None, f"cannot read the file: {exc.strerror or exc}") from None
    encoding = _encoding(raw[:4])
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:  # a problem of the whole file (record None), located in the message
        line = f", line {_line_of(raw, exc.start)}" if encoding.startswith("utf-8") else ""
        raise DataError(path, None, f"not {encoding.replace('-sig', '').upper()} text: {exc.reason} at byte {exc.start}{line}") from None


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def read_json(path: Path) -> Any:
    text = read_text(path)
    if not text.strip():
        raise DataError(path, None, "the file is empty (expected one JSON document)")
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(path, None, "not usable JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        hint = " (it looks like UTF-16 or UTF-32 without a byte-order mark: save it as UTF-8)" if "\x00" in text[:4] else ""
        if not hint and exc.msg == "Extra data" and text.lstrip().startswith("{"):
            hint = " (it looks like JSON Lines, one object a line: this reads one JSON document, a COCO-style file)"
        raise DataError(path, None, f"not valid JSON: {exc}{hint}") from None
    except ValueError as exc:  # an integer beyond Python's digit limit
        raise DataError(path, None, f"not usable JSON: {exc}") from None


def read_json_list(path: Path, what: str) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a JSON array of {what} at the top level, got {json_type(data)}")
    return data


def json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        int: "a number",
        float: "a number",
    }
    return names.get(type(value), type(value).__name__)


# ---- checking values ------------------------------------------------------------------------------
_MAX_SIDE = 2**31 - 1  # image sides beyond this are no image (PIL's own bound); keeps width * height in int64


def finite_number(value: Any, source: object, record: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(source, record, f"field {name!r} must be a finite number, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise DataError(source, record, f"field {name!r} must be a finite number, got {shown(value)} (beyond the float range)") from None
    if not math.isfinite(number):
        raise DataError(source, record, f"field {name!r} must be a finite number, got {shown(value)}")
    return number


def image_side(value: Any, source: object, record: object, name: str) -> int:
    """An image width or height: a finite number, truncated to an integer (as before), at most _MAX_SIDE.
    Positivity is checked by the caller, which names both sides."""
    side = int(finite_number(value, source, record, name))
    if side > _MAX_SIDE:
        raise DataError(source, record, f"field {name!r} is {shown(value)}, beyond any image ({_MAX_SIDE} pixels)")
    return side


def image_size_field(width: Any, height: Any, source: object, record: object) -> tuple[int, int]:
    size = (image_side(width, source, record, "width"), image_side(height, source, record, "height"))
    if size[0] <= 0 or size[1] <= 0:
        raise DataError(source, record, f"image size must be positive, got {size[0]}x{size[1]}")
    return size


def is_id(value: Any) -> bool:
    """A usable id: a string, an integer of at most 64 bits (it must print: a pickle can hold an
    integer Python refuses to print), or a finite float; never a list, an object, a boolean (true
    would be the id 1) or null."""
    kind = type(value)
    return kind is str or (kind is int and value.bit_length() <= 64) or (kind is float and math.isfinite(value))


def id_field(value: Any, source: object, record: object, name: str) -> Any:
    if not is_id(value):
        raise DataError(source, record, f"field {name!r} must be a string or a number (integers of at most 64 bits), got {shown(value)}")
    return value


def optional_id(value: Any, source: object, record: object, name: str) -> Any:
    """An id that may be absent (None)."""
    return None if value is None else id_field(value, source, record, name)


def text_field(value: Any, source: object, record: object, name: str) -> str:
    """A name or phrase: a string, or a number written as text (as `str` did before); null is no
    text (""); never a list or an object."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if type(value) in (bool, float) or (type(value) is int and value.bit_length() <= 64):
        return str(value)
    raise DataError(source, record, f"field {name!r} must be a string, got {shown(value)}")


def xywh_box(bbox: Any, size: tuple[int, int], source: object, record: object, outside: OutsidePolicy) -> Box:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DataError(source, record, f"bbox must be [x, y, width, height], got {shown(bbox)}")
    x, y, w, h = (finite_number(v, source, record, "bbox") for v in bbox)
    try:
        return validate_box(Box.from_xywh(x, y, w, h), size, outside=outside)
    except InvalidBoxError as exc:
        raise DataError(source, record, f"invalid bbox: {exc}") from None


def require(entry: dict, key: str, source: object, record: object) -> Any:
    if not isinstance(entry, dict):
        raise DataError(source, record, f"expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise DataError(source, record, f"missing field {key!r}")
    return entry[key]


class UniqueIds:
    """The entries of one list that claim each id: the first claim wins, a later one is a DataError
    ("already used by"), and under on_error="skip" every entry of a reused id goes, the first too,
    since which one the rest of the file means is unknown (`reused`: one DataError per such id,
    naming its first entry)."""

    def __init__(self, source: object, key: str, what: str = "id") -> None:
        self.source, self.key, self.what = source, key, what
        self.first: dict[Any, int] = {}  # id -> index of the entry that first claimed it
        self.again: dict[Any, int] = {}  # id -> index of the first entry that claimed it again

    def claim(self, value: Any, index: int) -> None:
        if value in self.first:
            self.again.setdefault(value, index)
            problem = f"{self.what} {shown(value)} is already used by {self.key}[{self.first[value]}]"
            raise DataError(self.source, f"{self.key}[{index}]", problem)
        self.first[value] = index

    def reused(self) -> list[tuple[Any, DataError]]:
        out = []
        for value, again in self.again.items():
            problem = f"{self.what} {shown(value)} is used again by {self.key}[{again}]"
            out.append((value, DataError(self.source, f"{self.key}[{self.first[value]}]", problem)))
        return out
