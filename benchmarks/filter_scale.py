"""`refloop filter` (SC-Tune appendix 9) at Objects365 scale, with no image files on disk.

    python benchmarks/filter_scale.py [--images 200000 --boxes 2000000 --categories 365 --seed 0]
                                      [--repeats 2] [--reference b9eac17]

Generates (seeded, once, under runs/filter_scale/, not committed) a COCO-style detection JSON
shaped like Objects365: 640x480-ish images in nested patch folders that do not exist, a
long-tailed category distribution with a few categories per image (so most images repeat one),
boxes of log-uniform size, a few crowd boxes and boxes leaving the image (clipped), float
coordinates. Then runs `refloop filter` in a fresh process and records its wall seconds, peak RSS
(ru_maxrss of that child), images/boxes in, triplets/boxes kept, the per-rule counts and the
sha256 of the triplets file; `--reference REV` also times an older revision's filter path on
the same file (from `git archive`) and checks it writes the same bytes. Writes
benchmarks/results/filter_scale.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (512, 512), (800, 600), (1024, 768), (768, 1024)]
SIZE_P = [0.34, 0.14, 0.16, 0.06, 0.06, 0.1, 0.1, 0.04]


def generate(path: Path, num_images: int, num_boxes: int, num_categories: int, seed: int) -> dict:
    """Write the detection JSON by streaming text (the file is ~100 bytes per box)."""
    rng = np.random.default_rng(seed)
    # boxes per image: at least one, long-tailed (a few crowded images with 50-150 boxes)
    weights = rng.gamma(0.8, size=num_images)
    per_image = 1 + rng.multinomial(num_boxes - num_images, weights / weights.sum())
    sizes = rng.choice(len(SIZES), size=num_images, p=SIZE_P)
    popularity = 1.0 / np.arange(1, num_categories + 1) ** 1.1  # Zipf-like: person, car, chair ... then the long tail
    popularity /= popularity.sum()
    tmp = path.with_suffix(".tmp")
    ann_id = 1
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "synthetic Objects365-shaped detections (refloop benchmark)"}, "images": [')
        for i in range(num_images):
            w, h = SIZES[sizes[i]]
            sep = ", " if i else ""
            f.write(f'{sep}{{"id": {i + 1}, "file_name": "images/v2/patch{i % 51}/objects365_v2_{i + 1:08d}.jpg", ')
            f.write(f'"width": {w}, "height": {h}, "license": {i % 8 + 1}}}')
        f.write('], "annotations": [')
        for i in range(num_images):
            w, h = SIZES[sizes[i]]
            n = int(per_image[i])
            present = rng.choice(num_categories, size=min(n, 1 + rng.poisson(1.5)), replace=False, p=popularity)
            cats = present[rng.integers(0, len(present), size=n)] + 1
            bw = w * np.exp(rng.uniform(np.log(0.03), np.log(0.7), size=n))
            bh = np.minimum(bw * np.exp(rng.normal(0.0, 0.5, size=n)), h * 0.95)
            x = rng.uniform(0, 1, size=n) * (w - bw)
            y = rng.uniform(0, 1, size=n) * (h - bh)
            outside = rng.random(n) < 0.01  # annotator boxes a pixel or two past the border: clipped
            bw = np.where(outside, w - x + rng.uniform(0.5, 3.0, size=n), bw)
            crowd = rng.random(n) < 0.01
            x, y, bw, bh = (np.round(v, 2).tolist() for v in (x, y, bw, bh))
            for j in range(n):
                sep = ", " if ann_id > 1 else ""
                f.write(
                    f'{sep}{{"id": {ann_id}, "image_id": {i + 1}, "category_id": {int(cats[j])}, '
                    f'"bbox": [{x[j]}, {y[j]}, {bw[j]}, {bh[j]}], "area": {round(bw[j] * bh[j], 2)}, '
                    f'"iscrowd": {int(crowd[j])}, "isfake": 0}}'
                )
                ann_id += 1
        f.write('], "categories": [')
        f.write(
            ", ".join(json.dumps({"id": c + 1, "name": f"category {c + 1:03d}", "supercategory": "thing"}) for c in range(num_categories))
        )
        f.write("]}\n")
    os.replace(tmp, path)
    return {"images": num_images, "boxes": ann_id - 1, "categories": num_categories, "bytes": path.stat().st_size}


# The same function path in an older checkout, whose `refloop filter` checked every image (and so
# failed without them): load_coco without the image check, sctune_triplets, the JSONL writer.
REFERENCE = """
import json, sys
from pathlib import Path
from refloop.data.filters import sctune_triplets
from refloop.data.jsonl import JsonlWriter
from refloop.data.loaders import load_coco
records, report = load_coco(Path(sys.argv[1]), verify_images=False)
triplets, counts = sctune_triplets(records)
with JsonlWriter(Path(sys.argv[2]), key="image_id", resume=False) as writer:
    writer.write_many(t.to_json() for t in triplets)
