"""Property tests over every data loader (issue 9): whatever a data file holds - mutations of valid
fixtures with values of the wrong type, missing keys, huge numbers, NaN, deep nesting, duplicated
entries, other encodings, cut or corrupted bytes - the only exception a loader raises is refloop's
own (RefloopError; DataError naming the file). Under on_error="skip" a loader returns records, or
raises a DataError of the whole file (no record named). What it returns is sane: one record per
image id, positive sizes, finite boxes inside their image; SC-Tune's filter runs on it.

Deterministic (derandomize) and bounded (max_examples) to stay well under a minute on 2 cores.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from PIL import Image, features

from refloop.boxes import validate_box
from refloop.data.filters import sctune_triplets
from refloop.data.formats import load_openimages, load_refcoco, load_visual_genome, read_refs
from refloop.data.images import image_size, read_rgb
from refloop.data.loaders import load_coco, load_referring, read_coco_table
from refloop.errors import DataError


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )


# ---- fixtures: valid files, and the images they name ----------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "img").mkdir()
    for name, size in (("a.png", (64, 48)), ("b.png", (32, 40))):
        Image.new("RGB", size, (200, 10, 10)).save(root / "img" / name)
    Image.new("RGB", (200, 100)).save(root / "img" / "abc.jpg")
    Image.new("RGB", (200, 100)).save(root / "img" / "7.jpg")
    Image.new("RGB", (100, 80)).save(root / "img" / "8.jpg")
    (root / "img" / "loop.png").symlink_to("loop.png")
    return root


COCO = {
    "images": [
        {"id": 1, "file_name": "img/a.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "img/b.png", "width": 32, "height": 40},
    ],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 20], "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [30, 10, 20, 20], "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 2, "bbox": [0, 0, 32, 40], "iscrowd": 0},
        {"id": 13, "image_id": 2, "category_id": 2, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        {"id": 14, "image_id": 2, "category_id": 2, "bbox": [10.5, 20.25, 8, 9]},
    ],
    "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "dog"}],
}
REFERRING = [
    {"ref_id": 1, "image_id": 1, "file_name": "img/a.png", "bbox": [4, 4, 10, 20], "sentences": ["the left cup", "cup"], "category": "cup"},
    {"ref_id": 2, "image_id": 1, "file_name": "img/a.png", "bbox": [30, 10, 20, 20], "sentences": ["the dog"], "category": "dog"},
    {"ref_id": 3, "image_id": 2, "file_name": "img/b.png", "bbox": [1, 1, 20, 20], "sentences": ["b"], "width": 32, "height": 40},
]
REFCOCO_INSTANCES = {
    "images": [{"id": 7, "file_name": "7.jpg", "width": 200, "height": 100}, {"id": 8, "file_name": "8.jpg", "width": 100, "height": 80}],
    "annotations": [
        {"id": 11, "image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 40]},
        {"id": 12, "image_id": 7, "category_id": 1, "bbox": [100, 10, 50, 40]},
        {"id": 13, "image_id": 8, "category_id": 2, "bbox": [0, 0, 10, 10]},
    ],
    "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
}
REFCOCO_REFS = [
    {
        "ref_id": 0,
        "ann_id": 11,
        "image_id": 7,
        "split": "train",
        "category_id": 1,
        "sentences": [{"sent": "man on the left", "raw": "Man."}],
    },
    {"ref_id": 1, "ann_id": 12, "image_id": 7, "split": "testA", "category_id": 1, "sentences": [{"sent": "right man"}, "a man"]},
    {"ref_id": 2, "ann_id": 13, "image_id": 8, "split": "train", "sentences": [{"raw": "dog"}]},
]
VG_META = [{"image_id": 7, "width": 200, "height": 100}, {"id": 8, "width": 100, "height": 80}]
VG_OBJECTS = [
    {
        "image_id": 7,
        "objects": [
            {"object_id": 1, "x": 5, "y": 5, "w": 20, "h": 30, "names": ["tree"]},
            {"object_id": 2, "x": 50, "y": 5, "w": 20, "h": 30, "name": "tree"},
        ],
    },
    {"image_id": 8, "objects": [{"object_id": 3, "x": 0, "y": 0, "w": 100, "h": 80, "names": ["sky"]}]},
]
VG_REGIONS = [
    {"id": 7, "regions": [{"region_id": 3, "image_id": 7, "phrase": "a tall tree", "x": 4, "y": 4, "width": 22, "height": 32}]},
    {"id": 8, "regions": [{"region_id": 4, "image_id": 8, "phrase": "sky", "x": 1, "y": 1, "width": 50, "height": 50}]},
]
OPENIMAGES_HEADER = ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax", "IsGroupOf"]
OPENIMAGES_ROWS = [
    ["abc", "xclick", "/m/01", "1", "0.1", "0.5", "0.2", "0.6", "0"],
    ["abc", "xclick", "/m/02", "1", "0.5", "1.0", "0.0", "1.0", "0"],
    ["abc", "xclick", "/m/01", "1", "0.2", "0.3", "0.2", "0.3", "0"],
]
OPENIMAGES_NAMES = [["LabelName", "DisplayName"], ["/m/01", "Cat"], ["/m/02", "Dog"]]


# ---- strategies ---------------------------------------------------------------------------------
KEYS = [
    "id", "image_id", "file_name", "width", "height", "bbox", "category_id", "iscrowd", "name", "names", "sentences", "sent",
    "raw", "ann_id", "ref_id", "split", "category", "objects", "regions", "x", "y", "w", "h", "phrase", "object_id", "region_id",
]  # fmt: skip
SHALLOW, DEEP = "__NESTED_400__", "__NESTED_5000__"  # replaced in the JSON text by that many nested arrays
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 100),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([10**309, -(10**309), 2**63, 2**64 + 1, 10**4000, 1, 2, 7, 8, 11, 12, 13]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 1e-320, 0.0, -0.0, 1.0, 2.0, 64.5]),
    st.text(max_size=6),
    st.sampled_from(
        ["", " ", "\x00", "img/a.png", "img/b.png", "img/./a.png", "img/loop.png", "img", "img/", ".", "../a.png", "/etc/passwd"]
        + ["img/\x00a.png", "\ud800", "\udcff", "caf\u00e9", "a" * 3000, "train", "testA", "[x]", "[bold]x[/bold]"]
    ),
    st.sampled_from([SHALLOW, DEEP]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), inner, max_size=4)),
    max_leaves=6,
)


def _locations(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _locations(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _locations(value, (*prefix, index))


@st.composite
def mutated(draw, base):
    """`base` with 0-3 edits: a node replaced by an odd value, deleted, duplicated (ids reused), or wrapped."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 3))):
        inner = list(_locations(doc))[1:]
        where = draw(st.sampled_from(inner)) if inner and draw(st.integers(0, 15)) else ()  # the top level now and then
        action = draw(st.sampled_from(["replace", "replace", "delete", "duplicate", "wrap", "tweak"]))
        if not where:
            doc = draw(values) if action != "wrap" else [doc]
            continue
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        key = where[-1]
        if action == "replace":
            parent[key] = draw(values)
        elif action == "delete":
            del parent[key]
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(key + draw(st.integers(0, 1)), copy.deepcopy(parent[key]))
        elif action == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}, [parent[key], parent[key]]]))
        elif isinstance(parent[key], dict):  # tweak one field of an entry (after a duplicate: same id, other values)
            parent[key][draw(st.sampled_from(KEYS))] = draw(values)
        else:
            parent[key] = draw(values)
    return doc


