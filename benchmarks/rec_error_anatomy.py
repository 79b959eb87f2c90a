"""Where the packaged model's REC fails, per image style: which expressions it misses and what it
points at instead. Planning data for the next base model (issue 20): a world or pretraining change
is worth its two sessions of runs only if it removes errors the unmet targets are made of.

    python benchmarks/rec_error_anatomy.py [--images 300] [--seed 7]

Scenes of the validation seed (7; never an evaluation split), every (object, expression) pair,
the base model, greedy. Expressions are split by whether they hold a size word (small / large,
absolute per style in this world) and a spatial word (left / right / top / bottom). A wrong answer
is one of: unparseable (no box in the answer's format), a box on no object (IoU < 0.5 with every
object), or a box on another object that lacks a colour or shape the expression names, lacks only
its size word, or has every attribute named (the spatial word misread, or an attribute left out
taken as unique). Writes
benchmarks/results/rec_error_anatomy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from refloop.boxes import Box
from refloop.data.sources import load_data, load_detections
from refloop.evaluation.referring import evaluate_rec
from refloop.models import load_vlm

RESULTS = Path(__file__).parent / "results"
STYLES = ("in-domain", "crowded", "wild")
SIZE_WORDS, SPATIAL_WORDS = {"small", "large"}, {"left", "right", "top", "bottom"}


def attributes(obj) -> frozenset[str]:
    """An object's size, colour and shape, from the scene's COCO export (every object, also those
    no expression can single out)."""
    return frozenset({obj.attributes["size"], obj.attributes["colour"], obj.category})


def anatomy(scenes, rows) -> dict:
    objects = {str(r.image_id): r.objects for r in scenes}
    by_kind: dict[str, list[int]] = {}
    errors: Counter = Counter()
    for row in rows:
        words = set(row["expression"].split())
        kind = ("size" if words & SIZE_WORDS else "no size") + " + " + ("spatial" if words & SPATIAL_WORDS else "no spatial")
        right = row["iou"] is not None and row["iou"] >= 0.5
        for key in (kind, "all"):
            by_kind.setdefault(key, [0, 0])[0] += right
            by_kind[key][1] += 1
        if right:
            continue
        if row["predicted_box"] is None:
            errors["unparseable"] += 1
            continue
        image, ann = row["id"].split(":")[:2]
        scene = objects[image]
        target = next(o for o in scene if str(o.ann_id) == ann)
        predicted = Box(*row["predicted_box"])
        hit = max(scene, key=lambda o: predicted.iou(o.box))
        if predicted.iou(hit.box) < 0.5:
            errors["box on no object"] += 1
            continue
        named = (attributes(target) - attributes(hit)) & words  # words the expression names that the object hit lacks
        if not named:
            errors["another object matching every word named but the spatial one"] += 1
        elif named <= SIZE_WORDS:
            errors["another object, of another size than named"] += 1
        else:
            errors["another object, of another colour or shape than named"] += 1
    total = by_kind["all"][1]
    return {
        "pairs": total,
        "accuracy": {k: {"acc": round(100 * a / n, 1), "pairs": n} for k, (a, n) in sorted(by_kind.items())},
        "errors_percent_of_pairs": {k: round(100 * n / total, 1) for k, n in errors.most_common()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="validation scenes per style")
    parser.add_argument("--seed", type=int, default=7, help="scene seed (7: the validation split of the benchmarks)")
    parser.add_argument("--out", default=str(RESULTS / "rec_error_anatomy.json"))
    args = parser.parse_args()
    os.environ.setdefault("REFLOOP_NO_PROGRESS", "1")
    vlm = load_vlm(None, batch_size=160)
    result = {"benchmark": "rec_error_anatomy", "model": "refloop-tiny", "seed": args.seed, "images": args.images, "styles": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for style in STYLES:
            records = load_data(style, num_images=args.images, seed=args.seed)[0]
            evaluate_rec(vlm, records, Path(tmp) / style, overwrite=True)
            rows = [json.loads(line) for line in (Path(tmp) / style / "rec_samples.jsonl").read_text().splitlines()]
            scenes = load_detections(style, num_images=args.images, scene_seed=args.seed).records
            result["styles"][style] = anatomy(scenes, rows)
            print(style, json.dumps(result["styles"][style]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
