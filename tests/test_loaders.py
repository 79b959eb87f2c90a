import itertools
import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from refloop.boxes import Box
from refloop.data import load_coco, load_referring
from refloop.errors import DataError


def write_images(root: Path, names: list[str], size=(64, 48)) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, (200, 10, 10)).save(root / "img" / name)


def coco_fixture(root: Path) -> dict:
    write_images(root, ["a.png", "b.png"])
    return {
        "images": [
            {"id": 1, "file_name": "img/a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "img/b.png", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 20], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [30, 10, 20, 20], "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 1, "bbox": [0, 0, 64, 48], "iscrowd": 0},
            {"id": 13, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "dog"}],
    }


def dump(root: Path, data: dict, name="instances.json") -> Path:
    path = root / name
    path.write_text(json.dumps(data))
    return path


def test_coco_round_trip(tmp_path):
    records, report = load_coco(dump(tmp_path, coco_fixture(tmp_path)))
    assert report.kept == 2 and report.skipped == 0
    first = records[0]
    assert first.image_id == 1 and first.size == (64, 48)
    assert [(o.category, o.box) for o in first.objects] == [("cup", Box(4, 4, 14, 24)), ("dog", Box(30, 10, 50, 30))]
    assert len(records[1].objects) == 1  # the crowd box is ignored
    assert first.load_image().size == (64, 48)


def test_coco_loader_agrees_with_pycocotools(tmp_path):
    """The reference COCO API reads the same file into the same non-crowd boxes and names."""
    from pycocotools.coco import COCO

    path = dump(tmp_path, coco_fixture(tmp_path))
    records, _ = load_coco(path)
    api = COCO(str(path))
    for record in records:
        anns = api.loadAnns(api.getAnnIds(imgIds=[record.image_id], iscrowd=False))
        want = [(api.loadCats(a["category_id"])[0]["name"], Box.from_xywh(*a["bbox"])) for a in anns]
        assert [(o.category, o.box) for o in record.objects] == want


def test_objects365_layout_loads(tmp_path):
    """Objects365 v2: nested patch folders in file_name, extra fields (isfake, license), float boxes."""
    folder = tmp_path / "images" / "v2" / "patch16"
    folder.mkdir(parents=True)
    Image.new("RGB", (80, 60)).save(folder / "objects365_v2_01234567.jpg")
    data = {
        "images": [{"id": 7, "file_name": "images/v2/patch16/objects365_v2_01234567.jpg", "width": 80, "height": 60, "license": 5}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10.5, 5.25, 20.0, 30.0], "iscrowd": 0, "isfake": 0, "area": 600.0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [50, 10, 10, 10], "iscrowd": 1, "isfake": 0, "area": 100.0},
        ],
        "categories": [{"id": 3, "name": "Person", "supercategory": "human"}],
        "licenses": [{"id": 5, "name": "x", "url": ""}],
    }
    records, report = load_coco(dump(tmp_path, data, "zhiyuan_objv2_val.json"))
    assert report.kept == 1
    assert [(o.category, o.box) for o in records[0].objects] == [("Person", Box(10.5, 5.25, 30.5, 35.25))]


MALFORMED = {
    "missing field": (lambda d: d["annotations"][0].pop("bbox"), "annotations[0]", "missing field 'bbox'"),
    "bad box": (lambda d: d["annotations"][1].update(bbox=[30, 10, -5, 20]), "annotations[1]", "x2 <= x1"),
    "nan box": (lambda d: d["annotations"][1].update(bbox=[30, 10, math.nan, 20]), "annotations[1]", "finite number"),
    "unknown category": (lambda d: d["annotations"][0].update(category_id=9), "annotations[0]", "category_id 9"),
    "missing image": (lambda d: d["images"][1].update(file_name="img/nope.png"), "images[1]", "image file not found"),
    "path escaping root": (lambda d: d["images"][1].update(file_name="../../etc/passwd"), "images[1]", "escapes the image root"),
    "absolute path": (lambda d: d["images"][1].update(file_name="/etc/passwd"), "images[1]", "absolute"),
    "wrong size": (lambda d: d["images"][0].update(width=65), "images[0]", "annotation says 65x48"),
}


