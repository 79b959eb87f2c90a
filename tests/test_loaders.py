import itertools
import json
import math
import re
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


def test_coco_attributes_travel_with_their_objects(tmp_path):
    data = coco_fixture(tmp_path)
    data["annotations"][0]["attributes"] = {"colour": "red", "size": "small", "occluded": True, "ids": [3, 4], "name": {"x": 1}}
    data["annotations"][2]["attributes"] = [1, 2]  # a dataset's own convention: not read, not refused
    records, report = load_coco(dump(tmp_path, data))
    assert report.skipped == 0
    assert [o.attributes for o in records[0].objects] == [{"colour": "red", "size": "small", "occluded": True}, {}]
    assert records[1].objects[0].attributes == {}
    plain, _ = load_coco(dump(tmp_path, coco_fixture(tmp_path), "plain.json"))
    assert all(o.attributes == {} for r in plain for o in r.objects)


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
    path.write_text(" \n")
    with pytest.raises(DataError, match="the file is empty"):
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
        (lambda r: r.update(file_name="img/missing.png", image_id=2), "image file not found"),  # image 1 is img/a.png
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


def test_cli_reports_bad_record_with_exit_code_2_and_no_traceback(tmp_path, capsys):
    from helpers import run_cli

    data = coco_fixture(tmp_path)
    data["annotations"][0].pop("bbox")
    path = dump(tmp_path, data)
    code, _, err = run_cli(["consistency", "--data", str(path), "--out", str(tmp_path / "out"), "--num-boxes", "2"], capsys)
    assert code == 2  # in this process: a traceback would have raised here
    assert "annotations[0]" in err and "missing field 'bbox'" in err


def test_pixel_commands_fail_on_a_missing_image_with_exit_code_2(tmp_path, capsys):
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
    from helpers import run_cli

    code, _, message = run_cli(["consistency", "--data", str(path), "--out", str(tmp_path / "out"), "--num-boxes", "2"], capsys)
    assert code == 2, message
    assert "instances.json, record images[1] (id 2): image file not found" in message


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


# ---- issue 9: ids name one thing ------------------------------------------------------------------
def test_coco_image_id_reused_is_refused(tmp_path):
    """A second `images` entry reusing an id used to move the first image's boxes onto the second
    file (exit 0). Refused naming file and entry; under skip every entry of that id goes (which
    file its boxes belong to is unknown), and so do its boxes, all counted."""
    from refloop.data.loaders import read_coco_table

    write_images(tmp_path, ["c.png"])
    data = coco_fixture(tmp_path)
    data["images"].append({"id": 1, "file_name": "img/c.png", "width": 64, "height": 48})
    path = dump(tmp_path, data)
    with pytest.raises(DataError, match=r"instances.json, record images\[2\]: image id 1 is already used by images\[0\]"):
        load_coco(path)
    records, report = load_coco(path, on_error="skip")
    assert [r.image_id for r in records] == [2]
    assert report.skipped == 4  # images[2], images[0], and the two boxes of image 1
    table, _ = read_coco_table(path, on_error="skip")
    assert table.image_ids == [2] and table.num_boxes == 1


def test_coco_annotation_id_reused_within_an_image_is_refused_naming_the_first(tmp_path):
    """Two boxes of one image with one id were read silently, and outputs keyed by image and
    annotation id (samples, pairs) took them for one: the later one is refused, or skipped and
    counted. The same id on another image (files merged, ids restarting) and a crowd annotation's
    id are no collision."""
    data = coco_fixture(tmp_path)
    data["annotations"][1]["id"] = 10  # image 1's second box reuses its first box's id
    data["annotations"][2]["id"] = 10  # and image 2's box too: another image, no collision
    data["annotations"][3]["id"] = 10  # the crowd annotation of image 2 shares its box's id: not a box
    path = dump(tmp_path, data)
    with pytest.raises(DataError, match=r"record annotations\[1\]: annotation id 10 is already the id of annotations\[0\], a box"):
        load_coco(path)
    records, report = load_coco(path, on_error="skip")
    assert report.skipped == 1 and [[o.ann_id for o in r.objects] for r in records] == [[10], [10]]