def to_json(doc) -> str:
    text = json.dumps(doc, ensure_ascii=False)
    return text.replace(json.dumps(SHALLOW), "[" * 400 + "]" * 400).replace(json.dumps(DEEP), "[" * 5000 + "]" * 5000)


ENCODINGS = ["utf-8"] * 10 + ["utf-8-sig", "utf-16", "utf-32", "utf-16-le", "latin-1"]


@st.composite
def as_bytes(draw, text: str):
    """`text` in some encoding (lone surrogates written as they are), sometimes damaged."""
    encoding = draw(st.sampled_from(ENCODINGS))
    return draw(damaged(text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf") else "backslashreplace")))


@st.composite
def damaged(draw, raw: bytes):
    """`raw` as it is, or cut, or with bytes inserted or changed."""
    edit = draw(st.sampled_from(["none"] * 15 + ["cut", "insert", "change"]))
    if edit != "none" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        if edit == "cut":
            raw = raw[:at]
        elif edit == "insert":
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=6)) + raw[at:]
        else:
            raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    return raw


def json_bytes(base):
    return mutated(base).flatmap(lambda doc: as_bytes(to_json(doc)))


# ---- what every load must satisfy ---------------------------------------------------------------
def loaded(load, on_error: str):
    """Run a load: a DataError is the only way to fail (of the whole file under skip); the records are sane."""
    try:
        records, report = load()
    except DataError as err:
        assert str(err.path) in str(err)
        if on_error == "skip":
            assert err.record is None, f"skip let a record-level error through: {err}"
        _event(f"{on_error}: DataError of {'the file' if err.record is None else 'a record'}")
        return None
    _event(f"{on_error}: loaded, {'some' if report.skipped else 'no'} records skipped, {'some' if records else 'no'} records")
    check_records(records)
    assert report.kept == len(records) and report.skipped >= 0
    if on_error == "fail":
        assert report.skipped == 0
    triplets, counts = sctune_triplets(records)
    assert counts.triplets_kept == len(triplets)
    return records


