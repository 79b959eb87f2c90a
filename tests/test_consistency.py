import json

import pytest
from helpers import ScriptedVLM, run_cli, save_tiny_random

from refloop.boxes import Box
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.evaluation.consistency import ConsistencyConfig, evaluate_consistency, sample_boxes


def make_records(tmp_path, n):
    from PIL import Image

    records = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (100, 100)).save(path)
        objs = (ObjectAnnotation(Box(i, 0, i + 10, 10), "thing", ann_id=i, expressions=(f"ref {i}",)),)
        records.append(ImageRecord(image_id=i, path=path, width=100, height=100, objects=objs))
    return records


def test_pr_at_05_mean_iou_and_parse_failures_hand_computed(tmp_path):
    records = make_records(tmp_path, 4)
    answers = {
        "box 0": Box(0, 0, 10, 10),  # IoU 1
        "box 1": Box(1, 0, 9, 10),  # IoU 0.8
        "box 2": Box(2, 0, 7, 10),  # IoU 0.5: not above 0.5
        # box 3 does not parse
        "ref 0": Box(0, 0, 10, 10),
        "ref 1": Box(50, 50, 60, 60),
    }
    samples = sample_boxes(records, 10)
    assert len(samples) == 4
    m = evaluate_consistency(ScriptedVLM(answers), samples, tmp_path / "out", ConsistencyConfig(batch_size=3))
    assert m["num_boxes"] == 4
    assert m["consistency_rate"] == pytest.approx(2 / 4)
    assert m["mean_iou"] == pytest.approx((1 + 0.8 + 0.5 + 0) / 4)
    assert m["parse_failure_rate"] == pytest.approx(1 / 4)
    assert m["rec_accuracy"] == pytest.approx(1 / 4)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["consistency_rate"] == m["consistency_rate"]


def test_resume_does_not_redo_finished_batches(tmp_path):
    records = make_records(tmp_path, 5)
    answers = {f"box {i}": Box(i, 0, i + 10, 10) for i in range(5)}
    calls = []

    class Counting(ScriptedVLM):
        def generate(self, images, prompts, options=None):
            calls.append(len(prompts))
            return super().generate(images, prompts, options)

    class Killed(Exception):
        pass

    def kill(done: int) -> None:
        raise Killed

    out, samples = tmp_path / "out", sample_boxes(records, 5)
    with pytest.raises(Killed):  # after the first batch (samples 0, 1) is written
        evaluate_consistency(Counting(answers), samples, out, ConsistencyConfig(batch_size=2), progress=kill)
    assert calls == [2]
    m = evaluate_consistency(Counting(answers), samples, out, ConsistencyConfig(batch_size=2))
    assert calls == [2, 2, 1]  # batches 1 and 2 only
    assert m["num_boxes"] == 5 and m["consistency_rate"] == 1.0
    assert [r["id"] for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())] == [s.sample_id for s in samples]
    # a rerun with every box done evaluates none: the rate stays the run's that did (it was null)
    again = evaluate_consistency(Counting(answers), samples, out, ConsistencyConfig(batch_size=2))
    assert calls == [2, 2, 1] and again["boxes_per_second"] == m["boxes_per_second"] > 0


def test_the_python_api_without_a_data_name_never_takes_other_boxes_for_this_runs(tmp_path):
    """evaluate_consistency without data_name (the README's snippet): the samples identify the run,
    so the same images with every box moved are another run, refused, not resumed from the old rows."""
    from dataclasses import replace

    from refloop.errors import RefloopError

    records = make_records(tmp_path, 3)
    answers = {f"box {i}": Box(i, 0, i + 10, 10) for i in range(3)}
    out = tmp_path / "out"
    assert evaluate_consistency(ScriptedVLM(answers), sample_boxes(records, 3), out, ConsistencyConfig())["consistency_rate"] == 1.0
    assert evaluate_consistency(ScriptedVLM(answers), sample_boxes(records, 3), out, ConsistencyConfig())["consistency_rate"] == 1.0
    moved = [replace(r, objects=tuple(replace(o, box=Box(50, 50, 60, 60)) for o in r.objects)) for r in records]
    with pytest.raises(RefloopError, match="holds outputs of another run"):
        evaluate_consistency(ScriptedVLM(answers), sample_boxes(moved, 3), out, ConsistencyConfig())


