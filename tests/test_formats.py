import json
import os
import pickle
import re

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


# ---- issue 9: wrong types, reused ids, bad files ----------------------------------------------------
def test_refcoco_sentences_given_as_a_string_are_refused(tmp_path):
    """A string used to be read letter by letter: one-letter expressions, exit 0."""
    paths = refcoco_fixture(tmp_path, mutate=lambda refs: refs[1].update(sentences="right man"))
    with pytest.raises(DataError, match=r"refs.json, record refs\[1\]: field 'sentences' must be a list of sentences, got a string"):
        load_refcoco(*paths)
    records, report = load_refcoco(*paths, on_error="skip")
    assert report.skipped == 1 and [o.expressions for o in records[0].objects] == [("man on the left", "left guy")]


def _instances(tmp_path, mutate):
    instances = json.loads((tmp_path / "instances.json").read_text())
    mutate(instances)
    (tmp_path / "instances.json").write_text(json.dumps(instances))


@pytest.mark.parametrize(
    "mutate, record, problem",
    [
        (
            lambda d: d["images"].append(dict(d["images"][0], file_name="other.jpg")),
            r"images\[1\]",
            "id 1 is already used by images\\[0\\]",
        ),
        (lambda d: d["annotations"].append(dict(d["annotations"][0], bbox=[0, 0, 5, 5])), r"annotations\[2\]", "id 11 is already used"),
        (lambda d: d["images"][0].update(id=[1]), r"images\[0\]", "field 'id' must be a string or a number"),
        (lambda d: d["annotations"][1].update(id={"a": 1}), r"annotations\[1\]", "field 'id' must be a string or a number"),
        (lambda d: d["annotations"][1].update(image_id=[1]), r"refs\[1\]", r"image_id \[1\] is not in instances.json"),
        (lambda d: d["images"][0].update(width=10**400), r"image 1", "beyond the float range"),
        (lambda d: d["images"][0].update(width=0), r"image 1", "image size must be positive"),
        (lambda d: d["categories"][0].update(name={"n": 1}), r"category 1", "field 'name' must be a string"),
        (lambda d: d["images"].__setitem__(0, "image"), r"images\[0\]", "expected an object, got str"),
    ],
)
def test_refcoco_instances_of_the_wrong_type_are_named(tmp_path, mutate, record, problem):
    paths = refcoco_fixture(tmp_path)
    _instances(tmp_path, mutate)
    with pytest.raises(DataError, match=rf"(instances|refs).json, record {record}: .*{problem}"):
        load_refcoco(*paths)
    _, report = load_refcoco(*paths, on_error="skip")
    assert report.skipped >= 1


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda refs: refs[1].update(ann_id=[12]), "field 'ann_id' must be a string or a number"),
        (lambda refs: refs[1].update(ann_id={"id": 12}), "field 'ann_id' must be a string or a number"),
        (lambda refs: refs[1].update(category_id=[1]), "field 'category_id' must be a string or a number"),
        (lambda refs: refs[1].update(ref_id={"x": 1}), "field 'ref_id' must be a string or a number"),
        (lambda refs: refs[1].update(sentences=7), "field 'sentences' must be a list of sentences, got a number"),
        (lambda refs: refs.__setitem__(1, ["ann_id", 12]), "expected an object, got list"),
    ],
)
@pytest.mark.parametrize("refs_format", ["json", "pickle"])
def test_refcoco_refs_of_the_wrong_type_are_named(tmp_path, mutate, problem, refs_format):
    paths = refcoco_fixture(tmp_path, refs_format, mutate=mutate)
    with pytest.raises(DataError, match=rf"record refs\[1\]: {problem}"):
        load_refcoco(*paths)
    records, report = load_refcoco(*paths, on_error="skip")
    assert report.skipped == 1 and len(records[0].objects) == 1


def test_refcoco_split_must_be_a_string(tmp_path):
    paths = refcoco_fixture(tmp_path, mutate=lambda refs: refs[1].update(split=["testA"]))
    with pytest.raises(DataError, match=r"refs\[1\]: field 'split' must be a string"):
        load_refcoco(*paths, split="testA")


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\x80\x04\x95", "cannot read refs pickle safely: UnpicklingError"),  # cut short
        (b"h\x05.", "cannot read refs pickle safely"),  # an unknown memo entry (KeyError)
        (b"a.", "cannot read refs pickle safely"),  # an append to nothing
        (pickle.dumps({"refs": []}), "expected a list of refs, got an object"),
        (b"", "cannot read refs pickle safely: EOFError"),
    ],
)
def test_malformed_refs_pickle_is_a_data_error(tmp_path, content, problem):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(problem)):
        read_refs(path)


