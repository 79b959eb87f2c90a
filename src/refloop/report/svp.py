"""The SVP report: per iteration, what was sampled with and without grounding, the scores and what
was selected for training, with a few images shown beside their captions."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from refloop.data.jsonl import read_records
from refloop.data.records import ImageRecord
from refloop.report.page import image_data_uri, write_page

EXAMPLES = 6  # images shown per iteration
SHOWN = 4  # samples shown per image


def _thumbnail(record: ImageRecord, side: int = 160) -> str:
    return image_data_uri(record.load_image(), side)


def _sample_rows(row: dict) -> str:
    order = sorted(range(len(row["guided"])), key=lambda j: (j not in row["selected"], -row["scores"][j]))[:SHOWN]
    out = []
    for j in order:
        mark = "selected" if j in row["selected"] else html.escape(row["degenerate"][j] or "")
        out.append(
            f"<tr><td>{html.escape(row['prior'][j])}</td><td><code>{html.escape(row['contexts'][j]) or '-'}</code></td>"
            f"<td>{html.escape(row['guided'][j])}</td><td>{row['scores'][j]:.3f}</td><td>{mark}</td></tr>"
        )
    return "".join(out)


def _seed_queries(counts: dict | None) -> str:
    """SVP (CVQ) from the seed images (`cvq_source: seed-images`): what the grounder found, what
    Pink's filter kept, the queries they made."""
    if not counts:
        return ""
    rate = counts.get("keep_rate")
    kept = f"{counts['pairs_kept']} kept" + (f" (keep rate {rate:.2f})" if rate is not None else "")
    queries = ", ".join(f"{n} {task}" for task, n in counts["queries"].items()) or "none"
    return (
        f"<p>SVP (CVQ) from the seed images: {counts['boxes_grounded']} boxes grounded on {counts['images']} images, "
        f"{html.escape(kept)} as self-consistent pairs; queries: {html.escape(queries)} (files in <code>cvq/bootstrap/</code>).</p>"
    )


# An iteration's summary as a reader asks for it: label, key, format.
SUMMARY = (
    ("seed images", "images", "{}"),
    ("guided samples", "samples", "{}"),
    ("selected for training (Eq. 7)", "selected", "{}"),
    ("visual queries mixed in (CVQ)", "visual_queries", "{}"),
    ("images the grounder found nothing in", "images_without_grounding", "{}"),
    ("detections written into the guided prompts", "detections", "{}"),
    ("detections dropped (unparsed, malformed or outside the image)", "dropped_detections", "{}"),
    ("mean score, selected / all", ("mean_score_selected", "mean_score_all"), "{:.3f} / {:.3f}"),
    ("SFT steps", "sft_steps", "{}"),
    ("sampling / training seconds", ("sample_seconds", "train_seconds"), "{:.1f} / {:.1f}"),
)


def _summary_table(summary: dict) -> str:
    rows = []
    for label, keys, fmt in SUMMARY:
        keys = keys if isinstance(keys, tuple) else (keys,)
        if all(isinstance(summary.get(k), int | float) for k in keys):
            rows.append(f"<tr><th>{label}</th><td>{fmt.format(*(summary[k] for k in keys))}</td></tr>")
    degenerate = summary.get("degenerate") or {}
    dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in degenerate.items()) or "none"
    rows.append(f"<tr><th>degenerate samples dropped</th><td>{html.escape(dropped)}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def write_svp_report(out: Path, results: dict, records: Sequence[ImageRecord]) -> Path:
    by_id = {r.image_id: r for r in records}
    sections = []
    for summary in results["iterations"]:
        work = out / f"iteration-{summary['iteration']}"
        rows = read_records(work / "samples.jsonl")[:EXAMPLES]
        blocks = "".join(
            f"<h3>image {html.escape(str(row['image_id']))}</h3><p><img src='{_thumbnail(by_id[row['image_id']])}'></p>"
            "<table><tr><th>prior z_p ~ p(z|c)</th><th>grounding g (text)</th><th>guided z ~ q(z|c,g)</th><th>score</th><th></th></tr>"
            f"{_sample_rows(row)}</table>"
            for row in rows
            if row["image_id"] in by_id
        )
        sections.append(f"<h2>Iteration {summary['iteration']}</h2>{_summary_table(summary)}{blocks}")
    body = f"""<h1>SVP: captions with grounding feedback (SVP, Algorithms 1-2)</h1>
<p>Seed images <code>{html.escape(str(results["train_data"]))}</code> ({results["images"]}), grounder
<code>{html.escape(str(results["grounder"]))}</code>, score <code>{html.escape(results["score"])}</code>. Rows: the selected samples
first, then the best-scored others; all samples in <code>iteration-N/samples.jsonl</code>.</p>
{_seed_queries(results.get("seed_image_queries"))}{"".join(sections)}"""
    style = "td,th{padding:2px 10px;text-align:left;vertical-align:top}\ncode{font-size:80%}"
    return write_page(out / "report.html", "refloop svp", body, max_width=1300, style=style)
