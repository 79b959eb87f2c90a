"""A base model between refloop-tiny's two stages (issue 20): theta = (1 - alpha) * stage 1 +
alpha * stage 2, a WiSE-FT-style weight interpolation (Wortsman et al., 2022) of the committed
stage-1 checkpoint (from git history: the packaged weights before commit 6641298) and the packaged
model that continued it. No training.

    python benchmarks/base_interpolation.py --alpha 0.5 --out runs/tiny-mid

Writes the interpolated checkpoint to --out (the packaged model's config, tokenizer and processor
files beside the new weights) and prints Pr@0.5 and REC of stage 1, the interpolation and stage 2
on --boxes validation boxes per style (scene seed 7; never the evaluation seed). The methods'
gates are then run on --out with the benchmarks' own --model / --set model= options; the rule and
the numbers are in benchmarks/results/base_interpolation_validation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from refloop.data.sources import load_data
from refloop.evaluation.consistency import ConsistencyConfig, evaluate_consistency, sample_boxes
from refloop.models import default_model_path, load_vlm

ROOT = Path(__file__).resolve().parents[1]
STAGE1_COMMIT = "6641298^"  # the last commit whose packaged weights were stage 1's
WEIGHTS = "src/refloop/assets/refloop-tiny/model.safetensors"


def interpolate(alpha: float, out: Path) -> Path:
    packaged = Path(default_model_path())
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "refloop_processor.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(packaged / name, out / name)
    with tempfile.TemporaryDirectory() as tmp:
        stage1_path = Path(tmp) / "stage1.safetensors"
        git = ["git", "-C", str(ROOT), "show", f"{STAGE1_COMMIT}:{WEIGHTS}"]
        stage1_path.write_bytes(subprocess.run(git, capture_output=True, check=True).stdout)
        stage1 = load_file(stage1_path)
    stage2 = load_file(packaged / "model.safetensors")
    assert stage1.keys() == stage2.keys() and all(stage1[k].shape == stage2[k].shape for k in stage2)
    mixed = {k: ((1 - alpha) * stage1[k].float() + alpha * stage2[k].float()).to(stage2[k].dtype).contiguous() for k in stage2}
    save_file(mixed, out / "model.safetensors", metadata={"format": "pt"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of stage 2 (0: stage 1, 1: the packaged model)")
    parser.add_argument("--out", type=Path, required=True, help="directory of the interpolated checkpoint")
    parser.add_argument("--boxes", type=int, default=300, help="validation boxes per style (one per scene)")
    parser.add_argument("--seed", type=int, default=7, help="scene seed of the validation split")
    args = parser.parse_args()
    os.environ.setdefault("REFLOOP_NO_PROGRESS", "1")
    mid = interpolate(args.alpha, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        stage1 = interpolate(0.0, Path(tmp) / "stage1")
        table = {}
        for name, path in (("stage 1", stage1), (f"alpha {args.alpha}", mid), ("stage 2 (packaged)", None)):
            vlm = load_vlm(str(path) if path else None, batch_size=64)
            for style in ("in-domain", "crowded", "wild"):
                records = load_data(style, num_images=args.boxes, seed=args.seed)[0]
                cfg = ConsistencyConfig(num_boxes=args.boxes)
                m = evaluate_consistency(vlm, sample_boxes(records, cfg.num_boxes, cfg.seed), Path(tmp) / name / style, cfg)
                row = {"pr@0.5": round(100 * m["consistency_rate"], 1), "rec": round(100 * m["rec_accuracy"], 1)}
                table.setdefault(name, {})[style] = row
            print(name, json.dumps(table[name]), flush=True)


if __name__ == "__main__":
    main()
