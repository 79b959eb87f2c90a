"""Hugging Face datasets in and out: RefCOCO rows in lmms-eval's parquet layout (images as bytes)
load, evaluate with `refloop eval rec` like the same data as files, malformed rows are refused
naming file and row; detection rows name their ClassLabel categories; refloop's JSONL outputs load
with `datasets.load_dataset` (JSON lines and, through `export_parquet`, parquet)."""

import io
import json

import pytest
from helpers import ScriptedVLM, run_cli, save_tiny_random
from PIL import Image

from refloop.boxes import Box
from refloop.data.loaders import load_referring
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.data.sources import load_data, load_detections
from refloop.errors import DataError

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")

from refloop.data.parquet import export_parquet, load_parquet  # noqa: E402

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
# (file, image size, [(bbox xywh, expressions)]): rows of one image share its bytes, as lmms-eval's files do.
REFS = [
    ("COCO_train2014_000000000001.jpg", (64, 48), [([2, 3, 20, 10], ["red thing left", "the left one"]), ([30, 5, 30, 40], ["tall box"])]),
    ("COCO_train2014_000000000002.jpg", (40, 40), [([0, 0, 40, 40], ["everything"])]),
    ("COCO_train2014_000000000003.jpg", (32, 50), [([1.5, 2.5, 10, 12], ["small one"])]),
]


def _png(size, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def lmms_rows() -> list[dict]:
    rows = []
    for k, (file_name, size, refs) in enumerate(REFS):
        data = _png(size, COLOURS[k])
        for bbox, answers in refs:
            rows.append(
                {
                    "question_id": f"{k}-{len(rows)}",
                    "image": {"bytes": data, "path": None},
                    "question": "Please provide the bounding box coordinate of the region this sentence describes.",
                    "answer": answers,
                    "segmentation": [float(v) for v in bbox],
                    "bbox": [float(v) for v in bbox],
                    "iscrowd": 0,
                    "file_name": file_name,
                }
            )
    return rows


def write_lmms(path, rows, image_feature: bool = True):
    """The rows as `datasets` writes them: the image column an Image feature (struct {bytes, path})."""
    ds = datasets.Dataset.from_list(rows)
    if image_feature:
        ds = ds.cast_column("image", datasets.Image())
    ds.to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_random(tmp_path_factory.mktemp("tiny") / "model")


def test_lmms_eval_refcoco_layout_loads_with_images_in_memory(tmp_path):
    path = write_lmms(tmp_path / "refcoco_val.parquet", lmms_rows())
    records, report = load_data(str(path))
    assert report.kept == 3 and report.skipped == 0
    assert [(r.image_id, r.size) for r in records] == [(name, size) for name, size, _ in REFS]
    first = records[0]
    assert [(o.box, o.expressions, o.ann_id) for o in first.objects] == [
        (Box(2, 3, 22, 13), ("red thing left", "the left one"), "0-0"),
        (Box(30, 5, 60, 45), ("tall box",), "0-1"),
    ]
    assert records[2].objects[0].box == Box(1.5, 2.5, 11.5, 14.5)
    assert first.data is not None and not first.path.exists()  # pixels stay in the parquet file's bytes
    image = first.load_image()
    assert image.mode == "RGB" and image.size == (64, 48) and image.getpixel((5, 5)) == COLOURS[0]
    assert str(first.path) == str(path / REFS[0][0])


def test_rows_naming_no_file_name_or_image_id_are_each_an_image_and_it_is_said(tmp_path, caplog):
    """Without file_name or image_id two boxes of one picture cannot be grouped: every row is an
    image of its own (a record per row, not per picture), and the load says so instead of evaluating them silently."""
    rows = [{k: v for k, v in r.items() if k != "file_name"} for r in lmms_rows()]
    path = write_lmms(tmp_path / "no_names.parquet", rows)
    with caplog.at_level("WARNING", logger="refloop"):
        records, _ = load_data(str(path))
    assert len(records) == len(rows) > len(REFS) and "each row is an image of its own" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="refloop"):
        load_data(str(write_lmms(tmp_path / "named.parquet", lmms_rows())))
    assert "each row is an image of its own" not in caplog.text


