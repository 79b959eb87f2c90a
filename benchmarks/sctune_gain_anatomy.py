"""Where SC-Tune's self-consistency gain comes from, per eval set: each box's base and tuned
outcome (consistent / wrong box / unparseable answer) from an SC-Tune run's own evaluation samples.
Planning data for the next base model (issue 20): a change that fixes the answer format lifts the
base as much as the tuned model, one that improves perception out of domain may not.

    python benchmarks/sctune_gain_anatomy.py RUN_DIR [RUN_DIR ...] --result FILE

RUN_DIR is an `refloop sctune` output (eval/base/<set>/samples.jsonl and eval/tuned/<set>/...).
Writes FILE: per run and eval set, the transition counts (base -> tuned) and the gain in points
split into boxes that became consistent from a wrong box and from an unparseable answer, minus
those lost.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def outcome(row: dict) -> str:
    if row["consistent"]:
        return "consistent"
    return "unparseable" if row.get("predicted_box") is None else "wrong box"


def anatomy(run: Path) -> dict:
    out = {}
    for base_dir in sorted((run / "eval" / "base").iterdir()):
        tuned_dir = run / "eval" / "tuned" / base_dir.name
        read = lambda d: {r["id"]: r for r in map(json.loads, (d / "samples.jsonl").read_text().splitlines())}  # noqa: E731
        base, tuned = read(base_dir), read(tuned_dir)
        ids = sorted(set(base) & set(tuned))
        moves = Counter(f"{outcome(base[i])} -> {outcome(tuned[i])}" for i in ids)
        total = len(ids)

        def points(n: int, total: int = total) -> float:
            return round(100 * n / total, 1)

        out[base_dir.name] = {
            "boxes": len(ids),
            "transitions": dict(sorted(moves.items())),
            "gain_points": points(sum(outcome(tuned[i]) == "consistent" for i in ids) - sum(outcome(base[i]) == "consistent" for i in ids)),
            "gained_from_wrong_box": points(moves["wrong box -> consistent"]),
            "gained_from_unparseable": points(moves["unparseable -> consistent"]),
            "lost": points(moves["consistent -> wrong box"] + moves["consistent -> unparseable"]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--note", default="", help="provenance: which model, recipe and split the runs used")
    args = parser.parse_args()
    result = {"benchmark": "sctune_gain_anatomy", "note": args.note, "runs": {run.name: anatomy(run) for run in args.runs}}
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    for name, sets in result["runs"].items():
        for data, a in sets.items():
            print(
                f"{name} {data}: gain {a['gain_points']:+.1f} = +{a['gained_from_wrong_box']} (wrong box -> consistent) "
                f"+{a['gained_from_unparseable']} (unparseable -> consistent) -{a['lost']} (lost)"
            )


if __name__ == "__main__":
    main()
