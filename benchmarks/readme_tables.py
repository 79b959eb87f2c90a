"""The README's evidence tables, written from the benchmark JSONs (never typed by hand).

    python benchmarks/readme_tables.py [TABLE ...]   (default: every table; names in TABLES below)

Each cell is the mean over seeds with its range [min, max]; a change whose range crosses zero is
marked with '~' (not a claimed effect).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def cell(stat: dict, scale: float = 1.0, signed: bool = False) -> str:
    mean, lo, hi = (scale * stat[k] for k in ("mean", "min", "max"))
    f = "{:+.1f}" if signed else "{:.1f}"
    text = f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"
    if signed and lo <= 0 <= hi:
        text += " ~"
    return text


def sctune(name: str = "sctune_shapes.json", label: str = "SC-Tune") -> str:
    r = json.loads((RESULTS / name).read_text())
    lines = [
        f"| domain | {r['model']} | + {label} ({r['train_domain']}), {len(r['seeds'])} seeds | change (points) | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    targets = {"in-domain": ">= -1"}
    for d, v in r["domains"].items():
        target = targets.get(d, ">= +10")
        lines.append(f"| {d} | {100 * v['base']:.1f} | {cell(v['tuned'], 100)} | {cell(r['gain_points'][d], signed=True)} | {target} |")
    return "\n".join(lines)


def sctune_lsup() -> str:
    return sctune("sctune_shapes_lsup.json", "SC-Tune + L_sup")


def sctune_lsup_lr6() -> str:
    return sctune("sctune_shapes_lsup_locator_lr.json", "SC-Tune + L_sup, locator_lr 6e-4")


def pink() -> str:
    r = json.loads((RESULTS / "pink_shapes.json").read_text())
    domains = list(r["rec_accuracy"]["base"])
    zs = r["targets"]["zero_shot_split"]
    head = " | ".join(f"{d} (zero-shot split)" if d == zs else d for d in domains)
    lines = [f"| model ({len(r['seeds'])} seeds) | {head} |", "| --- |" + " --- |" * len(domains)]
    for arm, row in r["rec_accuracy"].items():
        name = r["model"] if arm == "base" else f"{arm} ({r['train_domain']} boxes)"
        lines.append(f"| {name} | " + " | ".join(cell(row[d]) if arm != "base" else f"{row[d]['mean']:.1f}" for d in domains) + " |")
    t = r["targets"]
    lines += [
        "",
        "| effect on the zero-shot split (points) | mean [range] | target |",
        "| --- | --- | --- |",
        f"| filtered - unfiltered | {cell(t['filtered_minus_unfiltered_zero_shot'], signed=True)} | >= +3 |",
        f"| filtered - base | {cell(t['filtered_minus_base_zero_shot'], signed=True)} | >= +5 |",
        f"| in-domain, filtered - base | {cell(t['in_domain_change_filtered'], signed=True)} | within 1 |",
    ]
    if "filtered_k_minus_unfiltered_zero_shot" in t:  # refloop's K-sample variant, beside Pink's rows
        k = r["bootstrap_k_samples"]["samples"]
        lines += [
            f"| filtered with K = {k} samples - unfiltered | {cell(t['filtered_k_minus_unfiltered_zero_shot'], signed=True)} | (variant) |",
            f"| filtered with K = {k} samples - base | {cell(t['filtered_k_minus_base_zero_shot'], signed=True)} | (variant) |",
            f"| in-domain, filtered with K = {k} samples - base | {cell(t['in_domain_change_filtered_k'], signed=True)} | (variant) |",
        ]
    return "\n".join(lines)


def svp(name: str = "svp_shapes.json") -> str:
    r = json.loads((RESULTS / name).read_text())
    metrics = [("object_recall", "object recall"), ("chair_i", "CHAIR_i"), ("cider", "CIDEr"), ("pope_f1", "POPE F1"), ("rec_acc", "REC")]
    lines = [f"| row ({len(r['seeds'])} seeds) | " + " | ".join(m for _, m in metrics) + " |", "| --- |" + " --- |" * len(metrics)]
    for name, row in r["table"].items():
        lines.append(f"| {name} | " + " | ".join(cell(row[k]) for k, _ in metrics) + " |")
    t = r["targets"]
    rows = [
        ("recall: S(q,p) - no feedback", "recall_gain_over_no_feedback", ">= +5"),
        ("recall: S(q,p) - grounding only", "recall_gain_over_grounding_only", "> 0"),
        ("recall: grounding only - no feedback", "recall_grounding_only_minus_no_feedback", "> 0"),
        ("CHAIR_i: S(q,p) - no feedback", "chair_i_change_vs_no_feedback", "<= 0"),
        ("REC: S(q,p) - base", "rec_change_vs_base", ">= -2"),
        ("REC: S(q,p) + CVQ - base", "rec_change_vs_base_with_cvq", "(CVQ)"),
        ("POPE F1: S(q,p) - base", "pope_f1_change_vs_base", ">= -1"),
        ("recall: Delta(q,p) - no feedback", "delta_recall_gain_over_no_feedback", "(Eq. 6)"),
        ("CHAIR_i: Delta(q,p) - no feedback", "delta_chair_i_change_vs_no_feedback", "(Eq. 6)"),
        ("REC: Delta(q,p) - base", "delta_rec_change_vs_base", "(Eq. 6)"),
        ("POPE F1: Delta(q,p) - base", "delta_pope_f1_change_vs_base", "(Eq. 6)"),
    ]
    lines += ["", "| effect (points) | mean [range] | target |", "| --- | --- | --- |"]
    lines += [f"| {label} | {cell(t[key], signed=True)} | {target} |" for label, key, target in rows if key in t]
    if "seed_cvq" in t:  # beyond the papers: the five targets read on the seed-image CVQ row
        c, row = t["seed_cvq"], "S(q,p) + seed-image CVQ"
        lines += [
            f"| recall: {row} - no feedback | {cell(c['recall_gain_over_no_feedback'], signed=True)} | >= +5 |",
            f"| recall: {row} - grounding only | {cell(c['recall_gain_over_grounding_only'], signed=True)} | > 0 |",
            f"| CHAIR_i: {row} - no feedback | {cell(c['chair_i_change_vs_no_feedback'], signed=True)} | <= 0 |",
            f"| REC: {row} - base | {cell(c['rec_change_vs_base'], signed=True)} | >= -2 |",
            f"| POPE F1: {row} - base | {cell(c['pope_f1_change_vs_base'], signed=True)} | >= -1 |",
        ]
    return "\n".join(lines)


def svp_temperature1() -> str:
    return svp("svp_shapes_temperature1.json")


def svp_first_pick() -> str:
    return svp("svp_shapes_first_pick.json")


def svp_constant_lr() -> str:
    return svp("svp_shapes_constant_lr.json")


def svp_seed_images_eval() -> str:
    return svp("svp_shapes_seed_images_c1000.json")


def svp_seed_cvq_eval() -> str:
    return svp("svp_shapes_seed_cvq_c1000.json")


def validation_points(name: str, label: str, met: bool = False) -> str:
    """One-seed validation points of an SVP setting (no ranges): each point's S(q,p) targets, with
    the rule's pick (the file's `pick`, when it names one) marked and, with `met`, how many of the five targets it meets.
    A point whose targets are read on another row (its `row`, e.g. the CVQ row) and whose run has no
    grounding-only row gives its ordering's three recalls in `ordering_recalls`."""
    r = json.loads((RESULTS / name).read_text())
    pick = r.get("pick")
    header = (
        f"| {label} | recall: S(q,p) - no feedback | S(q,p) > grounding only > no feedback | CHAIR_i: S(q,p) - no feedback "
        "| REC: S(q,p) - base | POPE F1: S(q,p) - base |" + (" targets met |" if met else "")
    )
    lines = [header, "| --- |" + " --- |" * (5 + met)]
    for key, point in r["points"].items():
        t, rows = point["targets"], point["rows"]
        names = (point.get("row", "grounding + S(q,p)"), "grounding, no scoring", "self-captioning, no grounding")
        if all(n in rows for n in names):
            recalls = [rows[n]["object_recall"] for n in names]
        else:  # a point scored on another row (its CVQ row) reads grounding only from a sibling run
            recalls = point["ordering_recalls"]
        order = " > ".join(f"{v:.1f}" for v in recalls)
        lines.append(
            f"| {key}{' (pick)' if key == pick else ''} | {t['recall_gain_over_no_feedback']:+.1f} "
            f"| {order}{'' if t['ordering'] else ' (not met)'} | {t['chair_i_change_vs_no_feedback']:+.1f} "
            f"| {t['rec_change_vs_base']:+.1f} | {t['pope_f1_change_vs_base']:+.1f} |" + (f" {t['targets_met']} of 5 |" if met else "")
        )
    return "\n".join(lines)


