"""Bounds on what an option may ask of the machine, checked when the option is read, before
anything allocates: a value past them is a typo or an attack, and failing later costs an
allocator error, a segmentation fault (torch.set_num_threads with 10^8 threads) or a hang.

The ceilings are far above any real run (SVP: K = 20 samples, LoRA r = 64; SC-Tune: 128 boxes per
step) and well below what breaks. Pydantic fields use the annotated types; CLI options call
`check_range` (typer's own range errors are not the CLI's one-line `error:` messages).
"""

from __future__ import annotations

import os
import re
from typing import Annotated

from pydantic import AfterValidator, Field

from refloop.errors import RefloopError

MAX_SEED = 2**32 - 1  # the range every seeded generator accepts (numpy's legacy seed is the narrowest)
MAX_BATCH = 65_536  # examples, images or sequences in one batch
MAX_SAMPLES = 1_024  # samples drawn per prompt (SVP's K, Pink's K, SC-Tune's group)
MAX_NEW_TOKENS = 32_768  # tokens generated per answer
MAX_LORA_RANK = 4_096  # also checked against the adapted layers' width once the model is known
MAX_RECIPE_NODES = 100_000  # values in a recipe after YAML aliases are expanded


def cpu_cores() -> int:
    """The machine's CPU cores (not the process's affinity mask: more threads than the mask
    allows only oversubscribe, while 10^8 threads crash)."""
    return os.cpu_count() or 1


def check_threads(threads: int | None, option: str = "threads") -> int | None:
    """A torch thread count of at least 1 and at most this machine's cores."""
    if threads is None:
        return None
    cores = cpu_cores()
    if not 1 <= threads <= cores:
        raise RefloopError(f"{option} {threads}: choose 1 to {cores} (this machine's CPU cores)")
    return threads


def _threads(value: int | None) -> int | None:
    if value is not None and value > cpu_cores():
        raise ValueError(f"at most {cpu_cores()} (this machine's CPU cores), got {value}")
    return value


def check_range(value: int | None, low: int, high: int, option: str) -> None:
    """A CLI option's integer within [low, high] (None: not given)."""
    if value is not None and not low <= value <= high:
        raise RefloopError(f"{option} {value}: choose {low} to {high}")


SAFE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def _safe_name(value: str) -> str:
    if not SAFE_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a safe name: a letter, then up to 63 letters, digits, '_' or '-' (no '.' or '/')")
    return value


Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Threads = Annotated[int, Field(ge=1), AfterValidator(_threads)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
Samples = Annotated[int, Field(ge=1, le=MAX_SAMPLES)]
NewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
LoraRank = Annotated[int, Field(ge=1, le=MAX_LORA_RANK)]
SafeName = Annotated[str, AfterValidator(_safe_name)]