def test_coco_category_id_reused_with_another_name_is_refused(tmp_path):
    data = coco_fixture(tmp_path)
    data["categories"].append({"id": 1, "name": "bowl"})
    with pytest.raises(DataError, match=r"categories\[2\]: category id 1 is already the category 'cup', not 'bowl'"):
        load_coco(dump(tmp_path, data))
    records, report = load_coco(dump(tmp_path, data), on_error="skip")  # which name its boxes have is unknown: they go
    assert [[o.category for o in r.objects] for r in records] == [["dog"], []] and report.skipped == 3
    data["categories"][2]["name"] = "cup"  # the same category twice is harmless
    assert load_coco(dump(tmp_path, data))[1].skipped == 0


def test_referring_image_id_reused_with_another_file_is_refused(tmp_path):
    write_images(tmp_path, ["b.png"])
    rows = refs_fixture(tmp_path)
    rows[1]["file_name"] = "img/b.png"
    path = write_jsonl(tmp_path, rows)
    with pytest.raises(
        DataError, match=r"refs.jsonl, record line 2: image_id 1 is the image 'img/a.png' on line 1, but this line names 'img/b.png'"
    ):
        load_referring(path)
    records, report = load_referring(path, on_error="skip")
    assert report.skipped == 1 and [len(r.objects) for r in records] == [1] and records[0].file_name == "img/a.png"
    rows[1]["file_name"] = "img/./a.png"  # another spelling of the same file is the same image
    records, report = load_referring(write_jsonl(tmp_path, rows))
    assert report.skipped == 0 and len(records[0].objects) == 2


def test_referring_image_id_reused_with_another_size_is_refused(tmp_path):
    rows = [r | {"width": 64, "height": 48} for r in refs_fixture(tmp_path)]
    rows[1].update(width=128)
    with pytest.raises(DataError, match=r"line 2: image_id 1 is 64x48 on line 1, but this line says 128x48"):
        load_referring(write_jsonl(tmp_path, rows))


