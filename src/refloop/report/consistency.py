"""The self-consistency report: metrics, IoU histogram, best and worst examples, as HTML + PNG."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from pathlib import Path

from PIL import Image

from refloop.data.jsonl import read_records
from refloop.report.draw import grid, row_panels, save_png
from refloop.report.page import write_page
from refloop.report.plots import iou_histogram
from refloop.runs import claim_outputs

REPORT_FILES = ("report.html", "best.png", "worst.png", "iou_hist.png")  # what it writes (a --no-report rerun removes them)
METRIC_LABELS = {
    "consistency_rate": "self-consistency Pr@0.5",
    "rec_accuracy": "REC acc@0.5 (reference expressions)",
    "mean_iou": "mean IoU (box -> caption -> box)",
    "parse_failure_rate": "unparseable REC answers",
    "num_boxes": "boxes",
    "boxes_per_second": "boxes / s",
}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _lines(r: dict) -> list[str]:
    located = f"IoU {r['iou']:.2f}" if r.get("predicted_box") is not None else "IoU 0 (the located answer did not parse)"
    lines = [f"described: {r['caption'] or '(empty)'}", located]
    if r.get("reference_expression"):
        lines.append(f"reference: {r['reference_expression']}")
    return lines


def write_consistency_report(
    out_dir: Path, metrics: dict, examples: int = 8, images: Mapping[str, Callable[[], Image.Image]] | None = None
) -> Path:
    """report.html and its PNGs from samples.jsonl; `images` as in `row_panels`."""
    page, best_png, worst_png, hist_png = (out_dir / name for name in REPORT_FILES)
    rows = read_records(out_dir / "samples.jsonl")
    ranked = sorted(rows, key=lambda r: (r["iou"], r["id"]))
    best = save_png(grid(row_panels(ranked[::-1], examples, _lines, images), title="most consistent"), best_png)
    worst = save_png(grid(row_panels(ranked, examples, _lines, images), title="least consistent"), worst_png)
    hist = iou_histogram(rows, hist_png, f"{metrics.get('data', '')}: Pr@0.5 = {metrics.get('consistency_rate', 0):.3f}")
    table = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{_fmt(metrics.get(key))}</td></tr>" for key, label in METRIC_LABELS.items() if key in metrics
    )
    body = f"""<h1>Self-consistency: box &rarr; caption &rarr; box</h1>
<p>model <code>{html.escape(str(metrics.get("model", "")))}</code>, data <code>{html.escape(str(metrics.get("data", "")))}</code>.
Green: the target box; magenta: where the model re-located its own description.</p>
<table>{table}</table>
<p><img src="{hist.name}"></p>
<h2>Most consistent</h2><p><img src="{best.name}"></p>
<h2>Least consistent</h2><p><img src="{worst.name}"></p>
<p>Per-sample records: <code>samples.jsonl</code>; metrics: <code>metrics.json</code>.</p>"""
    path = write_page(page, "refloop self-consistency", body, style="td{padding:2px 12px}")
    claim_outputs(out_dir, best, worst, hist, path)  # written after the run closed: still the run's
    return path
