"""The bootstrapping report: our counts beside Pink Table 5, the IoU histogram, kept and rejected
examples drawn (target box green, where the model re-located its own description magenta)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from refloop.boxes import Box
from refloop.data.bootstrapped import Examples
from refloop.report.draw import grid, panel, save_png
from refloop.report.page import write_page
from refloop.report.plots import iou_histogram

# Pink Table 5 and appendix A.2 (Objects365), beside ours.
PINK_TABLE5 = {
    "images": 1_063_034,
    "boxes_considered": 4_961_822,
    "referring_expressions": 2_433_203,
    "rejected": 2_528_619,
    "avg_expression_length": 3.6,
}

ROWS = (
    ("images", "images (with a box left by the filters)"),
    ("boxes_considered", "boxes described and re-located"),
    ("referring_expressions", "pairs kept (referring expressions)"),
    ("rejected", "pairs rejected"),
    ("keep_rate", "keep rate"),
    ("avg_expression_length", "words per kept expression"),
    ("boxes_per_second", "boxes / s"),
)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else html.escape(str(value))


def _panels(examples: list[dict]) -> list[Image.Image]:
    out = []
    for e in examples:
        image = e["image"].load_image()
        located = Box(*e["located_box"]) if e.get("located_box") else None
        lines = [f"described: {e['expression'] or '(empty)'}", f"IoU {e['iou']:.2f}" + (f"  {e['reason']}" if e.get("reason") else "")]
        if e.get("distractor_iou") is not None:
            lines.append(f"same-category box IoU {e['distractor_iou']:.2f}")
        if e.get("grammar_unique") is not None:
            lines.append("grammar: unique" if e["grammar_unique"] else "grammar: not a unique expression")
        out.append(panel(image, Box(*e["box"]), located, lines))
    return out


def write_bootstrap_report(out_dir: Path, stats: dict, examples: Examples, ious: Sequence[float]) -> Path:
    """report.html (+ PNGs) in `out_dir` from the run's stats, example boxes and chosen IoUs."""
    kept, rejected = examples.kept, examples.rejected_mix()
    step = max(1, len(ious) // 200_000)  # the histogram's shape from at most ~200k boxes
    iou_rows = [{"iou": v} for v in ious[::step]]
    pink = PINK_TABLE5 | {"keep_rate": PINK_TABLE5["referring_expressions"] / PINK_TABLE5["boxes_considered"]}
    table = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{_fmt(stats.get(key))}</td><td>{_fmt(pink.get(key))}</td></tr>" for key, label in ROWS
    )
    reasons = [("skipped image", k, v) for k, v in stats.get("images_skipped", {}).items()]
    reasons += [("skipped box", k, v) for k, v in stats.get("boxes_skipped", {}).items()]
    reasons += [("rejected box", k, v) for k, v in stats.get("rejected_by_reason", {}).items()]
    reason_rows = "".join(f"<tr><td>{what}</td><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for what, k, v in reasons)
    unique = stats.get("grammar_unique")
    unique_html = (
        f"<p>Expressions the scene grammar confirms as unique to their object: kept {_fmt(unique.get('kept'))}, "
        f"rejected {_fmt(unique.get('rejected'))}.</p>"
        if unique
        else ""
    )
    lam = stats.get("iou_lambda", 0.5)
    hist = iou_histogram(iou_rows, out_dir / "bootstrap_iou.png", f"kept when IoU >= {lam:g}: {_fmt(stats.get('keep_rate'))}", lam)
    kept_png = save_png(grid(_panels(kept), title="kept"), out_dir / "kept.png")
    rejected_png = save_png(grid(_panels(rejected), title="rejected"), out_dir / "rejected.png")
    body = f"""<h1>Self-consistent bootstrapping (Pink Sec. 3.3)</h1>
<p>model <code>{html.escape(str(stats.get("model", "")))}</code>, data <code>{html.escape(str(stats.get("data", "")))}</code>;
lambda {lam:g}, {stats.get("samples", 1)} description(s) per box, distractor check {"on" if stats.get("distractor_check") else "off"}.
Green: the annotated box; magenta: where the model located its own description.</p>
<table><tr><th></th><th>this run</th><th>Pink Table 5 (Objects365)</th></tr>{table}</table>
<h2>Skipped and rejected, by reason</h2><table>{reason_rows}</table>
{unique_html}
<p><img src="{hist.name}"></p>
<h2>Kept</h2><p><img src="{kept_png.name}"></p>
<h2>Rejected</h2><p><img src="{rejected_png.name}"></p>
<p>Every candidate: <code>candidates.jsonl</code>; kept pairs: <code>pairs.jsonl</code> (referring JSONL, file names
relative to <code>{html.escape(str(stats.get("image_root", "")))}</code>), <code>refs.json</code> + <code>instances.json</code>;
counts: <code>stats.json</code>.</p>"""
    style = "td,th{padding:2px 12px;text-align:left}"
    return write_page(out_dir / "report.html", "refloop bootstrap", body, style=style)
