import json
import shutil

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from refloop.boxes import Box
from refloop.data import load_coco
from refloop.data.filters import sctune_triplets
from refloop.data.loaders import read_coco_table


def crafted_coco(tmp_path):
    """Five 100x100 images, each exercising one rule of SC-Tune appendix 9."""
    (tmp_path / "im").mkdir()
    images, anns = [], []

    def add(image_id, boxes):
        Image.new("RGB", (100, 100)).save(tmp_path / "im" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"im/{image_id}.png", "width": 100, "height": 100})
        for cat, xywh in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": xywh, "iscrowd": 0})

    add(1, [(1, [0, 0, 20, 20]), (1, [50, 50, 20, 20]), (2, [0, 60, 30, 30])])  # kept: 2 cups
    add(2, [(1, [0, 0, 20, 20]), (2, [50, 50, 20, 20])])  # no repeated category
    add(3, [(1, [0, 0, 20, 20]), (1, [2, 2, 20, 20]), (2, [60, 60, 30, 30]), (2, [10, 60, 30, 30])])  # cups overlap; dogs kept
    add(4, [(1, [0, 0, 20, 20]), (1, [50, 50, 10, 10])])  # 100 px = 1% of the image: too small
    add(5, [(1, [0, 0, 20, 20]), (1, [40, 0, 20, 20]), (2, [41, 1, 20, 20]), (2, [80, 80, 15, 15])])  # a cup overlaps a dog
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "dog"}]}
    path = tmp_path / "det.json"
    path.write_text(json.dumps(coco))
    return path


def test_filter_rules_on_crafted_file(tmp_path):
    records, _ = load_coco(crafted_coco(tmp_path))
    triplets, counts = sctune_triplets(records)
    assert [(t.image_id, t.category) for t in triplets] == [(1, "cup"), (3, "dog")]
    assert triplets[0].boxes == (Box(0, 0, 20, 20), Box(50, 50, 70, 70))
    assert counts.images_without_repeats == 1
    assert counts.dropped_overlap == 3  # image 3 cups, image 5 cups and dogs
    assert counts.dropped_small == 1
    assert counts.as_dict()["images_kept"] == 2 and counts.boxes_kept == 4


def test_filter_excludes_held_out_images(tmp_path):
    records, _ = load_coco(crafted_coco(tmp_path))
    triplets, counts = sctune_triplets(records, exclude_image_ids={1})
    assert [t.image_id for t in triplets] == [3] and counts.images_excluded == 1


def test_filter_cli_writes_one_triplet_per_line(tmp_path, capsys):
    path = crafted_coco(tmp_path)
    out = tmp_path / "triplets.jsonl"
    code, stdout, err = run_cli(["filter", str(path), "--out", str(out)], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) >= {"image_id", "category", "boxes", "file_name"} for r in rows] == [True, True]
    assert rows[0]["boxes"] == [[0, 0, 20, 20], [50, 50, 70, 70]] and rows[0]["file_name"] == "im/1.png"
    assert "triplets_kept" in stdout


def test_filter_works_when_images_are_absent(tmp_path, capsys):
    """Annotation-only work reads no pixels: the filter runs on a detection file whose images are
    not on this machine, and writes the triplets it writes when they are."""
    path = crafted_coco(tmp_path)
    with_images = tmp_path / "with.jsonl"
    cmd = ["filter", str(path)]
    assert run_cli([*cmd, "--out", str(with_images)], capsys)[0] == 0
    shutil.rmtree(tmp_path / "im")
    out = tmp_path / "triplets.jsonl"
    code, stdout, err = run_cli([*cmd, "--out", str(out)], capsys)
    assert code == 0, err
    assert out.read_text() == with_images.read_text() and len(out.read_text().splitlines()) == 2
    assert '"skipped_records": 0' in stdout


def test_filter_without_images_still_confines_paths(tmp_path, capsys):
    data = json.loads(crafted_coco(tmp_path).read_text())
    shutil.rmtree(tmp_path / "im")
    data["images"][2]["file_name"] = "im/../../elsewhere/3.png"
    path = tmp_path / "escaping.json"
    path.write_text(json.dumps(data))
    cmd = ["filter", str(path), "--out", str(tmp_path / "t.jsonl")]
    code, _, message = run_cli(cmd, capsys)  # an error is one message (exit 2), never a traceback (it would raise here)
    assert code == 2 and "escaping.json, record images[2] (id 3)" in message and "escapes the image root" in message
    code, stdout, _ = run_cli([*cmd, "--on-error", "skip"], capsys)
    assert code == 0 and '"skipped_records": 5' in stdout  # the image, then each of its 4 boxes


def random_coco(seed: int, num_images: int = 60) -> dict:
    """Messy detections: boxes leaving the image (clipped) or wholly outside it (skipped), crowd
    boxes, annotations out of image order, two category ids sharing a name, string and missing ids."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "file_name": f"im/{i}.jpg", "width": 100, "height": 80} for i in range(num_images)]
    anns = []
    for i in range(num_images * 6):
        image = int(rng.integers(num_images))
        x, y = (float(v) for v in rng.uniform(-10, 90, size=2).round(2))
        w, h = (int(v) if rng.random() < 0.3 else float(v) for v in rng.uniform(1, 40, size=2).round(1))
        ann = {"id": i if i % 7 else f"a{i}", "image_id": image, "category_id": int(rng.integers(4)), "bbox": [x, y, w, h]}
        ann["iscrowd"] = int(rng.random() < 0.05)
        if i % 11 == 0:
            del ann["id"]
        anns.append(ann)
    cats = [{"id": 0, "name": "cup"}, {"id": 1, "name": "dog"}, {"id": 2, "name": "cup"}, {"id": 3, "name": "cat"}]
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filter_on_table_equals_filter_on_records(tmp_path, seed):
    """The columnar path (`read_coco_table`, what `refloop filter` runs) keeps exactly the triplets
    of the record path, to the byte: same order, same boxes (clipped ones included), same counts."""
    path = tmp_path / "det.json"
    path.write_text(json.dumps(random_coco(seed)))
    table, table_report = read_coco_table(path, on_error="skip")  # a few boxes lie wholly outside their image
    records, record_report = load_coco(path, on_error="skip")
    assert table_report.skipped == record_report.skipped > 0
    exclude = {3, "5"}
    for iou, area in [(0.5, 0.02), (0.2, 0.0), (1.0, 0.05)]:
        by_table, table_counts = sctune_triplets(table, iou, area, exclude)
        by_records, record_counts = sctune_triplets(records, iou, area, exclude)
        assert [json.dumps(t.to_json()) for t in by_table] == [json.dumps(t.to_json()) for t in by_records]
        assert table_counts.as_dict() == record_counts.as_dict()
    assert by_table and table_counts.images_excluded == 2
    # one object per box in the table only when asked for: load_coco's records are rebuilt from it
    assert [(o.box, o.category, o.ann_id) for r in table.records() for o in r.objects] == [
        (o.box, o.category, o.ann_id) for r in records for o in r.objects
    ]
