"""Every seed refloop derives, as named streams in one place.

Each formula produced committed results (refloop-tiny, SC-Tune's and SVP's benchmarks), so they
are kept exactly as they were first written; changing one changes the runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable

_SEED_STREAMS: dict[str, Callable[[int, int, int], int]] = {
    "batch": lambda seed, step, rank: seed * 1_000_003 + step,  # which examples a step draws
    "torch": lambda seed, step, rank: seed * 1_000_003 + step + 7919 * rank,  # sampling, dropout, shuffles
    "mix": lambda seed, step, rank: seed * 31 + step,  # mixing in supervised data
    "svp-iteration": lambda seed, step, rank: seed + 7919 * step,  # SVP: the base seed of outer iteration `step`
}


def step_seed(seed: int, step: int, stream: str, rank: int = 0) -> int:
    """The seed of random stream `stream` ('batch', 'torch', 'mix' or 'svp-iteration') at `step`."""
    try:
        return _SEED_STREAMS[stream](seed, step, rank)
    except KeyError:
        raise ValueError(f"unknown seed stream {stream!r}; known: {', '.join(_SEED_STREAMS)}") from None


_TEXT_STREAMS = frozenset({"svp-cvq"})  # SVP (CVQ): which visual queries join an iteration's captions


def text_seeded_rng(stream: str, seed: int) -> random.Random:
    """A Python RNG of a stream seeded by the text 'refloop-<stream>/<seed>' (Python hashes a
    text seed with SHA-512, so nearby seeds give unrelated draws)."""
    if stream not in _TEXT_STREAMS:
        raise ValueError(f"unknown text-seeded stream {stream!r}; known: {', '.join(sorted(_TEXT_STREAMS))}")
    return random.Random(f"refloop-{stream}/{seed}")
