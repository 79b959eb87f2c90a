"""Every plot refloop draws (matplotlib, headless): training curves, IoU histograms, bar charts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from refloop.data.jsonl import read_records  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def iou_histogram(
    rows: list[dict], path: Path, title: str, threshold: float = 0.5, xlabel: str = "IoU(target, re-located box)", ylabel: str = "boxes"
) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.hist([r["iou"] for r in rows], bins=20, range=(0, 1), color="#4a7bd0")
    ax.axvline(threshold, color="#d04a4a", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def sctune_curves(metrics_path: Path, path: Path) -> Path:
    """Describer phases (rewards, sampled Pr@0.5) and locator phases (MLE loss) of an SC-Tune run."""
    rows = read_records(metrics_path)
    d = [r for r in rows if r.get("role") == "describer"]
    loc = [r for r in rows if r.get("role") == "locator"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.4), dpi=110)
    for key, label in (("reward", "reward IoU (sampled)"), ("baseline_reward", "baseline IoU"), ("consistency", "Pr@0.5 of samples")):
        a.plot([r["step"] for r in d], [r[key] for r in d], ".", markersize=3, label=label)
    a.set_title("describer phases (PPO)")
    a.set_xlabel("step")
    a.legend(fontsize=7)
    b.plot([r["step"] for r in loc], [r["loss"] for r in loc], ".", markersize=3, color="#d04a4a")
    b.set_title("locator phases (MLE loss)")
    b.set_xlabel("step")
    seen = [r for r in loc if "caption_words" in r]  # runs from before these were logged have none
    c.plot([r["step"] for r in seen], [r["caption_words"] for r in seen], ".", markersize=3, color="#4a7bd0")
    c.set_ylabel("words per caption", color="#4a7bd0")
    share = c.twinx()
    share.plot([r["step"] for r in seen], [r["distinct_captions"] for r in seen], ".", markersize=3, color="#3a9a5a")
    share.set_ylabel("distinct captions (share)", color="#3a9a5a")
    share.set_ylim(0, 1.05)
    c.set_title("the describer's captions the locator trains on")
    c.set_xlabel("step")
    return _save(fig, path)


def sft_curves(metrics_path: Path, path: Path) -> Path:
    """Answer-token NLL per step of an SFT run (with a running mean)."""
    rows = [r for r in read_records(metrics_path) if "loss" in r]
    steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    ax.plot(steps, loss, ".", markersize=3, color="#4a7bd0", label="batch loss")
    ax.plot(steps, smooth, color="#d04a4a", linewidth=1, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token NLL")
    ax.set_title("SFT training loss")
    ax.legend(fontsize=7)
    return _save(fig, path)


def pretrain_curves(metrics_path: Path, path: Path) -> Path:
    """Loss over training minutes and the held-out probe (REC, REG exact, self-consistency)."""
    rows = read_records(metrics_path)
    loss = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "rec_acc" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    a.plot([r["elapsed_s"] / 60 for r in loss], [r["loss"] for r in loss], color="#4a7bd0", linewidth=1)
    a.set_xlabel("training minutes")
    a.set_ylabel("loss")
    a.set_yscale("log")
    a.set_title("training loss")
    minutes = [r.get("elapsed_s", 0) / 60 for r in evals]
    for key, label in (("rec_acc", "REC acc@0.5"), ("reg_exact", "REG exact match"), ("self_consistency", "self-consistency")):
        b.plot(minutes, [r[key] for r in evals], marker="o", markersize=3, label=label)
    b.set_ylim(0, 1)
    b.set_xlabel("training minutes")
    b.set_title("held-out in-domain scenes")
    b.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def grouped_bars(groups: Sequence[str], series: dict[str, Sequence[float]], path: Path, title: str, ylabel: str = "%") -> Path:
    """One group of bars per entry of `groups`, one bar per series, the first series labelled."""
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    width = 0.8 / max(len(series), 1)
    colors = ["#4a7bd0", "#9bb6e6", "#d04a4a", "#e6a39b"]
    for k, (label, values) in enumerate(series.items()):
        xs = [x - 0.4 + width * (k + 0.5) for x in range(len(groups))]
        ax.bar(xs, values, width=width, label=label, color=colors[k % len(colors)])
        if k == 0:
            for x, v in zip(xs, values, strict=True):
                ax.text(x, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(range(len(groups))), list(groups), fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def ranked_bars(panels: dict[str, Counter], path: Path, title: str, xlabel: str, top: int = 12) -> Path:
    """One horizontal bar chart per entry of `panels`, side by side: its `top` most counted names,
    the most counted at the top; a panel with nothing counted says so."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.3 * top + 1.4), dpi=110, squeeze=False)
    for ax, (label, counts) in zip(axes[0], panels.items(), strict=True):
        ranked = counts.most_common(top)[::-1]
        ax.barh([name for name, _ in ranked], [n for _, n in ranked], color="#d04a4a" if ax is axes[0][0] else "#9b9b9b")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.tick_params(axis="y", labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts
        if not ranked:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            ax.set_xticks([])
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