def test_one_box_per_image():
    recs = [
        ImageRecord(
            image_id=i, path=None, width=10, height=10, objects=tuple(ObjectAnnotation(Box(0, 0, 5, 5), "x", ann_id=j) for j in range(3))
        )
        for i in range(6)
    ]
    samples = sample_boxes(recs, 4, seed=1)
    assert [s.record.image_id for s in samples] == [0, 1, 2, 3]
    assert sample_boxes(recs, 4, seed=1) == samples


def test_cli_end_to_end_on_a_few_boxes(tmp_path, capsys):
    ckpt = save_tiny_random(tmp_path / "model")
    out = tmp_path / "run"
    cmd = [
        "consistency",
        "--data",
        "in-domain",
        "--model",
        str(ckpt),
        "--num-boxes",
        "6",
        "--batch-size",
        "4",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    code, _, err = run_cli(cmd, capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("consistency_rate", "mean_iou", "parse_failure_rate", "num_boxes", "boxes_per_second", "model", "data"):
        assert key in metrics
    assert metrics["num_boxes"] == 6 and metrics["data"] == "in-domain"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"image", "box", "caption", "predicted_box", "iou"} <= set(rows[0])
    for name in ("report.html", "best.png", "worst.png", "iou_hist.png"):
        assert (out / name).stat().st_size > 0


def test_fewer_images_than_num_boxes_is_said_not_silent(tmp_path, capsys, caplog):
    """One box per image: a file of 3 images gives 3 boxes for --num-boxes 6, and the run says so."""
    code, _, err = run_cli(["export-world", "--domain", "in-domain", "--num-images", "3", "--out", str(tmp_path / "w")], capsys)
    assert code == 0, err
    ckpt = save_tiny_random(tmp_path / "model")
    data = tmp_path / "w" / "instances.json"
    cmd = ["consistency", "--data", str(data), "--model", str(ckpt), "--num-boxes", "6", "--out", str(tmp_path / "run")]
    code, _, err = run_cli(cmd, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["num_boxes"] == 3
    assert "3 boxes evaluated, not 6 (num_boxes)" in " ".join((err + caplog.text).split())


def test_a_rerun_asking_fewer_boxes_says_the_samples_file_holds_more(tmp_path, capsys, caplog):
    code, _, err = run_cli(["export-world", "--domain", "in-domain", "--num-images", "6", "--out", str(tmp_path / "w")], capsys)
    assert code == 0, err
    ckpt, data = save_tiny_random(tmp_path / "model"), str(tmp_path / "w" / "instances.json")
    cmd = ["consistency", "--data", data, "--model", str(ckpt), "--batch-size", "4", "--out", str(tmp_path / "run")]
    assert run_cli([*cmd, "--num-boxes", "6"], capsys)[0] == 0
    assert run_cli([*cmd, "--num-boxes", "3"], capsys)[0] == 0  # the same run, fewer boxes: resumes, nothing recomputed
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["num_boxes"], metrics["samples_file_rows"]) == (3, 6)
    assert "holds 6 rows (an earlier run here evaluated more); metrics read the 3 asked for" in caplog.text


def test_a_rerun_naming_the_same_data_file_by_another_path_resumes(tmp_path, capsys, monkeypatch, caplog):
    """A scheduler resubmitting with absolute paths, or from another directory, named the same file
    differently: the run was refused as another one. The file's content identifies it; a file
    changed in place is still another run."""
    code, _, err = run_cli(["export-world", "--domain", "in-domain", "--num-images", "3", "--out", str(tmp_path / "w")], capsys)
    assert code == 0, err
    ckpt = save_tiny_random(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    args = ["consistency", "--num-boxes", "3", "--model", str(ckpt), "--out", str(tmp_path / "run"), "--device", "cpu", "--no-report"]
    assert run_cli([*args, "--data", "w/instances.json"], capsys)[0] == 0
    with caplog.at_level("INFO", logger="refloop"):
        code, _, err = run_cli([*args, "--data", str(tmp_path / "w" / "instances.json")], capsys)
    assert code == 0, err
    assert "all written already" in caplog.text
    data = json.loads((tmp_path / "w" / "instances.json").read_text())
    data["annotations"][0]["bbox"][0] += 1
    (tmp_path / "w" / "instances.json").write_text(json.dumps(data))
    code, _, err = run_cli([*args, "--data", "w/instances.json"], capsys)
    assert code == 2 and "holds outputs of another run" in err
