"""How noisy SVP (CVQ)'s seed-image queries are (`cvq_source: seed-images`), read from finished
`svp_shapes.py` runs of the seed-image CVQ row: which grounded boxes were false detections (IoU
< 0.5 with every object of the scene) and whether Pink's filter kept them, and how many yes/no
labels taken from the detections are wrong against the scene's objects.

    python benchmarks/svp_cvq_label_noise.py --run DIR_0 --run DIR_1 ... --result FILE

DIR_s: the row's work folder of seed s (`OUT/seedS/grounding_+_S(qp)_+_CVQ_from_seed-image_pairs`);
the oracle's seed is the run's seed (the folder `seedS`), the seed images' style and number are
read from the run's `OUT/settings.json`.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from refloop.boxes import Box, iou_matrix
from refloop.data.sources import load_detections
from refloop.evaluation.pope import build_pope_questions
from refloop.grounding import SceneOracle, shapes_vocabulary
from refloop.grounding.oracle import scene_objects
from refloop.methods.svp import label_set, phrases_for
from refloop.world import TRAIN_SEED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="the seed-image CVQ row's work folder of one seed")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    vocabulary = shapes_vocabulary()
    out = {}
    for run in map(Path, args.run):
        settings = json.loads((run.parent.parent / "settings.json").read_text())
        records = load_detections(settings["domain"], num_images=settings["images"], scene_seed=TRAIN_SEED).records
        by_id = {r.image_id: r for r in records}
        seed = int(re.fullmatch(r"seed(\d+)", run.parent.name).group(1))
        boxes = Counter()
        for line in (run / "cvq" / "bootstrap" / "records.jsonl").read_text().splitlines():
            row = json.loads(line)
            truth = [o.box for o in by_id[row["image_id"]].objects]
            for box in row["boxes"]:
                false = not truth or float(iou_matrix([Box(*box["box"])], truth).max()) < 0.5
                boxes[f"{'false' if false else 'true'} detection, {box['decision']}"] += 1
        oracle = SceneOracle(miss_rate=0.1, false_positive_rate=0.1, jitter=0.05, seed=seed)  # the benchmark's
        detected = []
        for start in range(0, len(records), 64):
            batch = records[start : start + 64]
            asked = [phrases_for("", "categories", vocabulary, label_set(records, vocabulary)) for r in batch]
            found = oracle.ground([r.load_image() for r in batch], asked, records=batch)
            detected += [frozenset(g.labels) for g in found]
        labels = Counter()
        for q in build_pope_questions(records, detected, "random", per_image=1, seed=0, categories=vocabulary.categories):
            present = {f"{o.colour} {o.shape}" for o in scene_objects(by_id[q["image_id"]])}
            labels[f"{q['label']} {'right' if (q['object'] in present) == (q['label'] == 'yes') else 'wrong'}"] += 1
        out[seed] = {"boxes": dict(sorted(boxes.items())), "yes_no_labels": dict(sorted(labels.items()))}
    Path(args.result).write_text(json.dumps({"runs": [str(r) for r in args.run], "per_seed": out}, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
