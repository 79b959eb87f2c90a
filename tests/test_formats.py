import json
import os
import pickle

import pytest
from PIL import Image

from refloop.boxes import Box
from refloop.data.formats import load_openimages, load_refcoco, load_visual_genome, read_refs
from refloop.errors import DataError


def image(root, name, size=(200, 100)):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)


# ---- OpenImages -------------------------------------------------------------------------------
BOXES_HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n"


def openimages_fixture(tmp_path, rows=None, names="/m/01,Cat\n/m/02,Dog\n"):
    image(tmp_path / "img", "abc.jpg")
    rows = rows or ["abc,xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0", "abc,xclick,/m/02,1,0.5,1.0,0.0,1.0,0,0,0,0,0"]
    (tmp_path / "boxes.csv").write_text(BOXES_HEADER + "\n".join(rows) + "\n")
    (tmp_path / "classes.csv").write_text(names)
    return tmp_path / "boxes.csv", tmp_path / "classes.csv", tmp_path / "img"


def test_openimages_round_trip(tmp_path):
    records, report = load_openimages(*openimages_fixture(tmp_path))
    (rec,) = records
    assert rec.size == (200, 100) and report.kept == 1
    assert [(o.category, o.box) for o in rec.objects] == [("Cat", Box(20, 20, 100, 60)), ("Dog", Box(100, 0, 200, 100))]


def test_openimages_class_file_with_header(tmp_path):
    records, _ = load_openimages(*openimages_fixture(tmp_path, names="LabelName,DisplayName\n/m/01,Cat\n/m/02,Dog\n"))
    assert records[0].objects[0].category == "Cat"


@pytest.mark.parametrize(
    "row, problem",
    [
        ("abc,xclick,/m/09,1,0.1,0.5,0.2,0.6,0,0,0,0,0", "label '/m/09' is not in classes.csv"),
        ("abc,xclick,/m/01,1,0.5,0.1,0.2,0.6,0,0,0,0,0", "x2 <= x1"),
        ("abc,xclick,/m/01,1,zero,0.5,0.2,0.6,0,0,0,0,0", "must be numbers"),
        ("missing,xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0", "image file not found"),
        ("../../etc/x,xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0", "escapes the image root"),
    ],
)
def test_openimages_malformed_row_is_named(tmp_path, row, problem):
    paths = openimages_fixture(tmp_path, rows=["abc,xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0", row])
    with pytest.raises(DataError, match=rf"boxes.csv, record line 3: .*{problem}"):
        load_openimages(*paths)
    records, report = load_openimages(*paths, on_error="skip")
    assert report.skipped == 1 and len(records[0].objects) == 1


def test_openimages_wrong_columns(tmp_path):
    boxes, names, root = openimages_fixture(tmp_path)
    boxes.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not an OpenImages boxes CSV"):
        load_openimages(boxes, names, root)


# ---- RefCOCO ----------------------------------------------------------------------------------
def refcoco_fixture(tmp_path, refs_format="json", mutate=None):
    image(tmp_path / "train2014", "COCO_train2014_000000000001.jpg")
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 200, "height": 100}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40]},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [100, 10, 50, 40]},
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    refs = [
        {
            "ref_id": 0,
            "ann_id": 11,
            "image_id": 1,
            "split": "train",
            "category_id": 1,
            "sentences": [{"sent": "man on the left", "raw": "Man on the left."}, {"sent": "left guy"}],
        },
        {"ref_id": 1, "ann_id": 12, "image_id": 1, "split": "testA", "category_id": 1, "sentences": [{"sent": "right man"}]},
    ]
    if mutate:
        mutate(refs)
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    if refs_format == "json":
        (tmp_path / "refs.json").write_text(json.dumps(refs))
        refs_path = tmp_path / "refs.json"
    else:
        refs_path = tmp_path / "refs(unc).p"
        refs_path.write_bytes(pickle.dumps(refs))
    return tmp_path / "instances.json", refs_path, tmp_path / "train2014"


@pytest.mark.parametrize("refs_format", ["json", "pickle"])
def test_refcoco_round_trip(tmp_path, refs_format):
    records, report = load_refcoco(*refcoco_fixture(tmp_path, refs_format))
    (rec,) = records
    assert [(o.box, o.expressions) for o in rec.objects] == [
        (Box(10, 10, 60, 50), ("man on the left", "left guy")),
        (Box(100, 10, 150, 50), ("right man",)),
    ]
    records, _ = load_refcoco(*refcoco_fixture(tmp_path, refs_format), split="testA")
    assert [o.expressions for o in records[0].objects] == [("right man",)]


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refs_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "payload": Exploit()}]))
    with pytest.raises(DataError, match="refusing to load"):
        read_refs(path)


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda refs: refs[1].update(ann_id=99), "ann_id 99 is not in instances.json"),
        (lambda refs: refs[1].update(sentences=[]), "no sentences"),
        (lambda refs: refs[1].pop("ann_id"), "missing field 'ann_id'"),
    ],
)
def test_refcoco_malformed_ref_is_named(tmp_path, mutate, problem):
    paths = refcoco_fixture(tmp_path, mutate=mutate)
    with pytest.raises(DataError, match=rf"refs.json, record refs\[1\]: {problem}"):
        load_refcoco(*paths)
    records, report = load_refcoco(*paths, on_error="skip")
    assert report.skipped == 1 and len(records[0].objects) == 1


# ---- Visual Genome ----------------------------------------------------------------------------
def vg_fixture(tmp_path, bad_region=False):
    image(tmp_path / "VG", "7.jpg")
    (tmp_path / "image_data.json").write_text(json.dumps([{"image_id": 7, "width": 200, "height": 100}]))
    (tmp_path / "objects.json").write_text(
        json.dumps([{"image_id": 7, "objects": [{"object_id": 1, "x": 5, "y": 5, "w": 20, "h": 30, "names": ["tree"]}]}])
    )
    regions = [{"region_id": 3, "image_id": 7, "phrase": "a tall tree", "x": 4, "y": 4, "width": 22, "height": 32}]
    if bad_region:
        regions.append({"region_id": 4, "image_id": 7, "phrase": "sky", "x": 0, "y": 0, "width": 0, "height": 10})
    (tmp_path / "region_descriptions.json").write_text(json.dumps([{"id": 7, "regions": regions}]))
    return tmp_path


def test_visual_genome_round_trip(tmp_path):
    root = vg_fixture(tmp_path)
    records, _ = load_visual_genome(root / "image_data.json", root / "VG", root / "objects.json", root / "region_descriptions.json")
    (rec,) = records
    assert [(o.category, o.box, o.expressions) for o in rec.objects] == [
        ("tree", Box(5, 5, 25, 35), ()),
        ("", Box(4, 4, 26, 36), ("a tall tree",)),
    ]


def test_visual_genome_bad_region_is_named(tmp_path):
    root = vg_fixture(tmp_path, bad_region=True)
    args = (root / "image_data.json", root / "VG", root / "objects.json", root / "region_descriptions.json")
    with pytest.raises(DataError, match=r"region_descriptions.json, record \[0\].regions\[1\]: .*x2 <= x1"):
        load_visual_genome(*args)
    _, report = load_visual_genome(*args, on_error="skip")
    assert report.skipped == 1