def test_deeply_nested_pickle_value_is_named_without_recursion(tmp_path):
    """A pickle nests without recursion (a 100,000-deep list loads); messages never repr it whole."""
    refs = [{"ref_id": 0, "ann_id": "DEEP", "split": "train", "sentences": ["x"]}]
    raw = pickle.dumps(refs, protocol=0)
    depth = 100_000
    path = tmp_path / "refs(unc).p"
    path.write_bytes(raw.replace(b"VDEEP\n", b"]" * depth + b"a" * (depth - 1)))
    instances, _, root = refcoco_fixture(tmp_path)
    with pytest.raises(
        DataError,
        match=r"refs\[0\]: field 'ann_id' must be a string or a number \(integers of at most 64 bits\), got \[\[\[\[\.\.\.\]\]\]\]",
    ):
        load_refcoco(instances, path, root)


def test_refcoco_bad_files_are_data_errors(tmp_path):
    instances, refs, root = refcoco_fixture(tmp_path)
    refs.write_text(json.dumps({"refs": []}))
    with pytest.raises(DataError, match="expected a list of refs, got an object"):
        load_refcoco(instances, refs, root, on_error="skip")
    instances.write_text("[]")
    with pytest.raises(DataError, match="instances.json: expected a JSON object at the top level, got an array"):
        load_refcoco(instances, refs, root, on_error="skip")
    instances.write_text(json.dumps({"images": {"id": 1}}))
    with pytest.raises(DataError, match="'images' must be a list, got an object"):
        load_refcoco(instances, refs, root, on_error="skip")


def write_vg(tmp_path, meta=None, objects=None, regions=None):
    root = vg_fixture(tmp_path)
    for name, value in (("image_data.json", meta), ("objects.json", objects), ("region_descriptions.json", regions)):
        if value is not None:
            (root / name).write_text(json.dumps(value))
    return root / "image_data.json", root / "VG", root / "objects.json", root / "region_descriptions.json"


GOOD_OBJECT = {"object_id": 1, "x": 5, "y": 5, "w": 20, "h": 30, "names": ["tree"]}
GOOD_REGION = {"region_id": 3, "image_id": 7, "phrase": "a tall tree", "x": 4, "y": 4, "width": 22, "height": 32}


@pytest.mark.parametrize(
    "files, record, problem",
    [
        ({"meta": [{"image_id": 7, "width": 200, "height": 100}, 7]}, r"image_data.json, record images\[1\]", "expected an object"),
        ({"meta": [{"image_id": [7], "width": 200, "height": 100}]}, r"images\[0\]", "field 'image_id' must be"),
        ({"meta": [{"image_id": 7, "width": 200, "height": 100}, {"id": 7, "width": 20, "height": 10}]}, r"images\[1\]", "already used"),
        ({"meta": [{"image_id": 7, "width": 10**400, "height": 100}]}, r"images\[0\]", "beyond the float range"),
        ({"objects": [{"image_id": 7, "objects": "tree"}]}, r"objects.json, record \[0\]", "field 'objects' must be a list"),
        ({"objects": [{"image_id": {}, "objects": []}]}, r"\[0\]", "field 'image_id' must be"),
        (
            {"objects": [{"image_id": 7, "objects": [dict(GOOD_OBJECT, names="tree"), GOOD_OBJECT]}]},
            r"\[0\].objects\[0\]",
            "'names' must be a list",
        ),
        (
            {"objects": [{"image_id": 7, "objects": [dict(GOOD_OBJECT, names=[["tree"]]), GOOD_OBJECT]}]},
            r"objects\[0\]",
            "must be a string",
        ),
        (
            {"objects": [{"image_id": 7, "objects": [dict(GOOD_OBJECT, object_id=[1]), GOOD_OBJECT]}]},
            r"objects\[0\]",
            "'object_id' must be",
        ),
        ({"objects": [{"image_id": 7, "objects": [7, GOOD_OBJECT]}]}, r"objects\[0\]", "expected an object, got int"),
        (
            {"regions": [7, {"id": 7, "regions": [GOOD_REGION]}]},
            r"region_descriptions.json, record \[0\]",
            "expected an object, got a number",
        ),
        ({"regions": [{"id": 7, "regions": "sky"}, {"id": 7, "regions": [GOOD_REGION]}]}, r"\[0\]", "field 'regions' must be a list"),
        (
            {"regions": [{"id": 7, "regions": [dict(GOOD_REGION, phrase=["sky"]), GOOD_REGION]}]},
            r"regions\[0\]",
            "'phrase' must be a string",
        ),
        ({"regions": [{"id": 7, "regions": [dict(GOOD_REGION, image_id=[7]), GOOD_REGION]}]}, r"regions\[0\]", "'image_id' must be"),
    ],
)
def test_visual_genome_rows_of_the_wrong_type_are_named(tmp_path, files, record, problem):
    args = write_vg(tmp_path, **files)
    with pytest.raises(DataError, match=rf"{record}: .*{problem}"):
        load_visual_genome(*args)
    _, report = load_visual_genome(*args, on_error="skip")
    assert report.skipped >= 1


