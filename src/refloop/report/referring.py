"""The REC and REG reports (`refloop eval rec|reg`): how the answers fail, and examples with their
boxes drawn, read from the run's sample rows."""

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

ImageLoaders = Mapping[str, Callable[[], Image.Image]]
STYLE = "td,th{padding:2px 12px;text-align:left}"
REPORT_FILES = {
    "rec": ("report.html", "rec_iou.png", "rec_worst.png", "rec_best.png"),
    "reg": ("report.html", "reg_differ.png", "reg_equal.png"),
}


def _header(title: str, model: str, data: str, colours: str) -> str:
    return f"<h1>{title}</h1>\n<p>model <code>{html.escape(model)}</code>, data <code>{html.escape(data)}</code>. {colours}</p>"


def _rec_lines(r: dict) -> list[str]:
    answer = r.get("answer") or "(empty)"
    answer = answer if len(answer) <= 80 else answer[:77] + "..."
    located = f"IoU {r['iou']:.2f}" if r.get("predicted_box") is not None else f"unparseable answer: {answer}"
    return [f"expression: {r['expression']}", located]


def _this_runs_rows(path: Path, metrics: dict) -> list[dict]:
    """The rows the metrics were computed on: the first `num` (a file keeps the rows of an earlier,
    longer --limit, in item order)."""
    rows = read_records(path)
    return rows[: metrics["num"]] if isinstance(metrics.get("num"), int) else rows


def write_rec_report(out_dir: Path, metrics: dict, model: str = "", data: str = "", images: ImageLoaders | None = None) -> Path:
    """report.html of an `eval rec` run: right / wrong box / unparseable counts, the IoU histogram,
    the worst and the best answers drawn; `images` loads a row's image by its "image" field where
    the pixels are not a file (parquet datasets)."""
    page, hist_png, worst_png, best_png = (out_dir / name for name in REPORT_FILES["rec"])
    rows = _this_runs_rows(out_dir / "rec_samples.jsonl", metrics)
    threshold = metrics.get("iou_threshold", 0.5)
    strict = str(metrics.get("iou_rule", "")).startswith("IoU > ")  # the metrics' rule (Python API: SC-Tune's > 0.5)
    right = sum(r["iou"] > threshold if strict else r["iou"] >= threshold for r in rows)
    unparseable = sum(r.get("predicted_box") is None for r in rows)
    kinds = (
        (f"right (IoU {'&gt;' if strict else '&ge;'} {threshold:g})", right),
        ("a box, but not the referred object", len(rows) - right - unparseable),
        ("no box in the answer", unparseable),
    )
    counts = "".join(f"<tr><td>{label}</td><td>{n}</td><td>{n / max(len(rows), 1):.1%}</td></tr>" for label, n in kinds)
    if metrics.get("skipped_records"):
        counts += f"<tr><td>records skipped (--on-error skip)</td><td>{metrics['skipped_records']}</td><td></td></tr>"
    ranked = sorted(rows, key=lambda r: (r["iou"], str(r["id"])))
    title = f"{data}: REC acc@{threshold:g} = {metrics.get('rec_accuracy', 0):.3f}"
    hist = iou_histogram(rows, hist_png, title, threshold, "IoU(referred box, located box)", "expressions")
    worst = save_png(grid(row_panels(ranked, 8, _rec_lines, images), title="lowest IoU"), worst_png)
    best = save_png(grid(row_panels(ranked[::-1], 8, _rec_lines, images), title="highest IoU"), best_png)
    body = f"""{_header("REC: locate a referring expression", model, data, "Green: the referred box; magenta: the model's.")}
<table><tr><th>answers ({len(rows)})</th><th></th><th></th></tr>{counts}</table>
<p><img src="{hist.name}"></p>
<h2>Lowest IoU</h2><p><img src="{worst.name}"></p>
<h2>Highest IoU</h2><p><img src="{best.name}"></p>
<p>Per-expression records: <code>rec_samples.jsonl</code>; metrics: <code>rec_metrics.json</code>.</p>"""
    path = write_page(page, "refloop eval rec", body, style=STYLE)
    claim_outputs(out_dir, hist, worst, best, path)  # written after the run closed: still the run's
    return path


def _reg_lines(r: dict) -> list[str]:
    return [f"described: {r['prediction'] or '(empty)'}", "references: " + " | ".join(r["references"])]


def write_reg_report(out_dir: Path, metrics: dict, model: str = "", data: str = "", images: ImageLoaders | None = None) -> Path:
    """report.html of an `eval reg` run: the text metrics, the descriptions that are none of their
    object's references and some that are one, drawn; `images` as in `write_rec_report`."""
    page, differ_png, equal_png = (out_dir / name for name in REPORT_FILES["reg"])
    rows = _this_runs_rows(out_dir / "reg_samples.jsonl", metrics)
    exact, other = [], []
    for r in rows:  # equal up to whitespace
        same = " ".join(r["prediction"].split()) in {" ".join(ref.split()) for ref in r["references"]}
        (exact if same else other).append(r)
    scores = ("CIDEr", "METEOR", "BLEU-4", "ROUGE-L")
    table = "".join(f"<tr><td>{k}</td><td>{metrics[k]:.3f}</td></tr>" for k in scores if isinstance(metrics.get(k), int | float))
    table += f"<tr><td>descriptions equal to one of their references</td><td>{len(exact)} of {len(rows)}</td></tr>"
    if metrics.get("skipped_records"):
        table += f"<tr><td>records skipped (--on-error skip)</td><td>{metrics['skipped_records']}</td></tr>"
    differ = save_png(grid(row_panels(other, 8, _reg_lines, images), title="none of the references"), differ_png)
    equal = save_png(grid(row_panels(exact, 8, _reg_lines, images), title="one of the references"), equal_png)
    body = f"""{_header("REG: describe a boxed object", model, data, "Green: the described box.")}
<table>{table}</table>
<h2>Descriptions that are none of their object's references ({len(other)})</h2><p><img src="{differ.name}"></p>
<h2>Descriptions that are one of them ({len(exact)})</h2><p><img src="{equal.name}"></p>
<p>Per-object records: <code>reg_samples.jsonl</code>; metrics: <code>reg_metrics.json</code> (tokenizer
<code>{html.escape(str(metrics.get("tokenizer", "")))}</code>).</p>"""
    path = write_page(page, "refloop eval reg", body, style=STYLE)
    claim_outputs(out_dir, differ, equal, path)
    return path
