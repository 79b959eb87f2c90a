import json
import subprocess
import sys

from PIL import Image

from refloop.boxes import Box
from refloop.data import load_coco
from refloop.data.filters import sctune_triplets


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


def test_filter_cli_writes_one_triplet_per_line(tmp_path):
    path = crafted_coco(tmp_path)
    out = tmp_path / "triplets.jsonl"
    proc = subprocess.run([sys.executable, "-m", "refloop.cli", "filter", str(path), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) >= {"image_id", "category", "boxes", "file_name"} for r in rows] == [True, True]
    assert rows[0]["boxes"] == [[0, 0, 20, 20], [50, 50, 70, 70]] and rows[0]["file_name"] == "im/1.png"
    assert "triplets_kept" in proc.stdout