def test_visual_genome_skipping_a_bad_object_keeps_the_rest(tmp_path):
    """A bad object used to end its image's object list under skip: the objects after it were lost uncounted."""
    args = write_vg(tmp_path, objects=[{"image_id": 7, "objects": [dict(GOOD_OBJECT, w=0), GOOD_OBJECT, dict(GOOD_OBJECT, object_id=2)]}])
    records, report = load_visual_genome(*args, on_error="skip")
    assert report.skipped == 1 and [o.ann_id for o in records[0].objects if not o.expressions] == [1, 2]


@pytest.mark.parametrize("name", ["image_data.json", "objects.json", "region_descriptions.json"])
def test_visual_genome_top_level_must_be_an_array(tmp_path, name):
    args = write_vg(tmp_path)
    (tmp_path / name).write_text(json.dumps({"image_id": 7}))
    with pytest.raises(DataError, match=rf"{name}: expected a JSON array of .* at the top level, got an object"):
        load_visual_genome(*args, on_error="skip")


@pytest.mark.parametrize(
    "row, problem",
    [
        ("abc,xclick,/m/01", "the row has fewer fields than the header"),  # raised TypeError (float(None))
        ("abc,xclick,/m/01,1," + "9" * 5000 + ",0.5,0.2,0.6,0,0,0,0,0", "non-finite"),  # a 5000-digit number is a float (inf)
        ("abc,xclick,/m/01,1,nan,0.5,0.2,0.6,0,0,0,0,0", "non-finite"),
        ('abc,xclick,/m/01,1,"' + "x" * 200_000 + '",0.5,0.2,0.6,0,0,0,0,0', "not valid CSV: field larger than field limit"),  # csv.Error
        ("ab\x00c,xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0", "not a usable file name"),
    ],
)
def test_openimages_rows_of_the_wrong_shape_are_named(tmp_path, row, problem):
    paths = openimages_fixture(
        tmp_path, rows=["abc,xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0", row, "abc,xclick,/m/02,1,0.5,1.0,0.0,1.0,0,0,0,0,0"]
    )
    with pytest.raises(DataError, match=rf"boxes.csv, record line 3: .*{problem}"):
        load_openimages(*paths)
    records, report = load_openimages(*paths, on_error="skip")
    assert report.skipped == 1 and [o.category for o in records[0].objects] == ["Cat", "Dog"]
    assert [o.ann_id for o in records[0].objects] == [2, 4]


def test_openimages_files_in_other_encodings(tmp_path):
    boxes, names, root = openimages_fixture(tmp_path)
    want, _ = load_openimages(boxes, names, root)
    boxes.write_bytes(boxes.read_text().encode("utf-8-sig"))  # a BOM before the header used to hide the ImageID column
    names.write_bytes(names.read_text().encode("utf-16"))
    got, _ = load_openimages(boxes, names, root)
    assert [(r.image_id, r.objects) for r in got] == [(r.image_id, r.objects) for r in want]
    names.write_bytes("/m/01,Caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"classes.csv: not UTF-8 text: invalid continuation byte at byte 9, line 1"):
        load_openimages(boxes, names, root, on_error="skip")
    boxes.unlink()
    boxes.mkdir()
    names.write_text("/m/01,Cat\n")
    with pytest.raises(DataError, match="boxes.csv: is a directory"):
        load_openimages(boxes, names, root)


def test_refs_pickle_integer_too_long_to_print_is_refused(tmp_path):
    """A pickle can hold an integer Python refuses to print (over 4300 digits); as an id it would
    break every message and output that names it."""
    paths = refcoco_fixture(tmp_path, "pickle", mutate=lambda refs: refs[1].update(ref_id=10**5000))
    with pytest.raises(DataError, match=r"refs\[1\]: field 'ref_id' must be .* got <an integer of about 5000 digits>"):
        load_refcoco(*paths)
    records, report = load_refcoco(*paths, on_error="skip")
    assert report.skipped == 1 and len(records[0].objects) == 1


def test_eval_rec_on_an_empty_refcoco_split_names_the_split(tmp_path, capsys):
    from helpers import assert_refused, run_cli

    instances, refs, images = refcoco_fixture(tmp_path)
    args = ["eval", "rec", "--data", str(instances), "--refs", str(refs), "--images", str(images), "--out", str(tmp_path / "o")]
    assert_refused(run_cli([*args, "--split", "testB"], capsys), "no referring expression in split 'testB'")
