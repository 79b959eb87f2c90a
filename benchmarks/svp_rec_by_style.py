"""REC of SVP-tuned adapters on in-domain vs `wild` referring data: is a REC loss after SVP a loss of
skill or of answer format, and on which image style?

    python benchmarks/svp_rec_by_style.py --adapter "S(q,p)=RUN/iteration-1/adapters/svp" \
        --adapter "S(q,p)+CVQ=RUN2/iteration-1/adapters/svp" [--pairs 400]

Adapters are the PEFT folders an SVP run writes (`benchmarks/svp_shapes.py` keeps them under its
--out). The base model is always evaluated. Writes benchmarks/results/svp_rec_by_style.json:
REC acc@0.5 and the share of unparseable answers per model and style.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from peft import PeftModel

from refloop.data.sources import load_data
from refloop.evaluation.referring import evaluate_rec
from refloop.models import load_vlm

RESULTS = Path(__file__).parent / "results"
STYLES = ("in-domain", "wild")  # the evaluation scenes of svp_shapes.py's REC column (wild) and the trained style


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="an SVP adapter folder (repeatable)")
    parser.add_argument("--pairs", type=int, default=400, help="referring pairs per style (svp_shapes.py: 400)")
    parser.add_argument("--images", type=int, default=200, help="evaluation scenes per style (svp_shapes.py: 200)")
    parser.add_argument("--out", default=str(RESULTS / "svp_rec_by_style.json"))
    args = parser.parse_args()
    os.environ.setdefault("REFLOOP_NO_PROGRESS", "1")
    models = {"base": None}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path, "adapter_config.json").is_file():
            parser.error(f"--adapter {spec!r}: expected NAME=DIR with DIR a PEFT adapter folder")
        models[name] = path
    data = {style: load_data(style, num_images=args.images)[0] for style in STYLES}
    table: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, adapter in models.items():
            vlm = load_vlm(None, batch_size=160)
            if adapter:
                vlm = vlm.with_module(PeftModel.from_pretrained(vlm.model, adapter).merge_and_unload())
            for style, records in data.items():
                out = Path(tmp) / name.replace("/", "_") / style
                m = evaluate_rec(vlm, records, out, limit=args.pairs, overwrite=True)
                table.setdefault(name, {})[style] = {
                    "rec_accuracy": round(100 * m["rec_accuracy"], 2),
                    "unparseable": round(100 * m["parse_failure_rate"], 2),
                }
                print(name, style, table[name][style], flush=True)
    result = {
        "benchmark": "svp_rec_by_style",
        "pairs_per_style": args.pairs,
        "adapters": {k: v for k, v in models.items() if v},
        "rec": table,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