def test_eval_rec_on_parquet_equals_the_same_data_as_files(tmp_path, model_dir, capsys):
    """`refloop eval rec --data refcoco_val.parquet` gives the numbers of the same rows written as a
    referring JSONL with the images on disk."""
    parquet = write_lmms(tmp_path / "refcoco_val.parquet", lmms_rows())
    (tmp_path / "files").mkdir()
    lines = []
    for k, (file_name, size, refs) in enumerate(REFS):
        (tmp_path / "files" / file_name).write_bytes(_png(size, COLOURS[k]))
        lines += [{"image_id": file_name, "file_name": file_name, "bbox": bbox, "sentences": answers} for bbox, answers in refs]
    jsonl = tmp_path / "files" / "refs.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ["--model", str(model_dir), "--device", "cpu", "--dtype", "fp32", "--batch-size", "4"]
    code, out, err = run_cli(["eval", "rec", "--data", str(parquet), "--out", str(tmp_path / "p"), *common], capsys)
    assert code == 0, err
    from_parquet = json.loads(out)
    code, out, err = run_cli(["eval", "rec", "--data", str(jsonl), "--out", str(tmp_path / "j"), *common], capsys)
    assert code == 0, err
    from_files = json.loads(out)
    assert from_parquet["num"] == 5  # every (object, expression) pair
    for key in ("rec_accuracy", "num", "parse_failure_rate", "mean_iou"):
        assert from_parquet[key] == pytest.approx(from_files[key]), key
    rows = [json.loads(line) for line in (tmp_path / "p" / "rec_samples.jsonl").read_text().splitlines()]
    assert {r["image"] for r in rows} == {str(parquet / name) for name, _, _ in REFS}
    with Image.open(tmp_path / "p" / "rec_best.png") as drawn:  # the report draws the images held in the parquet file
        assert drawn.width > 4 * 256


def _variant(rows, row: int, **changes) -> list[dict]:
    out = [dict(r) for r in rows]
    out[row].update(changes)
    return out


@pytest.mark.parametrize(
    "change, where, problem",
    [
        ({"bbox": [1.0, 2.0, 3.0]}, "row 1", "bbox must be [x, y, width, height]"),
        ({"bbox": [50.0, 2.0, -10.0, 5.0]}, "row 1", "invalid bbox"),
        ({"image": {"bytes": b"not an image at all", "path": None}}, "row 1", "cannot read image"),
        ({"image": {"bytes": _png((10, 10), (0, 0, 0))[:30], "path": None}}, "row 1", "cannot read image"),
        ({"answer": []}, "row 1", "'answer' must be a non-empty list"),
        ({"image": {"bytes": None, "path": None}}, "row 1", "neither image bytes nor a path"),
        ({"image": {"bytes": None, "path": "../outside.png"}}, "row 1", "escapes the image root"),
    ],
)
def test_malformed_rows_are_refused_naming_file_and_row_or_skipped_and_counted(tmp_path, change, where, problem):
    rows = lmms_rows()
    rows = rows[1:2] + rows  # row 1 is the first row of its image again (a fresh header check)
    rows[1] = rows[1] | {"file_name": "other.jpg"}
    # `datasets` stats an Image feature's paths when writing: a path-only cell goes in a plain struct column
    path = write_lmms(tmp_path / "bad.parquet", _variant(rows, 1, **change), image_feature=change.get("image", {}).get("path") is None)
    with pytest.raises(DataError) as err:
        load_parquet(path)
    assert str(err.value).startswith(f"{path}, record {where}: ") and problem in str(err.value), str(err.value)
    records, report = load_parquet(path, on_error="skip")
    assert report.skipped == 1 and sum(len(r.objects) for r in records) == len(rows) - 1


@pytest.mark.parametrize(
    "column, column_values, where, problem",
    [
        ("bbox", [["1", "2", "3", "4"]] * 5, "row 0", "'bbox' must be a finite number"),
        ("answer", [[1, 2]] * 5, "row 0", "'answer' must be a non-empty list of non-empty strings"),
        ("question_id", [[1]] * 5, "row 0", "'question_id' must be a string or a number"),
    ],
)
def test_columns_of_the_wrong_type_are_refused_naming_the_row(tmp_path, column, column_values, where, problem):
    rows = [r | {column: v} for r, v in zip(lmms_rows(), column_values)]
    path = write_lmms(tmp_path / "typed.parquet", rows)
    with pytest.raises(DataError, match=rf"record {where}: .*{problem}"):
        load_parquet(path)


