"""The caption-hallucination and POPE reports (`refloop eval caption|pope`): which objects the model
names that are not in the image, which it leaves out, which questions it answers wrongly, with the
images beside the captions and answers. Read from the run's sample rows, so a finished run's
report can be written again without the model."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from PIL import Image

from refloop.data.jsonl import read_records
from refloop.report.draw import row_image
from refloop.report.page import image_data_uri, write_page
from refloop.report.plots import ranked_bars
from refloop.runs import claim_outputs

ImageLoaders = Mapping[str, Callable[[], Image.Image]]
REPORT_FILES = ("report.html", "objects.png")  # what either report writes (a --no-report rerun removes them)

CAPTION_METRICS = (
    ("object recall", "object_recall", "{:.1%}"),
    ("CHAIR_i (mentions naming an absent object)", "chair_i", "{:.1%}"),
    ("CHAIR_s (captions naming one)", "chair_s", "{:.1%}"),
    ("CIDEr", "CIDEr", "{:.3f}"),
    ("BLEU-4", "BLEU-4", "{:.3f}"),
    ("METEOR", "METEOR", "{:.3f}"),
    ("captions", "captions", "{}"),
    ("object mentions", "mentions", "{}"),
    ("records skipped (--on-error skip)", "skipped_records", "{}"),
    ("captions of the file skipped (--on-error skip)", "skipped_predictions", "{}"),
    ("empty captions", "empty_captions", "{}"),
)
POPE_METRICS = (
    ("accuracy", "accuracy", "{:.1%}"),
    ("precision", "precision", "{:.1%}"),
    ("recall", "recall", "{:.1%}"),
    ("F1", "f1", "{:.1%}"),
    ("yes ratio", "yes_ratio", "{:.1%}"),
    ("answers neither yes nor no", "unparsed", "{}"),
    ("questions", "num", "{}"),
    ("images", "images", "{}"),
    ("records skipped (--on-error skip)", "skipped_records", "{}"),
)
STYLE = (
    "td,th{padding:2px 10px;text-align:left;vertical-align:top}.cards{display:flex;flex-wrap:wrap;gap:12px}"
    ".card{width:260px;font-size:90%}.card img{width:256px;image-rendering:pixelated}"
    ".absent{color:#c0262d}.found{color:#21873f}.missed{color:#777}"
)


def _metrics_table(metrics: dict, rows: tuple) -> str:
    cells = [
        f"<tr><td>{html.escape(label)}</td><td>{fmt.format(metrics[key])}</td></tr>"
        for label, key, fmt in rows
        if isinstance(metrics.get(key), int | float)
    ]
    return f"<table>{''.join(cells)}</table>"


def _thumbnail(row: dict, images: ImageLoaders | None) -> str | None:
    """The row's image as a data URI; None when it cannot be read any more (`row_image`)."""
    image = row_image(row, images)
    return None if image is None else image_data_uri(image, 256)


def _cards(rows: list[dict], describe: Callable[[dict], str], images: ImageLoaders | None, count: int) -> str:
    """The first `count` rows as cards, each on its image; a row whose image cannot be read (moved
    since the run, or a scored captions file whose images are not under the image root) is shown
    without it, saying so."""
    cards = []
    for row in rows[:count]:
        uri = _thumbnail(row, images)
        picture = f"<img src='{uri}'>" if uri is not None else f"<small>(image not found: {html.escape(str(row['image']))})</small>"
        cards.append(f"<div class='card'>{picture}<br>{describe(row)}</div>")
    return f"<div class='cards'>{''.join(cards)}</div>" if cards else "<p>(none)</p>"


def _names(values, css: str) -> str:
    return f"<span class='{css}'>{html.escape(', '.join(values))}</span>" if values else "-"


def _undefined(metrics: dict) -> str:
    """Said on the page, not only on stderr: no caption or annotation named an object of the table."""
    if metrics.get("chair_i") is not None:
        return ""
    return (
        f"<p class='absent'>No annotation or caption names an object of the <code>{html.escape(str(metrics.get('table', '')))}</code> "
        "table, so CHAIR and object recall are not defined here (a dataset's own labels: <code>--categories dataset</code>).</p>"
    )


def _caption_card(row: dict) -> str:
    return (
        f"<b>{html.escape(row['caption'] or '(empty caption)')}</b><br>"
        f"absent: {_names(row['hallucinated'], 'absent')}<br>"
        f"present: {_names(row['recalled'], 'found')}<br>"
        f"left out: {_names(row['missed'], 'missed')}"
    )


def _captions_source(metrics: dict) -> str:
    if given := metrics.get("predictions_file"):
        return f"The captions of <code>{html.escape(str(given))}</code>, one per image (no model ran)."
    return "One greedy caption per image."


