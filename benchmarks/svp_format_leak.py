"""Where an SVP adapter's REC loss comes from, per shapes-world style: REC accuracy, the share of
box answers that do not parse, and the accuracy of those that do, for the base model and the base
with an SVP adapter merged (an `adapters/svp` folder of a `svp_shapes.py` run). The adapter is
merged onto the base, so it must be a first iteration's (I = 1: later iterations' adapters were
trained on the previous iteration's merged model).

    python benchmarks/svp_format_leak.py --adapter RUN/seed0/ROW/iteration-1/adapters/svp --result FILE

Diagnostic for issue 20: after captions-only SFT at C = 1000 the tuned model starts a box answer
and then writes caption words; this measures whether that happens on every style or only on the
style the seed images share (`wild`). Evaluation split (seed EVAL_SEED), 400 pairs per style.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from peft import PeftModel

from refloop.data.sources import load_data
from refloop.evaluation.referring import evaluate_rec
from refloop.models import load_vlm
from refloop.world import DOMAINS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a PEFT adapter folder written by an SVP run")
    parser.add_argument("--model", default=None, help="the adapter's base model (default: refloop-tiny)")
    parser.add_argument("--eval-images", type=int, default=200, help="held-out scenes per style")
    parser.add_argument("--rec-limit", type=int, default=400, help="REC pairs per style")
    parser.add_argument("--out", default="runs/svp-format-leak")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"--adapter {adapter}: no adapter_config.json (expected a PEFT adapter folder)")
    os.environ.setdefault("REFLOOP_NO_PROGRESS", "1")
    torch.set_num_threads(int(os.environ.get("REFLOOP_THREADS", "2")))
    records = {d: load_data(d, num_images=args.eval_images)[0] for d in DOMAINS}
    result: dict[str, dict] = {}
    for arm in ("base", "svp adapter merged"):
        vlm = load_vlm(args.model, batch_size=64)
        if arm != "base":
            merged = PeftModel.from_pretrained(vlm.model, adapter).merge_and_unload()
            vlm = vlm.with_module(merged, lineage=[*vlm.lineage, {"merged_adapter": str(adapter)}])
        for domain, recs in records.items():
            m = evaluate_rec(vlm, recs, Path(args.out) / arm.replace(" ", "-") / domain, limit=args.rec_limit, overwrite=True)
            parsed = 1 - m["parse_failure_rate"]
            result.setdefault(arm, {})[domain] = {
                "rec_accuracy": round(100 * m["rec_accuracy"], 1),
                "unparseable": round(100 * m["parse_failure_rate"], 1),
                "accuracy_of_parsed_answers": round(100 * m["rec_accuracy"] / parsed, 1) if parsed else None,
            }
            print(arm, domain, result[arm][domain], flush=True)
    summary = {
        "benchmark": "svp_format_leak",
        "command": "python benchmarks/svp_format_leak.py " + " ".join(sys.argv[1:]),
        "adapter": str(adapter),
        "rec_pairs_per_style": args.rec_limit,
        "styles": result,
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