def _event(what: str) -> None:
    """Outcome statistics (pytest --hypothesis-show-statistics); nothing outside a hypothesis test."""
    try:
        event(what)
    except InvalidArgument:
        pass


def check_records(records) -> None:
    ids = [r.image_id for r in records]
    assert len(set(ids)) == len(ids)
    for r in records:
        assert type(r.image_id) in (str, int, float) and not (isinstance(r.image_id, float) and not math.isfinite(r.image_id))
        assert type(r.width) is int and type(r.height) is int and r.width > 0 and r.height > 0
        for o in r.objects:
            assert validate_box(o.box, r.size, outside="reject") == o.box
            assert isinstance(o.category, str) and all(isinstance(e, str) and e.strip() for e in o.expressions)
            assert o.ann_id is None or type(o.ann_id) in (str, int, float)
        hash(r.objects)


ON_ERROR = st.sampled_from(["fail", "skip"])


# ---- the loaders ---------------------------------------------------------------------------------
@fuzz(300)
@given(raw=json_bytes(COCO), on_error=ON_ERROR, verify=st.booleans())
def test_load_coco_raises_only_data_errors(root, raw, on_error, verify):
    path = root / "instances.json"
    path.write_bytes(raw)
    records = loaded(lambda: load_coco(path, on_error=on_error, verify_images=verify), on_error)
    try:
        table, report = read_coco_table(path, on_error=on_error, verify_images=verify)
    except DataError:
        assert records is None
        return
    assert records is not None and table.records() == records
    assert sctune_triplets(table) == sctune_triplets(records)


def jsonl_line(row):
    return st.one_of(
        st.just(row).map(lambda r: json.dumps(r, ensure_ascii=False)),
        mutated(row).map(to_json),
        st.text(max_size=20),
        st.sampled_from(["", "   ", "{broken", "7", "null", "[]", "\x00", "{}"]),
    )


@st.composite
def jsonl_bytes(draw):
    lines = [draw(jsonl_line(draw(st.sampled_from(REFERRING)))) for _ in range(draw(st.integers(0, 6)))]
    text = draw(st.sampled_from(["\n", "\r\n"])).join(line.replace("\n", " ") for line in lines)
    return draw(as_bytes(text))


@fuzz(300)
@given(raw=jsonl_bytes(), on_error=ON_ERROR, verify=st.booleans())
def test_load_referring_raises_only_data_errors(root, raw, on_error, verify):
    path = root / "refs.jsonl"
    path.write_bytes(raw)
    loaded(lambda: load_referring(path, on_error=on_error, verify_images=verify), on_error)