PIXEL_CASES = {"missing image", "wrong size"}  # found only when the images are checked


@pytest.mark.parametrize("case", MALFORMED)
def test_coco_malformed_record_is_named(tmp_path, case):
    mutate, record, problem = MALFORMED[case]
    data = coco_fixture(tmp_path)
    mutate(data)
    path = dump(tmp_path, data)
    with pytest.raises(DataError) as info:
        load_coco(path, verify_images=True)
    message = str(info.value)
    assert str(path) in message and record in message and problem in message
    records, report = load_coco(path, on_error="skip", verify_images=True)
    assert report.skipped >= 1
    assert len(records) >= 1
    # annotation-only (the default): the same record errors, image files never looked at
    if case in PIXEL_CASES:
        assert load_coco(path)[1].skipped == 0
    else:
        with pytest.raises(DataError, match=re.escape(problem)):
            load_coco(path)


def test_corrupt_image_is_rejected(tmp_path):
    data = coco_fixture(tmp_path)
    (tmp_path / "img" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match=r"images\[1\].*cannot read image"):
        load_coco(dump(tmp_path, data), verify_images=True)


def test_not_a_coco_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_coco(path)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="not a COCO-style"):
        load_coco(path)


def refs_fixture(root: Path) -> list[dict]:
    write_images(root, ["a.png"])
    return [
        {
            "ref_id": 1,
            "image_id": 1,
            "file_name": "img/a.png",
            "bbox": [4, 4, 10, 20],
            "sentences": ["the left cup", "cup"],
            "category": "cup",
        },
        {"ref_id": 2, "image_id": 1, "file_name": "img/a.png", "bbox": [30, 10, 20, 20], "sentences": ["the dog"], "category": "dog"},
    ]


def write_jsonl(root: Path, rows: list, name="refs.jsonl") -> Path:
    path = root / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_referring_round_trip(tmp_path):
    records, report = load_referring(write_jsonl(tmp_path, refs_fixture(tmp_path)))
    assert report.kept == 1
    (rec,) = records
    assert rec.size == (64, 48)
    assert [o.expressions for o in rec.objects] == [("the left cup", "cup"), ("the dog",)]
    assert rec.objects[1].box == Box(30, 10, 50, 30)


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda r: r.pop("sentences"), "missing field 'sentences'"),
        (lambda r: r.update(sentences=[]), "non-empty list"),
        (lambda r: r.update(bbox=[0, 0, 0, 5]), "x2 <= x1"),
        (lambda r: r.update(file_name="../secret.png"), "escapes the image root"),
        (lambda r: r.update(file_name="img/missing.png"), "image file not found"),
    ],
)
def test_referring_malformed_line_is_named(tmp_path, mutate, problem):
    rows = refs_fixture(tmp_path)
    mutate(rows[1])
    path = write_jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=rf"refs.jsonl, record line 2: .*{problem}"):
        load_referring(path)
    records, report = load_referring(path, on_error="skip")
    assert report.skipped == 1 and len(records[0].objects) == 1


def test_referring_bad_json_line_is_skippable(tmp_path):
    rows = refs_fixture(tmp_path)
    path = write_jsonl(tmp_path, [rows[0], "{broken", rows[1]])
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_referring(path)


