"""Pink's self-consistent bootstrapping on the shapes world, in the layout of Pink Table 1
(zero-shot REC on RefCOCO val after instruction tuning on Objects365 pairs: filtered 77.0 vs
unfiltered 73.8, base 54.1) and Table 5 (what was kept).

    python benchmarks/pink_shapes.py [--seeds 0,1,2] [--train-domain wild] [--model M]
        [--epochs E] [--validation-seed 7]

The analogue, fixed before any recipe was tuned:
- zero-shot split (RefCOCO val's role): REC on the grammar's expressions of held-out `wild` scenes
  (evaluation seed; with --validation-seed, another seed's: settings are chosen there), a style the
  base model never saw in any task; it never trained REC there.
- bootstrap source (Objects365's role: detections without expressions): the text-free boxes of
  `wild` training scenes (scene seed TRAIN_SEED + 100 s for seed s, never the evaluation seed).
1. The model bootstraps referring pairs from those boxes (the grammar's expressions are read only
   to score uniqueness, never by the model or the SFT data).
2. The same model is instruction-tuned (LoRA on both towers, visual grounding + grounding caption in
   the family's own prompts) on (a) the kept pairs and (b) every pair unfiltered, same steps and seed
   (with --epochs, the same number of passes over each arm's own examples, as Pink's 6-epoch stage 2).
   A third arm, refloop's variant beyond Pink: (c) the pairs kept when each box gets K descriptions
   (greedy + K-1 sampled, the most consistent passing one kept; `refloop bootstrap --samples K`).
3. REC acc@0.5 of base, (a), (b) and (c) on held-out `in-domain`, `crowded` and `wild` referring data.
Every effect is reported as mean, range and per-seed values over the seeds (SFT seed = adapter
init and data order; training scenes). Also: keep rate and grammar-unique share of kept vs
rejected expressions for Pink (K=1) and, on the first seed, with K samples and the distractor
check; bootstrapping boxes/s batched vs one box at a time.

Writes benchmarks/results/pink_shapes.json (--result; required with --validation-seed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from seeds import parse_seeds, scene_split, spread

from refloop.boxes import iou_matrix
from refloop.data.rc import build_rc_data, load_rc_data
from refloop.data.records import ImageRecord
from refloop.data.sources import load_data, load_detections
from refloop.evaluation.referring import evaluate_rec
from refloop.grounding.oracle import scene_objects
from refloop.methods.pink import KEPT, SKIPPED, BootstrapConfig, bootstrap, choose, rejection
from refloop.models import load_vlm
from refloop.training.adapters import LoraSettings
from refloop.training.sft import SFT, SFTConfig
from refloop.world import COLOURS, DOMAINS, EVAL_SEED, SHAPES, SIZES, TRAIN_SEED

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
# The zero-shot split (Pink Table 1's RefCOCO val): held-out `wild` scenes, a style the base model
# never saw in any task, REC on the grammar's expressions. Fixed before any recipe was tuned.
ZERO_SHOT = "wild"
PAPER_TABLE1 = {"unfiltered (Object365 pairs, dagger)": 73.8, "filtered (Object365 pairs)": 77.0}  # RefCOCO val, Pink Table 1
TABLE5_KEYS = (
    "images",
    "referring_expressions",
    "avg_expression_length",
    "boxes_considered",
    "kept",
    "rejected",
    "rejected_by_reason",
    "keep_rate",
    "mean_iou",
    "grammar_unique",
    "boxes_per_second",
)
GROUNDING_TASKS = ["visual-grounding", "grounding-caption"]


def candidate_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "candidates.jsonl").read_text().splitlines() if line.strip()]


def pair_records(rows: list[dict], records: list[ImageRecord], kept_only: bool) -> list[ImageRecord]:
    """The images' boxes with one expression each: the kept pairs (a), or every described box's
    greedy description unfiltered (b), with the annotated box (never the located one), as Pink."""
    chosen: dict[object, dict[object, str]] = defaultdict(dict)
    for row in rows:
        if row["decision"] == SKIPPED or not row["expression"].strip():
            continue
        if (kept_only and row["chosen"] and row["decision"] == KEPT) or (not kept_only and row["sample"] == 0):
            chosen[row["image_id"]][row["ann_id"]] = row["expression"]
    out = []
    for record in records:
        named = chosen.get(record.image_id, {})
        if named:
            objects = tuple(replace(o, expressions=(named[o.ann_id],) if o.ann_id in named else ()) for o in record.objects)
            out.append(replace(record, objects=objects))
    return out


def redecide(rows: list[dict], distractor_check: bool, lam: float) -> dict:
    """Keep rate and grammar-unique shares when the recorded candidates are decided again with
    or without the distractor rule (the rule reads only what every candidate records)."""
    cfg = BootstrapConfig(iou_lambda=lam, distractor_check=distractor_check)
    boxes: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["decision"] != SKIPPED:
            boxes[(row["image_id"], row["ann_id"])].append(row)
    kept = unique_kept = rejected = unique_rejected = 0
    for candidates in boxes.values():
        for c in candidates:
            c["reason"] = rejection(c["expression"], c["iou"] >= lam, c["iou"], c["distractor_iou"], cfg)
        best = candidates[choose(candidates)]
        if best["reason"] is None:
            kept += 1
            unique_kept += bool(best["grammar_unique"])
        else:
            rejected += 1
            unique_rejected += bool(best["grammar_unique"])
    n = kept + rejected
    return {
        "boxes": n,
        "keep_rate": kept / n,
        "grammar_unique_kept": unique_kept / kept if kept else None,
        "grammar_unique_rejected": unique_rejected / rejected if rejected else None,
    }


def attribute_errors(rows: list[dict], records: list[ImageRecord]) -> dict:
    """Share of the chosen descriptions, kept vs rejected, that name a colour, shape or size the
    target does not have (read from the regenerated scene): what a self-consistency filter can
    miss when the locator ignores the wrong word."""
    truth = {}
    for record in records:
        for obj, scene_obj in zip(record.objects, _by_box(record)):
            truth[(record.image_id, obj.ann_id)] = scene_obj
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        if row["decision"] == SKIPPED or not row["chosen"]:
            continue
        target, words = truth[(row["image_id"], row["ann_id"])], row["expression"].split()
        wrong = {
            "colour": any(w in COLOURS and w != target.colour for w in words),
            "shape": any(w in SHAPES and w != target.shape for w in words),
            "size": any(w in SIZES and w != target.size for w in words),
        }
        side = counts[row["decision"]]
        side["n"] += 1
        for k, v in wrong.items():
            side[k] += v
        side["any"] += any(wrong.values())
    return {d: {k: round(v / c["n"], 3) for k, v in c.items() if k != "n"} | {"n": c["n"]} for d, c in counts.items()}


def _by_box(record: ImageRecord) -> list:
    """The scene object of each annotation: the one its box overlaps most."""
    objects = scene_objects(record)
    overlap = iou_matrix([o.box for o in record.objects], [o.box for o in objects])
    return [objects[j] for j in overlap.argmax(1)]


def tune(
    vlm,
    records: list[ImageRecord],
    work: Path,
    steps: int | None,
    cfg: SFTConfig,
    history: list | None = None,
    history_ratio: float = 0.0,
    epochs: float | None = None,
) -> tuple[object, dict]:
    """LoRA SFT for exactly `steps` steps on the grounding tasks of `records`, native prompts; or,
    with `epochs`, that many passes over the arm's own examples (Pink trains its stage-2 mixture for
    6 epochs, so an arm with more pairs takes more steps).

    `history_ratio` > 0 mixes in the training history as Pink's stage 2 does (its bootstrapped
    Objects365 pairs are sampled at a reduced rate among the datasets the model already trained
    on): that share of the examples is drawn from `history` (the same pool and seed for every arm)."""
    shutil.rmtree(work, ignore_errors=True)  # a benchmark starts from scratch
    data = work / "rc.jsonl"
    counts = build_rc_data(records, data, GROUNDING_TASKS, vlm.profile, seed=0, max_per_image=None, native=True)
    examples = load_rc_data(data)
    if history_ratio > 0:
        count = min(len(history), round(history_ratio / (1 - history_ratio) * len(examples)))
        examples = examples + random.Random(cfg.seed).sample(history, count)
        counts = counts | {"history": count}
    if epochs is not None:
        steps = max(1, round(epochs * len(examples) / cfg.batch_size))
    cfg = cfg.model_copy(update={"epochs": steps * cfg.batch_size / len(examples)})
    tuner = SFT(vlm, cfg, examples)
    started = time.perf_counter()
    tuner.run(work / "train")
    assert tuner.total_steps == steps, (tuner.total_steps, steps)
    return tuner, {
        "examples": counts,
        "steps": steps,
        "epochs": round(cfg.epochs, 2),
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def history_examples(profile, images: int, work: Path) -> list:
    """The training history: the grounding tasks on in-domain training scenes with the grammar's
    expressions (the data the base model was pretrained on; Visual Genome's role in Pink)."""
    records = load_detections("in-domain", num_images=images).records
    counts = build_rc_data(records, work / "history.jsonl", GROUNDING_TASKS, profile, seed=0, max_per_image=None, native=True)
    assert sum(counts.values()) > 0, counts
    return load_rc_data(work / "history.jsonl")


def rec_table(vlm, out: Path, eval_records: dict[str, list[ImageRecord]], limit: int) -> dict[str, float]:
    return {
        d: round(100 * evaluate_rec(vlm, recs, out / d, limit=limit, overwrite=True)["rec_accuracy"], 1) for d, recs in eval_records.items()
    }


def throughput(args, records: list[ImageRecord], out: Path) -> dict:
    """Bootstrapping boxes/s on the same images: batched (images and their boxes together) vs one
    box at a time (batch 1: a describe then a locate call per box, as the authors' release runs)."""
    subset = records[: args.throughput_images]
    result = {"images": len(subset)}
    for name, batch in (("one_box_at_a_time", 1), ("batched", 64)):
        vlm = load_vlm(args.model, batch_size=batch)
        cfg = BootstrapConfig.shapes(batch_size=batch)
        started = time.perf_counter()
        stats = bootstrap(vlm, subset, out / f"throughput-{name}", cfg, data=args.train_domain, overwrite=True, write_report=False)
        result[name] = {"boxes": stats["boxes_considered"], "seconds": round(time.perf_counter() - started, 2)}
        result[name]["boxes_per_second"] = round(result[name]["boxes"] / result[name]["seconds"], 1)
        result[name]["keep_rate"] = stats["keep_rate"]
    result["speedup"] = round(result["batched"]["boxes_per_second"] / result["one_box_at_a_time"]["boxes_per_second"], 2)
    return result


BASE, UNFILTERED, FILTERED = "base", "+ pairs, unfiltered", "+ pairs, filtered (Pink)"
# refloop's variant beyond Pink: greedy + K-1 sampled descriptions per box, the most consistent
# passing one kept (`refloop bootstrap --samples K`), same filter, same SFT.
FILTERED_K = "+ pairs, filtered, K samples (refloop)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="packaged model name or checkpoint directory (default: refloop-tiny)")
    parser.add_argument("--train-domain", default="wild", help="style whose text-free training boxes are bootstrapped")
    parser.add_argument("--train-images", type=int, default=400, help="training scenes bootstrapped per seed")
    parser.add_argument("--seeds", default="0,1,2", help="seeds: SFT seed (adapter init, data order) and training scenes")
    parser.add_argument("--samples", type=int, default=4, help="K of the 'K samples' rows (first seed only)")
    parser.add_argument("--steps", type=int, default=None, help="SFT steps of both arms (default 300)")
    parser.add_argument(
        "--epochs", type=float, default=None, help="instead of --steps: each arm trains this many epochs of its own examples (Pink: 6)"
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="SFT learning rate of both arms")
    parser.add_argument("--eval-images", type=int, default=300, help="held-out scenes per domain")
    parser.add_argument("--validation-seed", type=int, default=None, help="evaluate on this seed's scenes (a validation split)")
    parser.add_argument("--rec-limit", type=int, default=600, help="REC (expression, box) pairs per domain")
    parser.add_argument(
        "--history-ratio", type=float, default=0.0, help="share of each arm's SFT examples from the training history (Pink stage 2)"
    )
    parser.add_argument("--history-images", type=int, default=1000, help="in-domain training scenes of the history pool")
    parser.add_argument("--k-arm", type=int, default=0, help="1: also bootstrap with K samples and tune an arm on its kept pairs")
    parser.add_argument("--throughput-images", type=int, default=24, help="0: skip the throughput rows")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-pink"))
    parser.add_argument("--result", default=None, help="default: benchmarks/results/pink_shapes.json (required with --validation-seed)")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    if not 0 <= args.history_ratio < 1:
        raise SystemExit(f"--history-ratio {args.history_ratio}: a share in [0, 1)")
    if args.epochs is not None and (args.epochs <= 0 or args.steps is not None):
        raise SystemExit(f"--epochs {args.epochs}: must be > 0, and not given with --steps")
    if args.epochs is None and args.steps is None:
        args.steps = 300
    # Seed TRAIN_SEED's scenes trained the base model (and fill the history pool); TRAIN_SEED + 100 s
    # are the bootstrap scenes of seed s; EVAL_SEED's are the evaluation split.
    split = scene_split(args.validation_seed, EVAL_SEED, {TRAIN_SEED} | {TRAIN_SEED + 100 * s for s in seeds})
    if args.validation_seed is not None and args.result is None:
        raise SystemExit("--validation-seed: give --result too (a validation run must not replace the evaluation results)")
    args.result = args.result or str(RESULTS / "pink_shapes.json")
    os.environ.setdefault("REFLOOP_NO_PROGRESS", "1")
    torch.set_num_threads(int(os.environ.get("REFLOOP_THREADS", "2")))
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # every number from this run
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        print(f"{name}: {timings[name]} s", flush=True)
        return time.perf_counter()

    t = time.perf_counter()
    # The evaluation split is fixed (held-out scenes of the evaluation seed), whatever the seed; with
    # --validation-seed, held-out scenes of that seed instead (settings are chosen there).
    eval_records = {d: load_data(d, num_images=args.eval_images, seed=split)[0] for d in DOMAINS}
    vlm = load_vlm(args.model, batch_size=64)
    # Pink adapts the vision tower too (Sec. 3.1): LoRA on both towers.
    lora = LoraSettings(r=16, alpha=32, dropout=0.0, vision_tower=True)
    sft = SFTConfig(batch_size=32, lr=args.lr, lora=lora, checkpoint_every=10_000, generation_batch_size=64)
    base_rec = rec_table(vlm, out / "rec-base", eval_records, args.rec_limit)
    t = lap("rec_base", t)
    history = history_examples(vlm.profile, args.history_images, out) if args.history_ratio > 0 else None

    per_seed, variants, bootstrap_stats, sampled_stats, attributes, records = {}, {}, {}, {}, {}, []
    for seed in seeds:
        # Training scenes of seed s: the world's scene seed TRAIN_SEED + 100 s (never EVAL_SEED).
        records = load_detections(args.train_domain, num_images=args.train_images, scene_seed=TRAIN_SEED + 100 * seed).records
        run = out / f"seed{seed}"
        # Table 5: bootstrapping, Pink's settings (greedy, lambda = 0.5).
        pink = bootstrap(vlm, records, run / "bootstrap-pink", BootstrapConfig.shapes(), data=args.train_domain, overwrite=True)
        t = lap(f"seed{seed} bootstrap", t)
        pink_rows = candidate_rows(run / "bootstrap-pink")
        bootstrap_stats[seed] = {k: pink[k] for k in TABLE5_KEYS}
        attributes[seed] = attribute_errors(pink_rows, records)
        arm_data = {UNFILTERED: (pink_rows, False, "all"), FILTERED: (pink_rows, True, "kept")}
        if seed == seeds[0] or args.k_arm:  # K samples: keep rates on the first seed; the K arm's pairs on every seed
            sampled = bootstrap(
                vlm,
                records,
                run / "bootstrap-k",
                BootstrapConfig.shapes(samples=args.samples),
                data=args.train_domain,
                overwrite=True,
                write_report=False,
            )
            t = lap(f"seed{seed} bootstrap_k_samples", t)
            sampled_rows = candidate_rows(run / "bootstrap-k")
            sampled_stats[seed] = {k: sampled[k] for k in TABLE5_KEYS}
        if args.k_arm:
            arm_data[FILTERED_K] = (sampled_rows, True, "kept-k")
        if seed == seeds[0]:
            variants = {
                "pink (K=1)": redecide(pink_rows, False, 0.5),
                "K=1 + distractor check": redecide(pink_rows, True, 0.5),
                f"K={args.samples}": redecide(sampled_rows, False, 0.5),
                f"K={args.samples} + distractor check": redecide(sampled_rows, True, 0.5),
            }
            assert abs(variants["pink (K=1)"]["keep_rate"] - pink["keep_rate"]) < 1e-9
            assert abs(variants[f"K={args.samples}"]["keep_rate"] - sampled["keep_rate"]) < 1e-9
        # Table 1: SFT on filtered vs unfiltered pairs, same steps (or epochs) and seed; REC on held-out data.
        rec, arms = {BASE: base_rec}, {}
        for name, (rows, kept_only, tag) in arm_data.items():
            tuned, info = tune(
                load_vlm(args.model, batch_size=64),
                pair_records(rows, records, kept_only),
                run / f"sft-{tag}",
                args.steps,
                sft.model_copy(update={"seed": seed}),
                history,
                args.history_ratio,
                args.epochs,
            )
            t = lap(f"seed{seed} sft {name}", t)
            rec[name] = rec_table(tuned.policy, run / f"rec-{tag}", eval_records, args.rec_limit)
            t = lap(f"seed{seed} rec {name}", t)
            arms[name] = info
        per_seed[seed] = {"rec_accuracy": rec, "sft_arms": arms}
        print(f"seed {seed}:", json.dumps(rec), flush=True)

    def effect(fn) -> dict:
        return spread([fn(per_seed[s]["rec_accuracy"]) for s in seeds])

    zs = ZERO_SHOT
    targets = {
        "zero_shot_split": zs,
        "filtered_minus_unfiltered_zero_shot": effect(lambda r: r[FILTERED][zs] - r[UNFILTERED][zs]),
        "filtered_minus_base_zero_shot": effect(lambda r: r[FILTERED][zs] - r[BASE][zs]),
        "in_domain_change_filtered": effect(lambda r: r[FILTERED]["in-domain"] - r[BASE]["in-domain"]),
        "filtered_minus_unfiltered_crowded": effect(lambda r: r[FILTERED]["crowded"] - r[UNFILTERED]["crowded"]),
        "filtered_minus_base_crowded": effect(lambda r: r[FILTERED]["crowded"] - r[BASE]["crowded"]),
    }
    if args.k_arm:  # refloop's K-sample variant, reported beside Pink's rows (the targets below read Pink's)
        targets |= {
            "filtered_k_minus_unfiltered_zero_shot": effect(lambda r: r[FILTERED_K][zs] - r[UNFILTERED][zs]),
            "filtered_k_minus_base_zero_shot": effect(lambda r: r[FILTERED_K][zs] - r[BASE][zs]),
            "in_domain_change_filtered_k": effect(lambda r: r[FILTERED_K]["in-domain"] - r[BASE]["in-domain"]),
        }
    targets["met"] = (
        targets["filtered_minus_unfiltered_zero_shot"]["mean"] >= 3
        and targets["filtered_minus_unfiltered_zero_shot"]["min"] > 0
        and targets["filtered_minus_base_zero_shot"]["mean"] >= 5
        and targets["filtered_minus_base_zero_shot"]["min"] > 0
        and abs(targets["in_domain_change_filtered"]["mean"]) <= 1
    )
    mean_rec = {
        arm: {d: spread([per_seed[s]["rec_accuracy"][arm][d] for s in seeds]) for d in DOMAINS}
        for arm in (BASE, UNFILTERED, FILTERED) + ((FILTERED_K,) if args.k_arm else ())
    }
    speed = None
    if args.throughput_images:
        timings["throughput_start"] = round(time.perf_counter() - started, 1)
        speed = throughput(args, records, out)
        lap("throughput", t)
    summary = {
        "benchmark": "pink_shapes",
        "model": args.model or "refloop-tiny",
        "train_domain": args.train_domain,
        "train_images": args.train_images,
        "seeds": seeds,
        "bootstrap": bootstrap_stats,
        "bootstrap_k_samples": {"samples": args.samples, "per_seed": sampled_stats} if args.k_arm else None,
        "variants": variants,
        "wrong_attribute_share": attributes,
        # the config's `epochs` is set per arm from its steps (each arm's in per_seed.sft_arms)
        "sft": {"config": sft.model_dump(mode="json", exclude={"epochs"}), "steps": args.steps, "epochs_per_arm": args.epochs},
        "eval_scene_seed": split,
        "training_history": {"ratio": args.history_ratio, "in_domain_scenes": args.history_images} if args.history_ratio else None,
        "rec_accuracy": mean_rec,
        "per_seed": per_seed,
        "rec_pairs_per_domain": args.rec_limit,
        "paper_table1_refcoco_val": PAPER_TABLE1,
        "targets": targets,
        "throughput": speed,
        "timings_s": timings,
        "total_minutes": round((time.perf_counter() - started) / 60, 2),
        "minutes_per_seed": round((time.perf_counter() - started) / 60 / len(seeds), 2),
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("rec_accuracy", "targets", "total_minutes")}, indent=2))


if __name__ == "__main__":
    main()