def svp_cosine_lrs() -> str:
    """The peak learning rate under SVP's cosine schedule, on the validation split."""
    return validation_points("svp_shapes_validation_cosine.json", "peak lr", met=True)


def svp_seed_images() -> str:
    """SVP's C = 1000 seed images (the paper's) instead of 200, on the validation split."""
    return validation_points("svp_shapes_validation_seed_images.json", "C = 1000 seed images", met=True)


def svp_iterations() -> str:
    """SVP's outer iterations I, on the validation split."""
    return validation_points("svp_shapes_validation_iterations.json", "I")


def wild_factors() -> str:
    r = json.loads((RESULTS / "wild_factors.json").read_text())
    lines = [
        f"| `wild` scenes (seed {r['scene_seed']}) | CHAIR_i, no context | CHAIR_i, with grounding | caption objects the grounding names |",
        "| --- | --- | --- | --- |",
    ]
    for name, v in r["variants"].items():
        label = "as rendered" if name == "wild" else name
        plain, guided = v["no_context"], v["context"]
        lines.append(f"| {label} | {plain['chair_i']:.1f} | {guided['chair_i']:.1f} | {guided['in_grounding']:.1f}% |")
    return "\n".join(lines)


def isvp() -> str:
    """iSVP (no tuning) against the base's greedy captions, over the oracle's noise seeds."""
    r = json.loads((RESULTS / "isvp_shapes.json").read_text())
    lines = [
        f"| row ({len(r['seeds'])} oracle seeds) | object recall | CHAIR_i | CHAIR_s | CIDEr | recall - base | CHAIR_i - base |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row, stats in r["rows"].items():
        change = (
            ["-", "-"]
            if row == "base"
            else [cell(r["effects_points"][f"{m}: {row} - base"], signed=True) for m in ("object_recall", "chair_i")]
        )
        lines.append(
            f"| {row} | "
            + " | ".join(cell(stats[m]) for m in ("object_recall", "chair_i", "chair_s", "CIDEr"))
            + " | "
            + " | ".join(change)
            + " |"
        )
    return "\n".join(lines)


TABLES = {
    "sctune": sctune,
    "sctune_lsup": sctune_lsup,
    "sctune_lsup_lr6": sctune_lsup_lr6,
    "pink": pink,
    "svp": svp,
    "svp_cosine_lrs": svp_cosine_lrs,
    "svp_constant_lr": svp_constant_lr,
    "svp_first_pick": svp_first_pick,
    "svp_temperature1": svp_temperature1,
    "svp_iterations": svp_iterations,
    "svp_seed_images": svp_seed_images,
    "svp_seed_images_eval": svp_seed_images_eval,
    "svp_seed_cvq_eval": svp_seed_cvq_eval,
    "wild_factors": wild_factors,
    "isvp": isvp,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(TABLES):
        print(f"<!-- {name}: python benchmarks/readme_tables.py {name} -->")
        print(TABLES[name]())
        print()
