"""`refloop demo`: the self-consistency gap of refloop-tiny in and out of domain, in the layout of
SC-Tune's Table 1, then Pink's self-consistent bootstrapping on a small out-of-domain split
(Table 5 layout, kept and rejected examples drawn), with a report."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from refloop.data.jsonl import read_records
from refloop.data.sources import load_data
from refloop.evaluation.consistency import ConsistencyConfig, evaluate_consistency, sample_boxes
from refloop.models import load_vlm
from refloop.progress import progress_bar
from refloop.report.consistency import write_consistency_report
from refloop.report.page import image_data_uri, write_page
from refloop.report.plots import grouped_bars
from refloop.runs import write_text_whole
from refloop.world import DOMAINS, STYLES

# The shapes-world domain standing in for each of the paper's test splits.
PAPER_COLUMN = {"in-domain": "RefCOCO", "crowded": "Object365", "wild": "OpenImages"}
# SC-Tune Table 1 (self-consistency Pr@0.5, %).
PAPER_TABLE1 = (  # (row, values): two rows share a name
    ("Qwen-VL", {"Object365": 76.9, "OpenImages": 52.9, "RefCOCO": 87.9}),
    ("  +SC-Tune (Object365)", {"Object365": 94.1, "OpenImages": 68.8, "RefCOCO": 93.8}),
    ("MiniGPT-v2", {"Object365": 65.4, "OpenImages": 38.2, "RefCOCO": 87.2}),
    ("  +SC-Tune (Object365)", {"Object365": 76.6, "OpenImages": 48.5, "RefCOCO": 90.4}),
)
# The demo's SC-Tune run: the packaged shapes recipe, shortened to fit the demo's time budget.
DEMO_SCTUNE_OVERRIDES = ["sctune.phases=4", "sctune.describer_steps=30", "sctune.locator_steps=30"]


def _inline(image_path: str) -> str:
    """A scene drawn into the page (the scenes live in refloop's cache, which a copied report lacks)."""
    from refloop.data.images import read_rgb

    return image_data_uri(read_rgb(image_path, image_path, image_path))


def table1(rows: dict[str, dict[str, float]]) -> Table:
    """Rows: models; columns: domains, each shown with the paper split it stands in for."""
    table = Table(title="Self-consistency Pr@0.5 (%) - SC-Tune Table 1 layout")
    table.add_column("model")
    for domain in DOMAINS:
        table.add_column(f"{domain}\n({PAPER_COLUMN.get(domain, '-')})", justify="right")
    for name, values in PAPER_TABLE1:
        table.add_row(f"{name} (paper)", *[f"{values[PAPER_COLUMN[d]]:.1f}" for d in DOMAINS])
    for name, values in rows.items():
        table.add_row(name, *[f"{100 * values[d]:.1f}" if d in values else "-" for d in DOMAINS])
    return table


def _demo_sctune(out: Path, model: str | None, domain: str, num_boxes: int, device: str, dtype: str, overwrite: bool) -> dict:
    """SC-Tune on text-free boxes of one OOD style, then Pr@0.5 of the tuned model on every domain."""
    from importlib.resources import files

    from refloop.config import load_recipe
    from refloop.methods.sctune import schedule
    from refloop.methods.sctune_recipe import SCTuneRecipe, run_sctune

    recipe_path = Path(str(files("refloop") / "recipes" / "sctune-shapes.yaml"))
    overrides = [f"train_data={domain}", f"eval_boxes={num_boxes}", f"device={device}", f"dtype={dtype}", *DEMO_SCTUNE_OVERRIDES]
    if model:
        overrides.append(f"model={model}")
    recipe = load_recipe(SCTuneRecipe, recipe_path, overrides + [f"eval_data=[{', '.join(DOMAINS)}]"])
    steps = sum(p.steps for p in schedule(recipe.sctune))
    with progress_bar(f"SC-Tune on {domain} boxes", steps) as advance:
        result = run_sctune(recipe, out / "sctune", progress=lambda row: advance(1), evaluate_base=False, overwrite=overwrite)
    for d in DOMAINS:
        directory = out / "sctune" / "eval" / "tuned" / d
        write_consistency_report(directory, json.loads((directory / "metrics.json").read_text()))
    return {
        "train_domain": domain,
        "train_seconds": result["train_seconds"],
        "train_boxes": result["train_boxes"],
        "tuned": result["tuned"],
        "steps": steps,
    }


def _demo_bootstrap(vlm, out: Path, domain: str, num_images: int, overwrite: bool) -> dict:
    """Pink Sec. 3.3 on the boxes of `num_images` training scenes of an OOD style (no text: the
    grammar's expressions only score the kept and rejected ones)."""
    from refloop.data.sources import load_detections
    from refloop.methods.pink import BootstrapConfig, bootstrap
    from refloop.world import TRAIN_SEED

    detections = load_detections(domain, num_images=num_images, scene_seed=TRAIN_SEED)
    with progress_bar(f"{domain:>10}: bootstrap pairs", len(detections.records)) as advance:
        stats = bootstrap(
            vlm,
            detections.records,
            out / "bootstrap",
            BootstrapConfig.shapes(),
            data=domain,
            image_root=detections.image_root,
            progress=advance,
            overwrite=overwrite,
        )
    return stats | {"domain": domain}


def table5(stats: dict) -> Table:
    from refloop.report.bootstrap import PINK_TABLE5

    table = Table(title=f"Self-consistent bootstrapping on {stats['domain']} boxes - Pink Table 5 layout")
    table.add_column("")
    table.add_column("Pink (Objects365)", justify="right")
    table.add_column("refloop-tiny (ours)", justify="right")
    pink_keep = PINK_TABLE5["referring_expressions"] / PINK_TABLE5["boxes_considered"]
    rows = [
        ("images", PINK_TABLE5["images"], stats["images"]),
        ("boxes described", PINK_TABLE5["boxes_considered"], stats["boxes_considered"]),
        ("pairs kept", PINK_TABLE5["referring_expressions"], stats["referring_expressions"]),
        ("keep rate", pink_keep, stats["keep_rate"]),
        ("words per kept expression", PINK_TABLE5["avg_expression_length"], stats["avg_expression_length"]),
    ]
    unique = stats.get("grammar_unique") or {}
    rows.append(("grammar-unique: kept / rejected", None, f"{unique.get('kept') or 0:.2f} / {unique.get('rejected') or 0:.2f}"))

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    for label, pink, ours in rows:
        table.add_row(label, cell(pink), cell(ours))
    return table


def _bootstrap_html(stats: dict | None) -> str:
    if not stats:
        return ""
    unique = stats.get("grammar_unique") or {}
    return (
        f"<h2>Pink: self-consistent bootstrapping on {stats['domain']} boxes (no text)</h2>"
        f"<p>{stats['boxes_considered']} boxes described and re-located on {stats['images']} images: "
        f"{stats['referring_expressions']} pairs kept (keep rate {100 * (stats['keep_rate'] or 0):.1f}%, IoU &ge; "
        f"{stats['iou_lambda']}); the scene grammar confirms {100 * (unique.get('kept') or 0):.0f}% of kept and "
        f"{100 * (unique.get('rejected') or 0):.0f}% of rejected expressions as unique to their object. "
        f"<a href='bootstrap/report.html'>Kept and rejected examples, Table 5 layout</a>; "
        f"pairs: <code>bootstrap/pairs.jsonl</code>, RefCOCO-style <code>bootstrap/refs.json</code>.</p>"
    )


def _demo_svp(
    out: Path, model: str | None, domain: str, num_images: int, eval_images: int, device: str, dtype: str, overwrite: bool
) -> dict:
    """SVP at demo scale: the model captions `num_images` text-free training scenes of
    an OOD style with and without the scene oracle's grounding, keeps the best-scored guided
    captions (S(q,p), Eq. 5) and is tuned on them; object recall and CHAIR_i of greedy captions on
    held-out scenes before and after, and of iSVP (the untuned model guided by the same grounder)."""
    from dataclasses import asdict

    from refloop.data.loaders import load_caption_predictions
    from refloop.data.sources import load_detections
    from refloop.evaluation.hallucination import evaluate_captions, load_object_data, score_caption_file
    from refloop.grounding import SceneOracle
    from refloop.methods.svp import SVP, SVPConfig, SVPTraining, caption_images
    from refloop.models import load_vlm
    from refloop.world import TRAIN_SEED

    base = load_vlm(model, device=device, dtype=dtype, batch_size=160)
    seed_data = load_detections(domain, num_images=num_images, scene_seed=TRAIN_SEED)
    seeds = seed_data.records
    found = load_object_data(domain, num_images=eval_images)
    # The grounder is asked for the prior caption's phrases and the world's categories (a detector
    # run over its label set), as the SVP benchmark.
    # Demo scale (K 8, top 25%, 64 images, ~7 SFT steps) keeps the settings it always had (temperature
    # 1.0, lr 2e-4 at a constant rate): the benchmark's validation chose settings for its own scale
    # and SVP's cosine schedule, not for this one.
    sft = SVPTraining(lr=2e-4, lr_schedule="constant", warmup_ratio=0.0, checkpoint_every=10_000)
    cfg = SVPConfig(samples=8, top_fraction=0.25, max_new_tokens=40, phrases="both", sft=sft)
    grounder = SceneOracle(miss_rate=0.1, false_positive_rate=0.1, jitter=0.05)
    method = SVP(base, grounder, cfg, vocabulary=seed_data.vocabulary)
    with progress_bar(f"{domain:>10}: SVP captions", num_images) as advance:
        summary = method.run(seeds, out / "svp", progress=lambda stage, n, total: advance(n) if "inner" in stage else None)
    from refloop.report.svp import write_svp_report

    write_svp_report(
        out / "svp",
        {"train_data": domain, "images": len(seeds), "grounder": "scene oracle", "score": cfg.score, "iterations": summary},
        seeds,
    )
    untuned = load_vlm(model, device=device, dtype=dtype, batch_size=160)
    before = evaluate_captions(untuned, found, out / "svp" / "eval-base", overwrite=overwrite)
    after = evaluate_captions(method.vlm, found, out / "svp" / "eval-svp", overwrite=overwrite)
    # iSVP, SVP's inference-time variant: the untuned model captions the same held-out scenes again
    # with the same grounder's feedback on its prior caption written into its prompt; no tuning
    guided = out / "svp" / "isvp"
    asked = {"isvp": True, "grounder": asdict(grounder), "phrases": cfg.phrases}
    caption_images(untuned, found.records, guided, grounder, cfg.phrases, seed_data.vocabulary, 160, asked, overwrite=overwrite)
    predictions = load_caption_predictions(guided / "captions.jsonl")[0]
    inference = score_caption_file(found, predictions, guided / "captions.jsonl", out / "svp" / "eval-isvp", overwrite=overwrite)
    rows = {r["id"]: r for r in read_records(out / "svp" / "eval-base" / "caption_samples.jsonl")}
    tuned = read_records(out / "svp" / "eval-svp" / "caption_samples.jsonl")
    # The captions SVP changed first, in the evaluation's order (not chosen by their scores), then unchanged ones.
    shown = sorted(tuned, key=lambda r: r["caption"] == rows[r["id"]]["caption"])
    changed = sum(r["caption"] != rows[r["id"]]["caption"] for r in tuned)
    pairs = [{"image": r["image"], "base": _caption_cell(rows[r["id"]]), "svp": _caption_cell(r)} for r in shown[:6]]
    keys = ("object_recall", "chair_i", "chair_s", "CIDEr")
    return {
        "model": "refloop-tiny" if model is None else str(model),
        "domain": domain,
        "seed_images": num_images,
        "iterations": summary,
        "base": {k: before.get(k) for k in keys},
        "svp": {k: after.get(k) for k in keys},
        "isvp": {k: inference.get(k) for k in keys},
        "examples": pairs,
        "captions_changed": [changed, len(tuned)],
    }


def _caption_cell(row: dict) -> dict:
    """A caption with what CHAIR reads in it: scene objects named, and named objects not in the scene."""
    return {"caption": row["caption"], "recalled": len(row["recalled"]), "objects": len(row["gt_objects"]), "absent": row["hallucinated"]}


def svp_table(result: dict) -> Table:
    table = Table(title=f"SVP on {result['domain']} captions (scene-oracle feedback) - SVP Table 6 columns")
    table.add_column("model")
    for column in ("object recall", "CHAIR_i", "CHAIR_s", "CIDEr"):
        table.add_column(column, justify="right")
    rows = (
        (result.get("model", "refloop-tiny"), "base"),
        ("  + SVP (S(q,p), ours)", "svp"),
        ("  iSVP (no tuning, ours)", "isvp"),
    )
    for name, key in (row for row in rows if row[1] in result):
        v = result[key]
        table.add_row(
            name, *[f"{100 * v[k]:.1f}" if v.get(k) is not None else "-" for k in ("object_recall", "chair_i", "chair_s", "CIDEr")]
        )
    return table


def _svp_html(result: dict | None) -> str:
    if not result:
        return ""
    cells = "".join(
        f"<tr><td>{name}</td>"
        + "".join(f"<td>{100 * (result[key].get(k) or 0):.1f}</td>" for k in ("object_recall", "chair_i", "CIDEr"))
        + "</tr>"
        for name, key in ((result.get("model", "refloop-tiny"), "base"), ("+ SVP", "svp"), ("iSVP (no tuning, grounded prompt)", "isvp"))
        if key in result
    )

    def cell(c: dict) -> str:
        absent = ", ".join(c["absent"]) or "none"
        return (
            f"<td>{html.escape(c['caption'])}<br><small>names {c['recalled']} of the scene's {c['objects']} objects; "
            f"not in the scene: {html.escape(absent)}</small></td>"
        )

    examples = "".join(
        f"<tr><td><img src='{_inline(e['image'])}' width=112></td>{cell(e['base'])}{cell(e['svp'])}</tr>" for e in result["examples"]
    )
    changed, total = result.get("captions_changed", (0, 0))
    return (
        f"<h2>SVP: captions with grounding feedback on {result['domain']} scenes</h2>"
        f"<table><tr><th>model</th><th>object recall %</th><th>CHAIR_i %</th><th>CIDEr</th></tr>{cells}</table>"
        f"<p>SVP changed {changed} of the {total} held-out captions: the changed ones first, in the evaluation's order "
        "(not chosen by their scores), then unchanged ones.</p>"
        f"<table><tr><th>image</th><th>base caption</th><th>after SVP</th></tr>{examples}</table>"
        "<p>Prior and guided samples, scores and selections: <a href='svp/report.html'>svp/</a> "
        "(<code>svp/iteration-1/samples.jsonl</code>).</p>"
    )


def _sctune_html(summary: dict | None, base: dict[str, dict]) -> str:
    if not summary:
        return ""
    cells = "".join(
        f"<tr><td>{d}</td><td>{100 * base[d]['consistency_rate']:.1f}</td><td>{100 * summary['tuned'][d]:.1f}</td>"
        f"<td>{100 * (summary['tuned'][d] - base[d]['consistency_rate']):+.1f}</td>"
        f"<td><a href='sctune/eval/tuned/{d}/report.html'>report</a></td></tr>"
        for d in DOMAINS
    )
    return (
        f"<h2>SC-Tune on {summary['train_domain']} boxes (no text), {summary['steps']} steps, "
        f"{summary['train_seconds'] / 60:.1f} min</h2><table><tr><th>domain</th><th>base %</th><th>tuned %</th>"
        f"<th>change</th><th></th></tr>{cells}</table><p><img src='sctune/curves.png'></p>"
    )


def run_demo(
    out: Path,
    model: str | None,
    num_boxes: int,
    batch_size: int,
    device: str,
    dtype: str,
    console: Console,
    sctune_domain: str | None = "crowded",
    bootstrap_domain: str | None = "wild",
    bootstrap_images: int = 100,
    svp_domain: str | None = "wild",
    svp_images: int = 64,
    overwrite: bool = False,
) -> dict:
    """The demo in `out`, a run directory of its own (its sections resume; `overwrite` replaces
    an earlier demo run of other options)."""
    from refloop.runs import run_directory

    options = {"num_boxes": num_boxes, "dtype": dtype, "sctune_domain": sctune_domain, "bootstrap_domain": bootstrap_domain}
    options |= {"bootstrap_images": bootstrap_images, "svp_domain": svp_domain, "svp_images": svp_images}
    with run_directory(out, {"task": "demo", "model": model, **options}, overwrite):
        return _run_demo(out, model, batch_size, device, console, overwrite, **options)


def _run_demo(
    out,
    model,
    batch_size,
    device,
    console,
    overwrite,
    num_boxes,
    dtype,
    sctune_domain,
    bootstrap_domain,
    bootstrap_images,
    svp_domain,
    svp_images,
) -> dict:
    started = time.perf_counter()
    vlm = load_vlm(model, device=device, dtype=dtype, batch_size=batch_size)
    model_name = "refloop-tiny" if model is None else str(model)
    cfg = ConsistencyConfig(num_boxes=num_boxes, batch_size=batch_size)
    results: dict[str, dict] = {}
    for domain in DOMAINS:
        records, _ = load_data(domain, num_images=num_boxes)
        samples = sample_boxes(records, cfg.num_boxes, cfg.seed)
        with progress_bar(f"{domain:>10}: box -> caption -> box", len(samples)) as advance:
            metrics = evaluate_consistency(vlm, samples, out / domain, cfg, data_name=domain, progress=advance, overwrite=overwrite)
        write_consistency_report(out / domain, metrics)
        results[domain] = metrics
    rows = {f"{model_name} (ours)": {d: m["consistency_rate"] for d, m in results.items()}}
    bootstrap_stats = _demo_bootstrap(vlm, out, bootstrap_domain, bootstrap_images, overwrite) if bootstrap_domain else None
    svp_result = _demo_svp(out, model, svp_domain, svp_images, min(num_boxes, 200), device, dtype, overwrite) if svp_domain else None
    sctune_summary = None
    if sctune_domain:
        sctune_summary = _demo_sctune(out, model, sctune_domain, num_boxes, device, dtype, overwrite)
        rows[f"  +SC-Tune ({sctune_domain}, ours)"] = sctune_summary["tuned"]
    console.print(table1(rows))
    gaps = {d: results["in-domain"]["consistency_rate"] - results[d]["consistency_rate"] for d in DOMAINS if d != "in-domain"}
    console.print(
        "in-domain REC acc@0.5: {:.1f}%; out-of-domain gap: {}".format(
            100 * results["in-domain"].get("rec_accuracy", 0.0), ", ".join(f"{d} -{100 * g:.1f} pts" for d, g in gaps.items())
        )
    )
    if bootstrap_stats:
        console.print(table5(bootstrap_stats))
    if svp_result:
        console.print(svp_table(svp_result))
    summary = {
        "model": model_name,
        "num_boxes": num_boxes,
        "domains": results,
        "sctune": sctune_summary,
        "bootstrap": bootstrap_stats,
        "svp": svp_result,
        "seconds": time.perf_counter() - started,
    }
    write_text_whole(out / "results.json", json.dumps(summary, indent=2) + "\n")
    chart = grouped_bars(
        [f"{d}\n({PAPER_COLUMN[d]} role)" for d in DOMAINS],
        {
            "self-consistency Pr@0.5": [100 * results[d]["consistency_rate"] for d in DOMAINS],
            "REC acc@0.5": [100 * results[d].get("rec_accuracy", 0.0) for d in DOMAINS],
        },
        out / "consistency.png",
        "refloop-tiny: in-domain vs out-of-domain",
    )
    rows = "".join(
        f"<tr><td><a href='{d}/report.html'>{d}</a></td><td>{html.escape(STYLES[d].description)}</td>"
        f"<td>{100 * results[d]['consistency_rate']:.1f}</td><td>{100 * results[d].get('rec_accuracy', 0):.1f}</td>"
        f"<td>{results[d]['mean_iou']:.3f}</td><td>{100 * results[d]['parse_failure_rate']:.1f}</td></tr>"
        for d in DOMAINS
    )
    paper = "".join(
        f"<tr><td>{name}</td>" + "".join(f"<td>{v[PAPER_COLUMN[d]]:.1f}</td>" for d in DOMAINS) + "</tr>" for name, v in PAPER_TABLE1
    )
    body = f"""<h1>refloop demo: the self-consistency gap</h1>
<p>Model <code>{html.escape(model_name)}</code>, {num_boxes} boxes per domain, one per image, greedy decoding.</p>
<table><tr><th>domain</th><th>what it is</th><th>Pr@0.5 %</th><th>REC acc %</th><th>mean IoU</th><th>unparseable %</th></tr>{rows}</table>
<p><img src="{chart.name}"></p>
{_sctune_html(sctune_summary, results)}
{_bootstrap_html(bootstrap_stats)}
{_svp_html(svp_result)}
<h2>The paper's Table 1 (base models), same column roles</h2>
<table><tr><th>model</th>{"".join(f"<th>{d} ({PAPER_COLUMN[d]})</th>" for d in DOMAINS)}</tr>{paper}</table>
<p>Finished in {summary["seconds"]:.0f} s.</p>"""
    write_page(out / "report.html", "refloop demo", body, max_width=1100, style="td,th{padding:3px 12px;text-align:left}")
    console.print(f"report: {out / 'report.html'}")
    return summary
