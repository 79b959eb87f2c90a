"""`refloop demo`: the self-consistency gap of refloop-tiny in and out of domain, in the layout of
SC-Tune's Table 1, with a report."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from refloop.data.sources import load_data
from refloop.evaluation.consistency import ConsistencyConfig, evaluate_consistency, sample_boxes
from refloop.models import load_vlm
from refloop.progress import progress_bar
from refloop.report.consistency import write_consistency_report
from refloop.report.plots import grouped_bars
from refloop.world import DOMAINS, STYLES

# The shapes-world domain standing in for each of the paper's test splits.
PAPER_COLUMN = {"in-domain": "RefCOCO", "crowded": "Object365", "wild": "OpenImages"}
# SC-Tune Table 1 (self-consistency Pr@0.5, %).
PAPER_TABLE1 = {
    "Qwen-VL": {"Object365": 76.9, "OpenImages": 52.9, "RefCOCO": 87.9},
    "  +SC-Tune (Object365)": {"Object365": 94.1, "OpenImages": 68.8, "RefCOCO": 93.8},
    "MiniGPT-v2": {"Object365": 65.4, "OpenImages": 38.2, "RefCOCO": 87.2},
    "  +SC-Tune (Object365) ": {"Object365": 76.6, "OpenImages": 48.5, "RefCOCO": 90.4},
}
# The demo's SC-Tune run: the packaged shapes recipe, shortened to fit the demo's time budget.
DEMO_SCTUNE_OVERRIDES = ["sctune.phases=4", "sctune.describer_steps=30", "sctune.locator_steps=30"]


def table1(rows: dict[str, dict[str, float]]) -> Table:
    """Rows: models; columns: domains, each shown with the paper split it stands in for."""
    table = Table(title="Self-consistency Pr@0.5 (%) - SC-Tune Table 1 layout")
    table.add_column("model")
    for domain in DOMAINS:
        table.add_column(f"{domain}\n({PAPER_COLUMN.get(domain, '-')})", justify="right")
    for name, values in PAPER_TABLE1.items():
        table.add_row(f"{name} (paper)", *[f"{values[PAPER_COLUMN[d]]:.1f}" for d in DOMAINS])
    for name, values in rows.items():
        table.add_row(name, *[f"{100 * values[d]:.1f}" if d in values else "-" for d in DOMAINS])
    return table


def _demo_sctune(out: Path, model: str | None, domain: str, num_boxes: int, device: str, dtype: str) -> dict:
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
        result = run_sctune(recipe, out / "sctune", progress=lambda row: advance(1), evaluate_base=False)
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
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    vlm = load_vlm(model, device=device, dtype=dtype, batch_size=batch_size)
    model_name = "refloop-tiny" if model is None else str(model)
    cfg = ConsistencyConfig(num_boxes=num_boxes, batch_size=batch_size)
    results: dict[str, dict] = {}
    for domain in DOMAINS:
        records, _ = load_data(domain, num_images=num_boxes)
        samples = sample_boxes(records, cfg.num_boxes, cfg.seed)
        with progress_bar(f"{domain:>10}: box -> caption -> box", len(samples)) as advance:
            metrics = evaluate_consistency(vlm, samples, out / domain, cfg, data_name=domain, progress=advance)
        write_consistency_report(out / domain, metrics)
        results[domain] = metrics
    rows = {f"{model_name} (ours)": {d: m["consistency_rate"] for d, m in results.items()}}
    sctune_summary = None
    if sctune_domain:
        sctune_summary = _demo_sctune(out, model, sctune_domain, num_boxes, device, dtype)
        rows[f"  +SC-Tune ({sctune_domain}, ours)"] = sctune_summary["tuned"]
    console.print(table1(rows))
    gaps = {d: results["in-domain"]["consistency_rate"] - results[d]["consistency_rate"] for d in DOMAINS if d != "in-domain"}
    console.print(
        "in-domain REC acc@0.5: {:.1f}%; out-of-domain gap: {}".format(
            100 * results["in-domain"].get("rec_accuracy", 0.0), ", ".join(f"{d} -{100 * g:.1f} pts" for d, g in gaps.items())
        )
    )
    summary = {
        "model": model_name,
        "num_boxes": num_boxes,
        "domains": results,
        "sctune": sctune_summary,
        "seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
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
        f"<tr><td>{name}</td>" + "".join(f"<td>{v[PAPER_COLUMN[d]]:.1f}</td>" for d in DOMAINS) + "</tr>"
        for name, v in PAPER_TABLE1.items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>refloop demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}td,th{{padding:3px 12px;text-align:left}}</style></head><body>
<h1>refloop demo: the self-consistency gap</h1>
<p>Model <code>{html.escape(model_name)}</code>, {num_boxes} boxes per domain, one per image, greedy decoding.</p>
<table><tr><th>domain</th><th>what it is</th><th>Pr@0.5 %</th><th>REC acc %</th><th>mean IoU</th><th>unparseable %</th></tr>{rows}</table>
<p><img src="{chart.name}"></p>
{_sctune_html(sctune_summary, results)}
<h2>The paper's Table 1 (base models), same column roles</h2>
<table><tr><th>model</th>{"".join(f"<th>{d} ({PAPER_COLUMN[d]})</th>" for d in DOMAINS)}</tr>{paper}</table>
<p>Finished in {summary["seconds"]:.0f} s.</p></body></html>"""
    (out / "report.html").write_text(page)
    console.print(f"report: {out / 'report.html'}")
    return summary
