"""What SVP's selection trains on, read from the samples an `svp_shapes.py` run wrote: for the
prior captions z_p, every guided caption z ~ q(z|c,g) and the top 10% selected by the score, the
object mentions per caption, the share of mentioned objects the scene does not hold (CHAIR_i's
numerator over its denominator, per caption set), the share of the scenes' objects named (object
recall, per caption set), how many hallucinations name a false positive the grounder put in the
caption's context, and within each image how the score goes with the guided captions' recall.

    python benchmarks/svp_selection_hallucination.py --run runs/bench-svp [--seeds 0,1,2] [--rows "ROW;ROW"]

Writes benchmarks/results/svp_selection_hallucination.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

from seeds import parse_seeds
from svp_shapes import tag_of

from refloop.data.sources import load_detections
from refloop.evaluation.object_metrics import object_mentions
from refloop.evaluation.synonyms import shapes_table
from refloop.grounding.oracle import scene_objects
from refloop.world import TRAIN_SEED

RESULTS = Path(__file__).parent / "results"
TABLE = shapes_table()  # the object reader CHAIR_i and recall use on the shapes world


def objects_named(text: str) -> set[str]:
    return object_mentions(text, TABLE)


def caption_sets(samples: Path, truth: dict) -> dict:
    counts: Counter = Counter()
    correlations = []  # per image: Pearson's r of the score and the caption's object recall over its guided captions
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        present = truth[row["image_id"]]
        for caption in row["prior"]:
            named = objects_named(caption)
            counts.update(
                {
                    "prior/captions": 1,
                    "prior/mentions": len(named),
                    "prior/hallucinated": len(named - present),
                    "prior/recalled": len(named & present),
                    "prior/present": len(present),
                }
            )
        usable = [j for j, d in enumerate(row["degenerate"]) if not d]
        scores = [row["scores"][j] for j in usable]
        recalls = [len(objects_named(row["guided"][j]) & present) / max(1, len(present)) for j in usable]
        if len(set(scores)) > 1 and len(set(recalls)) > 1:
            correlations.append(statistics.correlation(scores, recalls))
        for j, (caption, context, degenerate) in enumerate(zip(row["guided"], row["contexts"], row["degenerate"])):
            if degenerate:
                continue
            named, false_positives = objects_named(caption), objects_named(context) - present
            for part in ("guided", "selected") if j in row["selected"] else ("guided",):
                counts.update(
                    {
                        f"{part}/captions": 1,
                        f"{part}/mentions": len(named),
                        f"{part}/hallucinated": len(named - present),
                        f"{part}/recalled": len(named & present),
                        f"{part}/present": len(present),
                        f"{part}/hallucinated_named_by_a_context_false_positive": len((named - present) & false_positives),
                        f"{part}/context_false_positives": len(false_positives),
                    }
                )
    out = {}
    for part in ("prior", "guided", "selected"):
        n, mentions, hallucinated = counts[f"{part}/captions"], counts[f"{part}/mentions"], counts[f"{part}/hallucinated"]
        if not n or not mentions:
            raise SystemExit(f"{samples}: no {part} caption names an object")
        out[part] = {
            "captions": n,
            "objects_per_caption": round(mentions / n, 2),
            "hallucinated_share": round(100 * hallucinated / mentions, 1),
            "object_recall": round(100 * counts[f"{part}/recalled"] / max(1, counts[f"{part}/present"]), 1),  # of the scenes' objects
        }
        if part != "prior":
            out[part] |= {
                "context_false_positives_per_caption": round(counts[f"{part}/context_false_positives"] / n, 2),
                "hallucinated_named_by_a_context_false_positive": round(
                    100 * counts[f"{part}/hallucinated_named_by_a_context_false_positive"] / max(1, hallucinated), 1
                ),
            }
    out["score_recall_correlation"] = {  # None: every image's scores tie (the unscored row)
        "mean_within_image": round(statistics.mean(correlations), 3) if correlations else None,
        "images": len(correlations),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the --out directory of a benchmarks/svp_shapes.py run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", default="grounding + S(q,p);grounding, no scoring", help="semicolon-separated rows of the run")
    parser.add_argument("--images", type=int, default=200, help="the run's seed images (its --images)")
    parser.add_argument("--result", default=str(RESULTS / "svp_selection_hallucination.json"))
    args = parser.parse_args()
    settings = Path(args.run) / "settings.json"  # the run's seed-image style (runs before --domain: wild)
    domain = json.loads(settings.read_text()).get("domain", "wild") if settings.is_file() else "wild"
    records = load_detections(domain, num_images=args.images, scene_seed=TRAIN_SEED).records
    truth = {r.image_id: {f"{o.colour} {o.shape}" for o in scene_objects(r)} for r in records}
    rows = {
        row: {
            seed: caption_sets(Path(args.run) / tag_of(seed, row) / "iteration-1" / "samples.jsonl", truth)
            for seed in parse_seeds(args.seeds)
        }
        for row in args.rows.split(";")
    }
    summary = {"benchmark": "svp_selection_hallucination", "run": args.run, "domain": domain, "seed_images": args.images, "rows": rows}
    Path(args.result).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