@fuzz(250)
@given(
    broken=st.sampled_from(["instances", "refs", "both"]),
    refs_format=st.sampled_from(["json", "pickle"]),
    on_error=ON_ERROR,
    split=st.sampled_from([None, "train", "testA"]),
    data=st.data(),
)
def test_load_refcoco_raises_only_data_errors(root, broken, refs_format, on_error, split, data):
    """One of the two files mutated (or both): the loader gets past the other to the records."""
    instances = data.draw(json_bytes(REFCOCO_INSTANCES)) if broken != "refs" else json.dumps(REFCOCO_INSTANCES).encode()
    refs = data.draw(mutated(REFCOCO_REFS)) if broken != "instances" else REFCOCO_REFS
    (root / "instances.json").write_bytes(instances)
    if refs_format == "json":
        refs_path = root / "refs.json"
        refs_path.write_bytes(data.draw(as_bytes(to_json(refs))))
    else:
        refs_path = root / "refs(unc).p"
        try:
            raw = pickle.dumps(refs, protocol=data.draw(st.sampled_from([0, 2, 4])))
        except (pickle.PicklingError, RecursionError, ValueError):
            raw = b"not a pickle"
        refs_path.write_bytes(data.draw(damaged(raw)))
    loaded(lambda: load_refcoco(root / "instances.json", refs_path, root / "img", split=split, on_error=on_error), on_error)


@fuzz(200)
@given(raw=st.binary(max_size=64), flip=st.integers(0, 10**6))
def test_read_refs_on_arbitrary_pickle_bytes(root, raw, flip):
    good = pickle.dumps(REFCOCO_REFS, protocol=4)
    at = flip % len(good)
    path = root / "refs(x).p"
    for content in (raw, good[:at] + raw + good[at:], good[:at]):
        path.write_bytes(content)
        try:
            read_refs(path)
        except DataError:
            pass


@fuzz(250)
@given(
    broken=st.sampled_from(["image_data.json", "objects.json", "region_descriptions.json", "all"]),
    which=st.sampled_from(["objects", "regions", "both"]),
    on_error=ON_ERROR,
    data=st.data(),
)
def test_load_visual_genome_raises_only_data_errors(root, broken, which, on_error, data):
    """One of the three files mutated (or all)."""
    for name, doc in (("image_data.json", VG_META), ("objects.json", VG_OBJECTS), ("region_descriptions.json", VG_REGIONS)):
        (root / name).write_bytes(data.draw(json_bytes(doc)) if broken in (name, "all") else json.dumps(doc).encode())
    objects_json = root / "objects.json" if which in ("objects", "both") else None
    regions_json = root / "region_descriptions.json" if which in ("regions", "both") else None
    loaded(lambda: load_visual_genome(root / "image_data.json", root / "img", objects_json, regions_json, on_error=on_error), on_error)


csv_fields = st.one_of(
    st.sampled_from(["", " ", "nan", "inf", "-inf", "-1", "1e400", "9" * 5000, "0.5", "1", "abc", "/m/01", "/m/02", "../abc"]),
    st.sampled_from(["\x00", '"', "a,b", "x\ny", "ab\x00c", "caf\u00e9", "\ud800", "x" * 140_000, "LabelName", "ImageID"]),
    st.text(max_size=8),
)


@st.composite
def csv_table(draw, rows):
    """Rows with fields replaced, dropped or added; written through csv (quoted) or joined raw."""
    rows = [list(r) for r in rows]
    for _ in range(draw(st.integers(0, 3))):
        if not rows:
            break
        row = rows[draw(st.integers(0, len(rows) - 1))]
        action = draw(st.sampled_from(["replace", "replace", "drop", "add", "duplicate"]))
        if action == "replace" and row:
            row[draw(st.integers(0, len(row) - 1))] = draw(csv_fields)
        elif action == "drop" and row:
            del row[draw(st.integers(0, len(row) - 1))]
        elif action == "add":
            row.append(draw(csv_fields))
        else:
            rows.append(list(row))
    text = "\n".join(",".join(r) for r in rows) + "\n"
    if draw(st.booleans()):
        out = io.StringIO()
        try:
            csv.writer(out).writerows(rows)
            text = out.getvalue()
        except csv.Error:
            pass
    return draw(as_bytes(text))