def write_caption_report(
    out_dir: Path, metrics: dict, model: str = "", data: str = "", images: ImageLoaders | None = None, examples: int = 8
) -> Path:
    """report.html of an `eval caption` run and its bar chart, from caption_samples.jsonl; `model`
    and `data` name what ran on what; `images` loads a row's image by its "image" field where the
    pixels are not a file (parquet datasets)."""
    page, chart_png = (out_dir / name for name in REPORT_FILES)
    rows = read_records(out_dir / "caption_samples.jsonl")
    # captions, not mentions: chair.py's protocol lists an object once per mention ("a dog ... another dog")
    absent = Counter(name for r in rows for name in set(r["hallucinated"]))
    missed = Counter(name for r in rows for name in set(r["missed"]))
    chart = ranked_bars(
        {"named but absent": absent, "present but not named": missed},
        chart_png,
        "objects most often named when absent, and left out when present",
        "captions",
    )
    worst = sorted(rows, key=lambda r: (-len(r["hallucinated"]), r["recall"] if r["recall"] is not None else 1.0, str(r["id"])))
    clean = sorted((r for r in rows if not r["hallucinated"]), key=lambda r: (-(r["recall"] or 0.0), str(r["id"])))
    protocol = metrics.get("chair_protocol", "")
    body = f"""<h1>Caption hallucination: CHAIR and object recall</h1>
<p>model <code>{html.escape(model)}</code>, data <code>{html.escape(data)}</code>,
object table <code>{html.escape(str(metrics.get("table", "")))}</code>, CHAIR counted as <code>{html.escape(protocol)}</code>
(both protocols in <code>caption_metrics.json</code>). {_captions_source(metrics)}</p>
{_metrics_table(metrics, CAPTION_METRICS)}{_undefined(metrics)}
<p><img src="{chart.name}"></p>
<h2>Captions naming the most absent objects</h2>
<p><span class='absent'>absent</span>: named, not in the image's annotations; <span class='found'>present</span>: named and
annotated; <span class='missed'>left out</span>: annotated, not named.</p>
{_cards([r for r in worst if r["hallucinated"]], _caption_card, images, examples)}
<h2>Captions naming no absent object, most complete first</h2>
{_cards(clean, _caption_card, images, examples)}
<p>Per-caption records: <code>caption_samples.jsonl</code>; metrics: <code>caption_metrics.json</code>.</p>"""
    path = write_page(page, "refloop eval caption", body, style=STYLE)
    claim_outputs(out_dir, chart, path)  # written after the run closed: still the run's
    return path


def _pope_card(row: dict) -> str:
    return (
        f"<b>{html.escape(row['question'])}</b><br>answer: <code>{html.escape(row['answer'] or '(empty)')}</code><br>"
        f"truth: {html.escape(row['label'])}"
    )


def write_pope_report(
    out_dir: Path, metrics: dict, model: str = "", data: str = "", images: ImageLoaders | None = None, examples: int = 8
) -> Path:
    """report.html of an `eval pope` run and its bar chart, from pope_samples.jsonl, read by the
    run's rule (`metrics["rule"]`); `images` as in `write_caption_report`."""
    page, chart_png = (out_dir / name for name in REPORT_FILES)
    rows = read_records(out_dir / "pope_samples.jsonl")
    reading = "reference_reading" if metrics.get("rule", "reference") == "reference" else "parsed"
    false_yes = [r for r in rows if r["label"] == "no" and r[reading] == "yes"]
    false_no = [r for r in rows if r["label"] == "yes" and r[reading] != "yes"]
    named = "object" in (rows[0] if rows else {})
    chart = None
    if named:  # questions drawn from annotations name their object; a release's question file does not
        wrong = {"absent, answered yes": false_yes, "present, not answered yes": false_no}
        chart = ranked_bars(
            {label: Counter(r["object"] for r in questions) for label, questions in wrong.items()},
            chart_png,
            "objects of the wrongly answered questions",
            "questions",
        )
    confusion = (
        "<table><tr><th></th><th>answered yes</th><th>answered no (or neither)</th></tr>"
        f"<tr><th>object present</th><td>{metrics.get('tp', '-')}</td><td>{metrics.get('fn', '-')}</td></tr>"
        f"<tr><th>object absent</th><td>{metrics.get('fp', '-')}</td><td>{metrics.get('tn', '-')}</td></tr></table>"
    )
    drawn = metrics.get("questions") or f"{data}: {metrics.get('strategy', '')}, {metrics.get('per_image', '')} yes questions an image"
    body = f"""<h1>POPE: yes/no questions about objects</h1>
<p>model <code>{html.escape(model)}</code>, questions <code>{html.escape(str(drawn))}</code>,
answers read by the <code>{html.escape(str(metrics.get("rule", "")))}</code> rule (both rules in <code>pope_metrics.json</code>).</p>
{_metrics_table(metrics, POPE_METRICS)}
{confusion}
{f'<p><img src="{chart.name}"></p>' if chart else ""}
<h2>Absent objects answered yes ({len(false_yes)})</h2>
{_cards(false_yes, _pope_card, images, examples)}
<h2>Present objects not answered yes ({len(false_no)})</h2>
{_cards(false_no, _pope_card, images, examples)}
<p>Per-question records: <code>pope_samples.jsonl</code>; metrics: <code>pope_metrics.json</code>.</p>"""
    path = write_page(page, "refloop eval pope", body, style=STYLE)
    claim_outputs(out_dir, *(p for p in (chart, path) if p is not None))
    return path
