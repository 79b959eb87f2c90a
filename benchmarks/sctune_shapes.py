"""SC-Tune on the shapes world: Pr@0.5 per domain before and after tuning on one OOD style.

    python benchmarks/sctune_shapes.py [--train-domain crowded] [--tune both|describer|locator]

Writes benchmarks/results/sctune_shapes.json (or sctune_shapes_<tune>.json for ablations):
train_domain, train_seconds, domains: {name: {base, tuned}}.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

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
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    args = parser.parse_args()
    os.environ.setdefault("REFLOOP_NO_PROGRESS", "1")
    overrides = [f"train_data={args.train_domain}", f"sctune.tune={args.tune}", *args.overrides]
    recipe = load_recipe(SCTuneRecipe, Path(args.config), overrides)
    out = Path(args.out) / f"{args.train_domain}-{args.tune}"
    # Ablations reuse the base-model numbers of the full run (same model, same held-out boxes).
    full = RESULTS / "sctune_shapes.json"
    reuse = None
    if args.tune != "both" and full.exists():
        previous = json.loads(full.read_text())
        if previous["train_domain"] == args.train_domain and previous["eval_boxes"] == recipe.eval_boxes:
            reuse = {d: v["base"] for d, v in previous["domains"].items()}
    results = run_sctune(recipe, out, evaluate_base=reuse is None)
    if reuse is not None:
        results["base"] = reuse
    eval_names = [spec.data for spec in recipe.eval_data]
    summary = {
        "benchmark": "sctune_shapes",
        "train_domain": args.train_domain,
        "tune": args.tune,
        "train_seconds": round(results["train_seconds"], 1),
        "train_steps": sum(p.steps for p in schedule(recipe.sctune)),
        "train_boxes": results["train_boxes"],
        "rollout_captions_per_second": rollout_throughput(out),
        "eval_boxes": recipe.eval_boxes,
        "domains": {d: {"base": results["base"][d], "tuned": results["tuned"][d]} for d in eval_names},
        "gain_points": {d: round(100 * (results["tuned"][d] - results["base"][d]), 1) for d in eval_names},
        "recipe": recipe.model_dump(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "sctune_shapes.json" if args.tune == "both" else f"sctune_shapes_{args.tune}.json"
    (RESULTS / name).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "recipe"}, indent=2))


if __name__ == "__main__":
    main()
