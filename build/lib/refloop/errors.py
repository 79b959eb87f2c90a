"""User-facing errors: the CLI prints their message and exits with code 2, no traceback."""

from __future__ import annotations


class RefloopError(Exception):
    """A problem the user can fix (bad input, config or file)."""


class DataError(RefloopError):
    """A malformed record or file; names the file and the record."""

    def __init__(self, path: object, record: object, problem: str) -> None:
        self.path, self.record, self.problem = path, record, problem
        where = f"{path}" if record is None else f"{path}, record {record}"
        super().__init__(f"{where}: {problem}")