# ---- issue 9: pixels as displayed -----------------------------------------------------------------
def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG (mode I;16) used to read as all white (values clipped at 255)."""
    import numpy as np

    from refloop.data.images import read_rgb

    values = np.array([[0, 257, 257 * 100, 257 * 200, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    rgb = read_rgb(tmp_path / "deep.png", "src", "rec")
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, :, 0].tolist() == [0, 1, 100, 200, 255, 128]
    assert (np.asarray(rgb)[..., 0] == np.asarray(rgb)[..., 2]).all()
    # mode I (32-bit samples; 16-bit in practice) through TIFF, clipped to 0..65535 first
    Image.fromarray(np.array([[-5, 0, 257 * 50, 65535, 100000]], dtype=np.int32)).save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == "I"
    assert np.asarray(read_rgb(tmp_path / "deep.tif", "src", "rec"))[0, :, 1].tolist() == [0, 0, 50, 255, 255]
    # 8-bit images read as before
    Image.new("L", (3, 2), 77).save(tmp_path / "gray.png")
    assert np.asarray(read_rgb(tmp_path / "gray.png", "src", "rec")).tolist() == np.asarray(Image.new("RGB", (3, 2), (77, 77, 77))).tolist()


def _oriented_jpeg(path: Path, orientation: int, size=(64, 48)) -> None:
    img = Image.new("RGB", size, (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, size[0] // 2, size[1] // 3))  # a mark in the top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_images_are_read_with_exif_orientation_applied(tmp_path, orientation):
    """Pixels are those of `ImageOps.exif_transpose`; the size a header check sees is the displayed
    one too, so annotations (width, height, boxes) refer to the image as displayed."""
    import numpy as np
    from PIL import ImageOps

    from refloop.data.images import check_image, image_size, read_rgb

    path = tmp_path / "photo.jpg"
    _oriented_jpeg(path, orientation)
    with Image.open(path) as img:
        want = ImageOps.exif_transpose(img).convert("RGB")
    got = read_rgb(path, "src", "rec")
    assert got.size == want.size == image_size(path, "src", "rec")
    assert np.array_equal(np.asarray(got), np.asarray(want))
    displayed = (48, 64) if orientation >= 5 else (64, 48)
    assert got.size == displayed
    check_image(path, displayed, "src", "rec")
    if orientation >= 5:
        with pytest.raises(DataError, match="is 48x64 but the annotation says 64x48"):
            check_image(path, (64, 48), "src", "rec")


def test_coco_annotations_refer_to_the_displayed_image(tmp_path):
    _oriented_jpeg(tmp_path / "p.jpg", 6, size=(80, 40))  # stored 80x40, displayed 40x80
    data = {
        "images": [{"id": 1, "file_name": "p.jpg", "width": 40, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 50, 40, 30]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    records, _ = load_coco(dump(tmp_path, data), verify_images=True)
    assert records[0].load_image().size == (40, 80)
    data["images"][0].update(width=80, height=40)
    with pytest.raises(DataError, match=r"images\[0\] \(id 1\): image .*p.jpg is 40x80 but the annotation says 80x40"):
        load_coco(dump(tmp_path, data), verify_images=True)


# ---- issue 9: image size limit --------------------------------------------------------------------
def test_image_pixel_limit_is_a_setting_and_skippable(tmp_path, monkeypatch):
    from refloop.data import images

    write_images(tmp_path, ["big.png"], size=(64, 100))
    data = coco_fixture(tmp_path)
    data["images"][1].update(file_name="img/big.png", height=100)
    path = dump(tmp_path, data)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 64 * 48)
    with pytest.raises(
        DataError, match=r"images\[1\] \(id 2\): image .*big.png is too large: 64x100 = 6400 pixels, more than .*MAX_IMAGE_PIXELS \(3072\)"
    ):
        load_coco(path, verify_images=True)
    records, report = load_coco(path, on_error="skip", verify_images=True)
    assert [r.image_id for r in records] == [1] and report.skipped == 2  # the image, then its box
    with pytest.raises(DataError, match="too large"):
        images.read_rgb(tmp_path / "img" / "big.png", "src", "rec")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", None)
    assert load_coco(path, verify_images=True)[1].skipped == 0


def test_decompression_bomb_is_a_data_error_also_under_skip(tmp_path, monkeypatch):
    """PIL's own check (DecompressionBombError at twice PIL's limit) is reported like any unreadable image."""
    from refloop.data import images

    rows = refs_fixture(tmp_path)
    write_images(tmp_path, ["bomb.png"], size=(100, 100))
    rows.append(dict(rows[1], image_id=2, file_name="img/bomb.png", ref_id=3))
    path = write_jsonl(tmp_path, rows)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 // 2 + 1)  # a.png passes PIL's check, bomb.png does not
    with pytest.raises(DataError, match=r"refs.jsonl, record line 3: image .*bomb.png is too large"):
        load_referring(path)
    records, report = load_referring(path, on_error="skip", verify_images=True)
    assert [r.image_id for r in records] == [1] and report.skipped == 1 and report.reasons
    with pytest.raises(DataError, match="too large"):
        images.read_rgb(tmp_path / "img" / "bomb.png", "src", "rec")


# ---- issue 9: every bad data file is a DataError --------------------------------------------------
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _text_case(name: str, tmp_path: Path) -> bytes:
    """Whole files, bytes as written."""
    good = json.dumps(coco_fixture(tmp_path))
    return {
        "deep nesting": f'{{"images": {_nested(100_000)}}}'.encode(),
        "latin-1": good.replace("cup", "caf\u00e9").encode("latin-1"),
        "utf-16 without a mark": good.encode("utf-16-le"),
        "5000-digit integer": good.replace('"width": 64', '"width": ' + "9" * 5000, 1).encode(),
        "top-level array": json.dumps([coco_fixture(tmp_path)]).encode(),
        "top-level string": b'"images"',
        "empty": b"",
    }[name]


@pytest.mark.parametrize(
    "case", ["deep nesting", "latin-1", "utf-16 without a mark", "5000-digit integer", "top-level array", "top-level string", "empty"]
)
def test_unusable_json_file_is_a_data_error(tmp_path, case):
    path = tmp_path / "instances.json"
    path.write_bytes(_text_case(case, tmp_path))
    for on_error in ("fail", "skip"):
        with pytest.raises(DataError) as info:
            load_coco(path, on_error=on_error)
        assert info.value.path == path and info.value.record is None


def _unsourced(records: list) -> list:
    import dataclasses

    return [dataclasses.replace(r, source="") for r in records]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_text_with_a_byte_order_mark_is_read(tmp_path, encoding):
    """UTF-8 with a BOM (and UTF-16/32 with theirs) read the same records as plain UTF-8."""
    data = coco_fixture(tmp_path)
    data["categories"][0]["name"] = "caf\u00e9"
    want, _ = load_coco(dump(tmp_path, data))
    path = tmp_path / "bom.json"
    path.write_bytes(json.dumps(data, ensure_ascii=False).encode(encoding))
    assert _unsourced(load_coco(path)[0]) == _unsourced(want)
    assert want[0].objects[0].category == "caf\u00e9"
    rows = refs_fixture(tmp_path)
    rows[0]["sentences"] = ["the left caf\u00e9"]
    want, _ = load_referring(write_jsonl(tmp_path, rows))
    path = tmp_path / "bom.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    assert _unsourced(load_referring(path)[0]) == _unsourced(want)


def test_a_directory_or_unusable_name_as_data_file_is_a_data_error(tmp_path):
    from refloop.data.sources import load_data
    from refloop.errors import RefloopError

    with pytest.raises(RefloopError, match="is a directory: give its annotation file"):
        load_data(str(tmp_path))
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DataError, match="dir.json: is a directory"):
        load_coco(tmp_path / "dir.json")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        load_referring(tmp_path / "dir.jsonl")
    with pytest.raises(DataError, match="not a usable file name"):
        load_coco(tmp_path / "a\x00b.json")


RECORD_CASES = {
    # name: (mutation, record named, problem)
    "image id a list": (
        lambda d: d["images"][1].update(id=[2]),
        "images[1]",
        "field 'id' must be a string or a number (integers of at most 64 bits), got [2]",
    ),
    "image id an object": (lambda d: d["images"][1].update(id={"a": 2}), "images[1]", "must be a string or a number"),
    "image id a boolean": (lambda d: d["images"][0].update(id=True), "images[0]", "(integers of at most 64 bits), got True"),
    "annotation image_id a list": (lambda d: d["annotations"][1].update(image_id=[1]), "annotations[1]", "field 'image_id' must be"),
    "annotation image_id an object": (lambda d: d["annotations"][1].update(image_id={}), "annotations[1]", "field 'image_id' must be"),
    "annotation category_id a list": (lambda d: d["annotations"][1].update(category_id=[2]), "annotations[1]", "field 'category_id' must"),
    "annotation category_id true": (lambda d: d["annotations"][0].update(category_id=True), "annotations[0]", "field 'category_id' must"),
    "annotation id an object": (lambda d: d["annotations"][1].update(id={"x": 1}), "annotations[1]", "field 'id' must be"),
    "category id a list": (lambda d: d["categories"][1].update(id=[2]), "categories[1]", "field 'id' must be"),
    "category name a list": (lambda d: d["categories"][1].update(name=["dog"]), "categories[1]", "field 'name' must be a string"),
    "width beyond floats": (lambda d: d["images"][1].update(width=10**400), "images[1]", "beyond the float range"),
    "width infinite (1e400)": (lambda d: d["images"][1].update(width=math.inf), "images[1]", "must be a finite number"),
    "width beyond images": (lambda d: d["images"][1].update(width=1e300), "images[1]", "beyond any image"),
    "bbox with a huge integer": (
        lambda d: d["annotations"][1].update(bbox=[30, 10, 10**400, 20]),
        "annotations[1]",
        "beyond the float range",
    ),
    "bbox nested": (lambda d: d["annotations"][1].update(bbox=[[[[[30]]]], 10, 5, 20]), "annotations[1]", "must be a finite number"),
    "file name with NUL": (lambda d: d["images"][1].update(file_name="img/b\x00.png"), "images[1]", "not a usable file name"),
    "file name unencodable": (lambda d: d["images"][1].update(file_name="img/\ud800.png"), "images[1]", "not a usable file name"),
    "file name a list": (lambda d: d["images"][1].update(file_name=["img/b.png"]), "images[1]", "must be a non-empty string"),
    "image entry a number": (lambda d: d["images"].__setitem__(1, 7), "images[1]", "expected an object, got int"),
}


@pytest.mark.parametrize("case", RECORD_CASES)
def test_coco_record_of_the_wrong_type_is_named_and_skippable(tmp_path, case):
    """These raised TypeError (unhashable), OverflowError or ValueError; now a DataError naming file
    and record, or skipped and counted."""
    mutate, record, problem = RECORD_CASES[case]
    data = coco_fixture(tmp_path)
    mutate(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data).replace("Infinity", "1e400"))
    for verify in (False, True):
        with pytest.raises(DataError) as info:
            load_coco(path, verify_images=verify)
        assert str(path) in str(info.value) and info.value.record.startswith(record) and problem in info.value.problem
        records, report = load_coco(path, on_error="skip", verify_images=verify)
        assert report.skipped >= 1 and report.kept == len(records) >= 1


def test_deeply_nested_value_inside_a_record_is_named(tmp_path):
    """Nesting JSON can parse (below the recursion limit) never reaches repr or hashing."""
    data = coco_fixture(tmp_path)
    data["annotations"][1]["bbox"] = "DEEP"
    data["images"][1]["id"] = "DEEPER"
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data).replace('"DEEP"', _nested(600)).replace('"DEEPER"', _nested(700)))
    with pytest.raises(
        DataError, match=r"images\[1\]: field 'id' must be a string or a number \(integers of at most 64 bits\), got \[\[\[\[\.\.\.\]\]\]\]"
    ):
        load_coco(path)
    records, report = load_coco(path, on_error="skip")
    assert [r.image_id for r in records] == [1] and report.skipped == 3


def test_symlink_loop_in_the_image_root_is_a_data_error(tmp_path):
    data = coco_fixture(tmp_path)
    (tmp_path / "img" / "loop.png").symlink_to("loop.png")
    data["images"][1]["file_name"] = "img/loop.png"
    with pytest.raises(DataError, match=r"images\[1\] \(id 2\): cannot resolve image path 'img/loop.png'"):
        load_coco(dump(tmp_path, data))


JSONL_CASES = {
    "broken JSON": "{broken",
    "not UTF-8": b'{"image_id": 1, "file_name": "caf\xe9"}',
    "deep nesting": _nested(100_000),
    "5000-digit integer": '{"image_id": ' + "1" * 5000 + "}",
    "a number": "7",
    "image_id a list": {"image_id": [1], "file_name": "img/a.png", "bbox": [1, 1, 2, 2], "sentences": ["x"]},
    "ref_id an object": {"ref_id": {}, "image_id": 1, "file_name": "img/a.png", "bbox": [1, 1, 2, 2], "sentences": ["x"]},
    "category a list": {"category": ["a"], "image_id": 1, "file_name": "img/a.png", "bbox": [1, 1, 2, 2], "sentences": ["x"]},
    "width huge": {"width": 10**400, "height": 48, "image_id": 1, "file_name": "img/a.png", "bbox": [1, 1, 2, 2], "sentences": ["x"]},
    "width zero": {"width": 0, "height": 48, "image_id": 1, "file_name": "img/a.png", "bbox": [1, 1, 2, 2], "sentences": ["x"]},
    "sentences a string": {"image_id": 1, "file_name": "img/a.png", "bbox": [1, 1, 2, 2], "sentences": "the dog"},
    "file name with NUL": {"image_id": 1, "file_name": "img/\x00a.png", "bbox": [1, 1, 2, 2], "sentences": ["x"]},
}


@pytest.mark.parametrize("case", JSONL_CASES)
def test_referring_bad_line_is_named_and_skipping_it_reads_on(tmp_path, case):
    """A bad line under skip is counted and the lines after it are still read (the generator used
    to stop at the first bad line, dropping the rest of the file uncounted)."""
    rows = refs_fixture(tmp_path)
    bad = JSONL_CASES[case]
    path = tmp_path / "refs.jsonl"
    lines = [json.dumps(rows[0]).encode(), bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad)).encode()]
    path.write_bytes(b"\n".join([*lines, json.dumps(rows[1]).encode()]) + b"\n")
    with pytest.raises(DataError) as info:
        load_referring(path)
    assert info.value.record == "line 2" and str(path) in str(info.value)
    records, report = load_referring(path, on_error="skip")
    assert report.skipped == 1 and [len(r.objects) for r in records] == [2]
