"""Every sharded command, run in one `accelerate launch` (each process runs them all, in order):
`python -m accelerate.commands.launch ... dist_sharded_worker.py ROOT MODEL RECIPE REFS`. The test
(test_distributed.py) runs the same commands in one process and compares the outputs."""

import sys
from pathlib import Path


def jobs(model: str, out: Path, svp_recipe: str, refs: str) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """name -> (command line, files equal byte for byte, JSON files equal but for timings); `refs`:
    a small referring file (REC/REG read every expression of every scene it has)."""
    common = ["--model", model, "--device", "cpu"]
    shapes = ["--data", "in-domain", *common, "--batch-size", "4"]
    referring = ["--data", refs, *common, "--batch-size", "4"]
    return {
        "consistency": (
            ["consistency", *shapes, "--num-boxes", "12", "--no-report", "--out", str(out / "consistency")],
            ["samples.jsonl"],
            ["metrics.json"],
        ),
        "rec": (["eval", "rec", *referring, "--limit", "14", "--out", str(out / "rec")], ["rec_samples.jsonl"], ["rec_metrics.json"]),
        "reg": (["eval", "reg", *referring, "--limit", "10", "--out", str(out / "reg")], ["reg_samples.jsonl"], ["reg_metrics.json"]),
        "caption-eval": (
            ["eval", "caption", *shapes, "--num-images", "10", "--out", str(out / "caption-eval")],
            ["caption_samples.jsonl"],
            ["caption_metrics.json"],
        ),
        "pope": (["eval", "pope", *shapes, "--num-images", "5", "--out", str(out / "pope")], ["pope_samples.jsonl"], ["pope_metrics.json"]),
        "caption": (["caption", *shapes, "--num-images", "10", "--out", str(out / "caption")], ["captions.jsonl"], []),
        "isvp": (["caption", *shapes, "--num-images", "10", "--isvp", "--out", str(out / "isvp")], ["captions.jsonl"], []),
        "bootstrap": (
            ["bootstrap", "--data", "crowded", "--num-images", "12", *common, "--samples", "2", "--batch-size", "2", "--no-report"]
            + ["--out", str(out / "bootstrap")],
            ["candidates.jsonl", "pairs.jsonl", "refs.json", "instances.json", "records.jsonl"],
            ["stats.json"],
        ),
        "svp": (["svp", "--config", svp_recipe, "--out", str(out / "svp")], ["iteration-1/samples.jsonl"], []),
    }


def without_java(which):
    """`shutil.which` that finds no Java: text metrics use the simple tokenizer and no METEOR (each
    Java start costs many seconds; test_referring covers METEOR), the same on both sides."""
    return lambda name, *args, **kwargs: None if name == "java" else which(name, *args, **kwargs)


if __name__ == "__main__":
    import shutil

    from refloop.cli import app
    from refloop.parallel import end_process_group

    shutil.which = without_java(shutil.which)

    root, model, recipe, refs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    for args, _, _ in jobs(model, root / "two", recipe, refs).values():
        app(args=args, standalone_mode=False, prog_name="refloop")
    end_process_group()
