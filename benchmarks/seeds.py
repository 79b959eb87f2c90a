"""Effects over several seeds: every benchmark reports a number as its mean, range and per-seed
values, so a reader sees whether the range crosses zero."""

from __future__ import annotations

from collections.abc import Sequence


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]."""
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {text!r}: give distinct integers separated by commas")
    return seeds


def scene_split(validation_seed: int | None, eval_seed: int, taken: set[int]) -> int:
    """The scene seed a benchmark evaluates on: the evaluation split's, or with --validation-seed
    held-out scenes of that seed, where free settings are chosen; refused when negative or the
    seed of scenes the run trains or evaluates on (`taken`, which must include `eval_seed`)."""
    if validation_seed is None:
        return eval_seed
    if validation_seed < 0 or validation_seed in taken | {eval_seed}:
        raise SystemExit(f"--validation-seed {validation_seed}: a seed of the evaluation, pretraining or training scenes, or < 0")
    return validation_seed


def spread(values: Sequence[float], digits: int = 1) -> dict:
    """Mean, min, max and the per-seed values; `excludes_zero` when the whole range is on one side."""
    values = [float(v) for v in values]
    lo, hi = min(values), max(values)
    return {
        "mean": round(sum(values) / len(values), digits),
        "min": round(lo, digits),
        "max": round(hi, digits),
        "per_seed": [round(v, digits) for v in values],
        "excludes_zero": lo > 0 or hi < 0,
    }


def fmt(stat: dict) -> str:
    """'+7.5 [+5.1, +9.0]' for a README table."""
    return f"{stat['mean']:+.1f} [{stat['min']:+.1f}, {stat['max']:+.1f}]"
