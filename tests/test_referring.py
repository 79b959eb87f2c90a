import json
import shutil

import pytest
from helpers import run_cli, save_tiny_random
from test_formats import refcoco_fixture

from refloop.boxes import Box
from refloop.data.formats import load_refcoco
from refloop.evaluation.captions import caption_metrics
from refloop.evaluation.referring import evaluate_rec, evaluate_reg
from refloop.models.base import Located


class Scripted:
    """Locates scripted boxes per expression; describes every box by its left edge."""

    def __init__(self, boxes=None, captions=None):
        self.boxes, self.captions = boxes or {}, captions or {}

    def locate(self, images, expressions, options=None):
        return [Located(self.boxes.get(e), "") for e in expressions]

    def describe(self, images, boxes, options=None):
        return [self.captions.get(b.x1, "") for b in boxes]


def test_rec_accuracy_counts_every_expression(tmp_path):
    records, _ = load_refcoco(*refcoco_fixture(tmp_path))
    # left man: two expressions, one located exactly, one missed; right man: IoU 0.6 -> correct
    vlm = Scripted(boxes={"man on the left": Box(10, 10, 60, 50), "left guy": Box(150, 60, 160, 70), "right man": Box(100, 10, 150, 34)})
    m = evaluate_rec(vlm, records, tmp_path / "out", batch_size=2)
    assert m["num"] == 3
    assert m["rec_accuracy"] == pytest.approx(2 / 3)
    assert m["mean_iou"] == pytest.approx((1 + 0 + 0.6) / 3)


def test_caption_metrics_hand_computed_without_java():
    scores = caption_metrics({"a": "the red circle", "b": "a blue square"}, {"a": ["the red square"], "b": ["a blue square"]}, java=False)
    assert scores["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)  # corpus BLEU-1: 5 of 6 unigrams match
    assert scores["ROUGE-L"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-6)
    why = "java=False was passed" if shutil.which("java") else "java not found"  # forced off, not missing, when Java exists
    assert scores["METEOR"] is None and scores["meteor_backend"] == f"unavailable: {why}"


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_with_java_ranks_exact_above_wrong():
    refs = {"a": ["the red circle on the left"], "b": ["a small blue square"]}
    exact = caption_metrics({"a": "the red circle on the left", "b": "a small blue square"}, refs)
    wrong = caption_metrics({"a": "a yellow triangle", "b": "the green circle"}, refs)
    assert exact["meteor_backend"] == "meteor-1.5 (java)"
    assert exact["METEOR"] > 0.8 > 0.2 > wrong["METEOR"]


def test_reg_scores_generated_descriptions(tmp_path):
    records, _ = load_refcoco(*refcoco_fixture(tmp_path))
    vlm = Scripted(captions={10: "man on the left", 100: "left man"})
    m = evaluate_reg(vlm, records, tmp_path / "out", java=False)
    assert m["num"] == 2
    rows = [json.loads(x) for x in (tmp_path / "out" / "reg_samples.jsonl").read_text().splitlines()]
    assert rows[0]["references"] == ["man on the left", "left guy"]
    # "man on the left": 4 of 4 unigrams match; "left man" vs "right man": 1 of 2; lengths equal, no brevity penalty
    assert m["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)


@pytest.mark.parametrize("source", ["shapes", "refcoco"])
def test_eval_cli_runs_on_shapes_export_and_refcoco_fixture(tmp_path, source, capsys):
    model = save_tiny_random(tmp_path / "model")
    if source == "shapes":
        data = ["--data", "in-domain"]
    else:
        instances, refs, images = refcoco_fixture(tmp_path)
        data = ["--data", str(instances), "--refs", str(refs), "--images", str(images)]
    for task in ("rec", "reg"):
        out = tmp_path / f"out-{task}"
        cmd = [
            "eval",
            task,
            *data,
            "--model",
            str(model),
            "--out",
            str(out),
            "--limit",
            "4",
            "--device",
            "cpu",
        ]
        code, _, err = run_cli(cmd, capsys)
        assert code == 0, err[-2000:]
        metrics = json.loads((out / f"{task}_metrics.json").read_text())
        assert metrics["num"] == (2 if source == "refcoco" and task == "reg" else 3 if source == "refcoco" else 4)


def test_records_skipped_under_on_error_skip_are_counted_in_the_metrics_file(tmp_path, capsys):
    """`--on-error skip`: the metrics file people keep says its numbers are of a subset."""
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(tmp_path / "img.png")
    good = {"image_id": 1, "file_name": "img.png", "bbox": [1, 1, 19, 19], "sentences": ["the square"]}
    bad = {"image_id": 2, "file_name": "img.png", "bbox": [1, 1, 19], "sentences": ["the other square"]}
    data = tmp_path / "refs.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    model = save_tiny_random(tmp_path / "model")
    for task in ("rec", "reg"):
        out = tmp_path / task
        args = ["eval", task, "--data", str(data), "--model", str(model), "--out", str(out), "--on-error", "skip", "--no-report"]
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
        assert json.loads((out / f"{task}_metrics.json").read_text())["skipped_records"] == 1
