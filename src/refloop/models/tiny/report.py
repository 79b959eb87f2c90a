"""Learning curves of a refloop-tiny pretraining run, saved beside the checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refloop.data.jsonl import read_records  # noqa: E402


def write_curves(log_path: Path, out_dir: Path) -> Path:
    rows = read_records(log_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log_path, out_dir / "training_log.jsonl")
    loss = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "rec_acc" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    a.plot([r["elapsed_s"] / 60 for r in loss], [r["loss"] for r in loss], color="#4a7bd0", linewidth=1)
    a.set_xlabel("training minutes (2-core CPU)")
    a.set_ylabel("loss")
    a.set_yscale("log")
    a.set_title("training loss")
    minutes = [r.get("elapsed_s", 0) / 60 for r in evals]
    for key, label in (("rec_acc", "REC acc@0.5"), ("reg_exact", "REG exact match"), ("self_consistency", "self-consistency")):
        b.plot(minutes, [r[key] for r in evals], marker="o", markersize=3, label=label)
    b.set_ylim(0, 1)
    b.set_xlabel("training minutes (2-core CPU)")
    b.set_title("held-out in-domain scenes (200)")
    b.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out_dir / "learning_curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path