@pytest.mark.parametrize(
    "missing, problem", [("bbox", "missing column 'bbox'"), ("answer", "missing column 'answer'"), ("image", "the JSONL itself")]
)
def test_a_missing_column_is_refused_naming_the_file(tmp_path, capsys, missing, problem):
    rows = [{k: v for k, v in r.items() if k != missing} for r in lmms_rows()]
    path = write_lmms(tmp_path / "cols.parquet", rows, image_feature=missing != "image")
    code, _, err = run_cli(["eval", "rec", "--data", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 2 and str(path) in err and problem in err, err


def test_not_a_parquet_file_is_a_data_error(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("hello")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_parquet(path)


def test_raw_bytes_column_and_image_paths_under_the_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    for k, (name, size, _) in enumerate(REFS):
        (tmp_path / "imgs" / name).write_bytes(_png(size, COLOURS[k]))
    by_path = [r | {"image": {"bytes": None, "path": f"imgs/{r['file_name']}"}} for r in lmms_rows()]
    records, _ = load_parquet(write_lmms(tmp_path / "paths.parquet", by_path, image_feature=False))  # paths resolve under the file's folder
    assert [(r.data, r.path) for r in records] == [(None, (tmp_path / "imgs" / name).resolve()) for name, _, _ in REFS]
    assert records[1].load_image().getpixel((0, 0)) == COLOURS[1]
    raw = [r | {"image": r["image"]["bytes"]} for r in lmms_rows()]
    records, _ = load_parquet(write_lmms(tmp_path / "bytes.parquet", raw, image_feature=False))
    assert len(records) == 3 and records[2].load_image().getpixel((0, 0)) == COLOURS[2]


def test_detection_rows_name_classlabel_categories_and_feed_load_detections(tmp_path):
    features = datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": {
                "id": datasets.List(datasets.Value("int64")),
                "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "category": datasets.List(datasets.ClassLabel(names=["cup", "plate", "fork"])),
            },
        }
    )
    rows = [
        {"image_id": 7, "image": _png((50, 40), COLOURS[0]), "width": 50, "height": 40,
         "objects": {"id": [1, 2], "bbox": [[0, 0, 10, 10], [5, 5, 20, 30]], "category": [2, 0]}},
        {"image_id": 8, "image": _png((30, 30), COLOURS[1]), "width": 30, "height": 30,
         "objects": {"id": [3], "bbox": [[1, 1, 5, 5]], "category": [1]}},
    ]  # fmt: skip
    path = tmp_path / "det.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    found = load_detections(str(path))
    assert [(r.image_id, r.size) for r in found.records] == [(7, (50, 40)), (8, (30, 30))] and not found.expressions
    assert [(o.category, o.box, o.ann_id) for r in found.records for o in r.objects] == [
        ("fork", Box(0, 0, 10, 10), 1),
        ("cup", Box(5, 5, 25, 35), 2),
        ("plate", Box(1, 1, 6, 6), 3),
    ]
    without_ids = [{**r, "objects": {k: v for k, v in r["objects"].items() if k != "id"}} for r in rows]
    del features["objects"]["id"]
    datasets.Dataset.from_list(without_ids, features=features).to_parquet(str(path))
    # no objects.id: each object is named by its position in its row, so ids are unique within an image
    assert [o.ann_id for r in load_detections(str(path)).records for o in r.objects] == [0, 1, 0]
    mixed = [{**rows[0], "objects": {**rows[0]["objects"], "id": [5, None]}}]  # position 1 could collide with a given id
    datasets.Dataset.from_list(
        mixed, features=datasets.Features({**features, "objects": {**features["objects"], "id": datasets.List(datasets.Value("int64"))}})
    ).to_parquet(str(tmp_path / "mixed.parquet"))
    with pytest.raises(DataError, match="some objects have an id and some do not"):
        load_parquet(tmp_path / "mixed.parquet")
    without_ids[1]["objects"]["bbox"] = [[1, 1, 50, 50]]
    without_ids[1]["width"] = 99
    datasets.Dataset.from_list(without_ids, features=features).to_parquet(str(path))
    with pytest.raises(DataError, match="record row 1: .*not 99x30"):
        load_parquet(path)


# ---- out: refloop's outputs load with `datasets` --------------------------------------------------------------------------


def _load_json(path, tmp_path):
    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"))


def _same_rows_through_parquet(jsonl, tmp_path) -> None:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    as_json = _load_json(jsonl, tmp_path)
    assert len(as_json) == len(rows) and set(as_json.column_names) == {k for r in rows for k in r}
    parquet = tmp_path / (jsonl.stem + ".parquet")
    assert export_parquet(jsonl, parquet) == len(rows)
    as_parquet = datasets.load_dataset("parquet", data_files=str(parquet), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert as_parquet.to_list() == as_json.to_list()


def _png_records(tmp_path, n: int, side: int = 10) -> list[ImageRecord]:
    """n grey images of 2 * side pixels, one box of `side` pixels each at x = i."""
    records = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (2 * side, 2 * side), (120, 120, 120)).save(path)
        objects = (ObjectAnnotation(Box(i, 0, i + side, side), "thing", ann_id=i, expressions=(f"ref {i}",)),)
        records.append(ImageRecord(image_id=i, path=path, width=2 * side, height=2 * side, objects=objects, file_name=f"{i}.png"))
    return records


