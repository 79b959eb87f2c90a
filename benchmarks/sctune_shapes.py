"""SC-Tune on the shapes world: Pr@0.5 per domain before and after tuning on one OOD style.

    python benchmarks/sctune_shapes.py [--seeds 0,1,2] [--train-domain crowded] [--tune both|describer|locator]

Each seed (SC-Tune's seed: batches, sampling, adapter init) tunes the same base model on the same
training boxes; the held-out evaluation boxes are fixed. Writes benchmarks/results/sctune_shapes.json
(or sctune_shapes_<tune>.json for ablations): train_domain, domains: {name: {base, tuned}} (tuned
as mean/range over seeds), gain_points (mean/range), per_seed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from seeds import parse_seeds, spread

from refloop.config import load_recipe
from refloop.methods.sctune import schedule
from refloop.methods.sctune_recipe import SCTuneRecipe, run_sctune

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def rollout_throughput(run_dir: Path) -> float | None:
    """Mean captions scored per second over the describer steps (sampling, re-locating, baseline)."""
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["captions_per_second"] for r in rows if "captions_per_second" in r]
    return round(sum(rates) / len(rates), 1) if rates else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "sctune-shapes.yaml"))
    parser.add_argument("--train-domain", default="crowded")
    parser.add_argument("--tune", default="both", choices=["both", "describer", "locator"])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-sctune"))
    parser.add_argument("--seeds", default="0,1,2", help="SC-Tune seeds")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--result", default=None, help="output JSON (default: benchmarks/results/sctune_shapes[_<tune>].json)")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="combine results of runs over other seeds (same model, recipe, base) into --result",
    )
    args = parser.parse_args()
    name = "sctune_shapes.json" if args.tune == "both" else f"sctune_shapes_{args.tune}.json"
    result_path = Path(args.result) if args.result else RESULTS / name
    if args.merge:
        write(result_path, merge([json.loads(Path(m).read_text()) for m in args.merge]))
        return
    os.environ.setdefault("REFLOOP_NO_PROGRESS", "1")
    seeds = parse_seeds(args.seeds)
    overrides = [f"train_data={args.train_domain}", f"sctune.tune={args.tune}", *args.overrides]
    recipe = load_recipe(SCTuneRecipe, Path(args.config), overrides)
    # Ablations reuse the base-model numbers of the full run (same model, same held-out boxes).
    full = RESULTS / "sctune_shapes.json"
    base = None
    if args.tune != "both" and full.exists():
        previous = json.loads(full.read_text())
        if previous["train_domain"] == args.train_domain and previous["eval_boxes"] == recipe.eval_boxes:
            base = {d: v["base"] for d, v in previous["domains"].items()}
    eval_names = [spec.data for spec in recipe.eval_data]
    per_seed = {}
    for seed in seeds:
        seeded = load_recipe(SCTuneRecipe, Path(args.config), [*overrides, f"sctune.seed={seed}"])
        out = Path(args.out) / f"{args.train_domain}-{args.tune}-seed{seed}"
        results = run_sctune(seeded, out, evaluate_base=base is None)  # the base model is greedy: evaluated once
        base = base or results["base"]
        per_seed[seed] = {
            "tuned": results["tuned"],
            "gain_points": {d: round(100 * (results["tuned"][d] - base[d]), 1) for d in eval_names},
            "train_seconds": round(results["train_seconds"], 1),
            "rollout_captions_per_second": rollout_throughput(out),
        }
        print(f"seed {seed}:", json.dumps(per_seed[seed]), flush=True)
    summary = {
        "benchmark": "sctune_shapes",
        "model": recipe.model or "refloop-tiny",
        "train_domain": args.train_domain,
        "tune": args.tune,
        "train_steps": sum(p.steps for p in schedule(recipe.sctune)),
        "train_boxes": results["train_boxes"],
        "eval_boxes": recipe.eval_boxes,
        "base": base,
        "per_seed": per_seed,
        "recipe": recipe.model_dump(),
    }
    write(result_path, summarize(summary))


def summarize(summary: dict) -> dict:
    """Mean, range and per-seed values of the tuned Pr@0.5 and the gains, from `per_seed`."""
    runs, base = summary["per_seed"], summary["base"]
    summary["seeds"] = [int(s) for s in runs]
    summary["train_seconds_per_seed"] = spread([r["train_seconds"] for r in runs.values()])
    summary["domains"] = {d: {"base": base[d], "tuned": spread([r["tuned"][d] for r in runs.values()], 4)} for d in base}
    summary["gain_points"] = {d: spread([r["gain_points"][d] for r in runs.values()]) for d in base}
    return summary


def merge(parts: list[dict]) -> dict:
    """Runs of other seeds on the same model, recipe (up to the seed) and base numbers, as one run."""
    first = parts[0]
    for other in parts[1:]:
        for key in ("model", "train_domain", "tune", "eval_boxes", "base"):
            if other[key] != first[key]:
                raise SystemExit(f"--merge: the runs differ in {key!r}: {first[key]!r} vs {other[key]!r}")
    runs = {}
    for part in parts:
        for seed, run in part["per_seed"].items():
            if seed in runs:
                raise SystemExit(f"--merge: seed {seed} appears twice")
            runs[seed] = run
    merged = {k: v for k, v in first.items() if k not in ("per_seed", "seeds", "domains", "gain_points", "train_seconds_per_seed")}
    merged["per_seed"] = dict(sorted(runs.items(), key=lambda kv: int(kv[0])))
    return summarize(merged)


def write(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("recipe", "per_seed")}, indent=2))


if __name__ == "__main__":
    main()