print(json.dumps(counts.as_dict() | {"skipped_records": report.skipped}))
"""


def run_filter(detections: Path, out: Path, reference_src: Path | None = None) -> dict:
    """`refloop filter` (or, with `reference_src`, the older code's filter path) in a fresh
    process; its own peak RSS from wait4."""
    log = out.with_suffix(".stdout")
    env = os.environ | {"COLUMNS": "200"}
    if reference_src is None:
        cmd = [sys.executable, "-m", "refloop.cli", "filter", str(detections), "--out", str(out)]
    else:
        cmd = [sys.executable, "-c", REFERENCE, str(detections), str(out)]
        env["PYTHONPATH"] = str(reference_src)
    if out.exists():
        out.unlink()
    started = time.perf_counter()
    with open(log, "w") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{stderr}")
    text = log.read_text()
    summary = json.loads(text[text.index("{") : text.rindex("}") + 1])
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    peak_kb = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1), "counts": summary, "triplets_sha256": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--boxes", type=int, default=2_000_000)
    parser.add_argument("--categories", type=int, default=365)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "filter_scale")
    parser.add_argument("--repeats", type=int, default=1, help="filter runs; the fastest is reported")
    parser.add_argument("--results", type=Path, default=RESULTS / "filter_scale.json")
    parser.add_argument("--reference", metavar="GIT_REV", help="also time this older revision's filter path (e.g. b9eac17)")
    args = parser.parse_args()

    args.work_dir.mkdir(parents=True, exist_ok=True)
    detections = args.work_dir / f"objects365-like-i{args.images}-b{args.boxes}-c{args.categories}-s{args.seed}.json"
    if not detections.exists():
        started = time.perf_counter()
        data = generate(detections, args.images, args.boxes, args.categories, args.seed)
        print(f"generated {detections} ({data['bytes'] / 2**20:.0f} MB) in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    assert not (args.work_dir / "images").exists(), "the benchmark runs without image files"
    runs = [run_filter(detections, args.work_dir / "triplets.jsonl") for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["seconds"])
    reference = None
    if args.reference:
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.reference, "src/refloop"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            old = min(
                (run_filter(detections, args.work_dir / "triplets-reference.jsonl", Path(tmp) / "src") for _ in range(args.repeats)),
                key=lambda r: r["seconds"],
            )
        reference = {
            "revision": args.reference,
            "path": "load_coco(verify_images=False) -> ImageRecords -> sctune_triplets (its CLI checked every image, so failed here)",
            "seconds": old["seconds"],
            "peak_rss_mb": old["peak_rss_mb"],
            "same_triplets": old["triplets_sha256"] == best["triplets_sha256"],
            "same_counts": old["counts"] == best["counts"],
            "speedup": round(old["seconds"] / best["seconds"], 2),
        }
    counts = best["counts"]
    result = {
        "benchmark": "filter_scale",
        "command": "refloop filter DETECTIONS.json --out TRIPLETS.jsonl (no image files on disk)",
        "cpu": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "input": {
            "images": args.images,
            "boxes": args.boxes,
            "categories": args.categories,
            "seed": args.seed,
            "json_mb": round(detections.stat().st_size / 2**20, 1),
        },
        "seconds": best["seconds"],
        "seconds_all_runs": [r["seconds"] for r in runs],
        "peak_rss_mb": best["peak_rss_mb"],
        "images_in": counts["images_in"],
        "boxes_in": args.boxes,
        "triplets_kept": counts["triplets_kept"],
        "boxes_kept": counts["boxes_kept"],
        "images_kept": counts["images_kept"],
        "rules": {
            k: counts[k] for k in ("images_without_repeats", "triplets_considered", "dropped_overlap", "dropped_small", "images_excluded")
        },
        "skipped_records": counts["skipped_records"],
        "triplets_sha256": best["triplets_sha256"],
    }
    if reference:
        result["before"] = reference
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