def test_consistency_samples_load_with_datasets(tmp_path):
    from refloop.evaluation.consistency import ConsistencyConfig, evaluate_consistency, sample_boxes

    answers = {"box 0": Box(0, 0, 10, 10), "box 1": Box(1, 0, 9, 10)}  # box 2 does not parse: null predicted_box
    samples = sample_boxes(_png_records(tmp_path, 3), 10)
    evaluate_consistency(ScriptedVLM(answers), samples, tmp_path / "out", ConsistencyConfig(batch_size=2))
    _same_rows_through_parquet(tmp_path / "out" / "samples.jsonl", tmp_path)


def test_bootstrapped_pairs_load_with_datasets(tmp_path):
    from refloop.methods.pink import BootstrapConfig, bootstrap

    records = _png_records(tmp_path, 3, side=100)  # boxes above Pink's smallest area
    answers = {"box 0": Box(0, 0, 100, 100), "box 2": Box(2, 0, 102, 100)}  # box 1 is not found: no pair
    bootstrap(ScriptedVLM(answers), records, tmp_path / "out", BootstrapConfig(), image_root=tmp_path, write_report=False)
    pairs = tmp_path / "out" / "pairs.jsonl"
    assert len(pairs.read_text().splitlines()) == 2
    _same_rows_through_parquet(pairs, tmp_path)
    assert len(load_referring(pairs, tmp_path)[0]) == 2


def test_rc_data_loads_with_datasets(tmp_path):
    from refloop.data.rc import build_rc_data, load_rc_annotations

    records, relations, _ = load_rc_annotations("crowded", num_images=2)
    rc = tmp_path / "rc.jsonl"
    build_rc_data(records, rc, None, "refloop-tiny", 0, 2, relations)
    _same_rows_through_parquet(rc, tmp_path)


def test_fields_that_first_appear_in_later_rows_are_kept(tmp_path):
    """SC-Tune's metrics.jsonl starts with describer rows; the locator rows add their own fields
    (a first-contact helper found them gone from the parquet file, with exit 0)."""
    jsonl = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.6}, {"step": 3, "loss": 0.7, "caption_words": 4.5}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _same_rows_through_parquet(jsonl, tmp_path)
    table = pq.read_table(tmp_path / "metrics.parquet")
    assert table.column_names == ["step", "reward", "loss", "caption_words"]
    assert table.to_pylist()[2] == {"step": 3, "reward": None, "loss": 0.7, "caption_words": 4.5}


def test_cli_export_parquet(tmp_path, capsys):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"id": 1, "box": [1, 2, 3, 4], "caption": "a"}\n{"id": 2, "box": null, "caption": "b"}\n')
    code, out, err = run_cli(["export-parquet", str(jsonl), str(tmp_path / "rows.parquet")], capsys)
    assert code == 0, err
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "rows.parquet").to_pylist() == [json.loads(line) for line in jsonl.read_text().splitlines()]
    code, _, err = run_cli(["export-parquet", str(tmp_path / "missing.jsonl"), str(tmp_path / "x.parquet")], capsys)
    assert code == 2 and "missing.jsonl" in err
    (tmp_path / "mixed.jsonl").write_text('{"id": 1, "a": 1}\n{"id": 2, "a": "x"}\n')
    code, _, err = run_cli(["export-parquet", str(tmp_path / "mixed.jsonl"), str(tmp_path / "m.parquet")], capsys)
    assert code == 2 and "field 'a' holds values of mixed types" in err  # the column is named


def test_bootstrap_report_draws_images_held_in_a_parquet_file(tmp_path, model_dir, capsys):
    """The report reads the pixels as the run did: from the parquet's bytes, not from a file path
    (`file.parquet/...` is no directory: it used to end in a traceback after the run)."""
    parquet = write_lmms(tmp_path / "refcoco_val.parquet", lmms_rows())
    args = ["bootstrap", "--data", str(parquet), "--model", str(model_dir), "--out", str(tmp_path / "b"), "--min-area-px", "1"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert (tmp_path / "b" / "report.html").exists() and (tmp_path / "b" / "kept.png").exists()
    assert json.loads((tmp_path / "b" / "stats.json").read_text())["images_in_data_file"] is True


@pytest.mark.parametrize("embedded", [True, False])
def test_bootstrap_hints_a_read_back_only_when_the_images_are_files(tmp_path, capsys, embedded):
    from refloop.cli import _print_bootstrap

    stats = {"kept": 3, "boxes_considered": 4, "data": "d.parquet", "image_root": str(tmp_path), "images_in_data_file": embedded}
    _print_bootstrap(stats, tmp_path / "b")
    out, err = capsys.readouterr()
    assert ("read the pairs back with" in out) is not embedded and ("holds its images inside the file" in err) is embedded