def test_cli_reports_bad_record_with_exit_code_2_and_no_traceback(tmp_path):
    data = coco_fixture(tmp_path)
    data["annotations"][0].pop("bbox")
    path = dump(tmp_path, data)
    proc = subprocess.run(
        [sys.executable, "-m", "refloop.cli", "consistency", "--data", str(path), "--out", str(tmp_path / "out"), "--num-boxes", "2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "annotations[0]" in proc.stderr and "missing field 'bbox'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_pixel_commands_fail_on_a_missing_image_with_exit_code_2(tmp_path):
    """Commands that read pixels check the images when loading: a missing file is named with its
    annotation file and record before any model loads; exit code 2, no traceback."""
    from refloop.data.sources import load_data

    data = coco_fixture(tmp_path)
    (tmp_path / "img" / "b.png").unlink()
    path = dump(tmp_path, data)
    with pytest.raises(DataError, match=r"instances.json, record images\[1\] \(id 2\): image file not found: .*b.png"):
        load_data(str(path))
    records, report = load_data(str(path), on_error="skip")
    assert [r.image_id for r in records] == [1] and report.skipped == 2  # the image, then its box
    proc = subprocess.run(
        [sys.executable, "-m", "refloop.cli", "consistency", "--data", str(path), "--out", str(tmp_path / "out"), "--num-boxes", "2"],
        capture_output=True,
        text=True,
    )
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    assert "instances.json, record images[1] (id 2): image file not found" in message and "Traceback" not in message


def test_corrupt_pixels_surface_at_load_naming_file_and_record(tmp_path):
    """The check reads the header only; a body that does not decode is a DataError when the pixels
    are read, naming the annotation file and the image."""
    data = coco_fixture(tmp_path)
    png = (tmp_path / "img" / "b.png").read_bytes()
    (tmp_path / "img" / "b.png").write_bytes(png[: len(png) // 2])  # header intact, image data cut
    records, _ = load_coco(dump(tmp_path, data), verify_images=True)
    assert records[0].load_image().size == (64, 48)
    with pytest.raises(DataError, match=r"instances.json, record 2: cannot read image .*b.png"):
        records[1].load_image()


@pytest.fixture
def count_opens(monkeypatch):
    """PIL.Image.open calls per file name."""
    opened: Counter = Counter()
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened[Path(fp).name] += 1
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def test_each_image_is_opened_at_most_once_when_checked(tmp_path, count_opens):
    coco = dump(tmp_path, coco_fixture(tmp_path))
    load_coco(coco)
    assert sum(count_opens.values()) == 0  # annotation-only: no image file touched
    load_coco(coco, verify_images=True)
    assert count_opens == {"a.png": 1, "b.png": 1}
    count_opens.clear()
    rows = refs_fixture(tmp_path)  # two lines name img/a.png
    for sized in (False, True):
        count_opens.clear()
        refs = write_jsonl(tmp_path, [r | {"width": 64, "height": 48} if sized else r for r in rows])
        load_referring(refs, verify_images=True)
        assert count_opens == {"a.png": 1}
    load_referring(refs)  # sizes in the file, not checked: no open
    assert count_opens == {"a.png": 1}


def test_image_root_resolves_like_a_full_resolve_without_the_files(tmp_path):
    """ImageRoot (folders resolved once) agrees with Path.resolve name by name, through symlinked
    folders and files inside and outside the root, with files present or absent."""
    from refloop.data.paths import ImageRoot

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(b"")
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "real" / "a.png").write_bytes(b"")
    (root / "link_out").symlink_to(outside)
    (root / "link_in").symlink_to(root / "real")
    (root / "real" / "out.png").symlink_to(outside / "x.png")
    (root / "real" / "in.png").symlink_to("a.png")
    parts = ["real", "link_out", "link_in", "..", ".", "missing", "a.png", "out.png", "in.png", "x.png", "root"]
    names = ["/".join(p) for n in (1, 2, 3) for p in itertools.product(parts, repeat=n)]
    resolver = ImageRoot(root)

    def outcome(resolve, name):
        try:
            return str(resolve(name))
        except DataError as err:
            return err.problem

    def reference(name):
        resolved = (root.resolve() / name).resolve()
        if not resolved.is_relative_to(root.resolve()):
            raise DataError("src", "rec", f"image path {name!r} escapes the image root {root.resolve()}")
        return resolved

    for name in names:
        assert outcome(lambda n: resolver.resolve(n, "src", "rec"), name) == outcome(reference, name), name
    assert "escapes" in outcome(lambda n: resolver.resolve(n, "src", "rec"), "link_out/never-there.png")
    assert "escapes" in outcome(lambda n: resolver.resolve(n, "src", "rec"), "real/out.png")
    assert outcome(lambda n: resolver.resolve(n, "src", "rec"), "link_in/in.png") == str(root.resolve() / "real" / "a.png")