@fuzz(250)
@given(
    boxes=csv_table([OPENIMAGES_HEADER, *OPENIMAGES_ROWS]),
    names=csv_table(OPENIMAGES_NAMES),
    on_error=ON_ERROR,
)
def test_load_openimages_raises_only_data_errors(root, boxes, names, on_error):
    (root / "boxes.csv").write_bytes(boxes)
    (root / "classes.csv").write_bytes(names)
    loaded(lambda: load_openimages(root / "boxes.csv", root / "classes.csv", root / "img", on_error=on_error), on_error)


def _image_bytes(kind: str) -> bytes:
    out = io.BytesIO()
    img = Image.new("RGB", (12, 9), (10, 200, 30))
    if kind == "jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(out, "JPEG", exif=exif)
    elif kind == "png16":
        Image.new("I;16", (12, 9), 40000).save(out, "PNG")
    else:
        img.save(out, kind.upper())
    return out.getvalue()


IMAGES = {
    kind: _image_bytes(kind) for kind in ("png", "jpeg", "png16", "gif", "bmp", "tiff") + (("webp",) if features.check("webp") else ())
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on the damage it reads past (corrupt EXIF, short TIFF tags)
@fuzz(300)
@given(kind=st.sampled_from(sorted(IMAGES)), data=st.data())
def test_image_reading_raises_only_data_errors(root, kind, data):
    """A damaged image file (header or body) is a DataError when its size or pixels are read."""
    path = root / f"damaged.{kind}"
    path.write_bytes(data.draw(damaged(IMAGES[kind])))
    for read in (image_size, read_rgb):
        try:
            result = read(path, "src", "rec")
        except DataError as err:
            assert err.path == "src" and err.record == "rec"
            continue
        if read is read_rgb:
            assert result.mode == "RGB" and result.size == image_size(path, "src", "rec")


def test_fuzz_fixtures_load_as_they_are(root):
    """The unmutated fixtures are valid: every loader keeps everything from them."""
    (root / "instances.json").write_text(json.dumps(COCO))
    records = loaded(lambda: load_coco(root / "instances.json", verify_images=True), "fail")
    assert [len(r.objects) for r in records] == [2, 2]
    (root / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REFERRING))
    assert [len(r.objects) for r in loaded(lambda: load_referring(root / "refs.jsonl", verify_images=True), "fail")] == [2, 1]
    (root / "instances.json").write_text(json.dumps(REFCOCO_INSTANCES))
    (root / "refs.json").write_text(json.dumps(REFCOCO_REFS))
    records = loaded(lambda: load_refcoco(root / "instances.json", root / "refs.json", root / "img"), "fail")
    assert [len(r.objects) for r in records] == [2, 1]
    for name, doc in (("image_data.json", VG_META), ("objects.json", VG_OBJECTS), ("region_descriptions.json", VG_REGIONS)):
        (root / name).write_text(json.dumps(doc))
    records = loaded(
        lambda: load_visual_genome(root / "image_data.json", root / "img", root / "objects.json", root / "region_descriptions.json"), "fail"
    )
    assert [len(r.objects) for r in records] == [3, 2]
    (root / "boxes.csv").write_text("\n".join(",".join(r) for r in [OPENIMAGES_HEADER, *OPENIMAGES_ROWS]) + "\n")
    (root / "classes.csv").write_text("\n".join(",".join(r) for r in OPENIMAGES_NAMES) + "\n")
    records = loaded(lambda: load_openimages(root / "boxes.csv", root / "classes.csv", root / "img"), "fail")
    assert [len(r.objects) for r in records] == [3]
