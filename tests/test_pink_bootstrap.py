"""Pink's self-consistent bootstrapping: A.2's filters, the lambda rule, the distractor rule, K
samples, outputs that load back, resume after SIGKILL and sharded runs equal to one process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ScriptedVLM, run_cli, save_tiny_random
from PIL import Image

from refloop.boxes import Box
from refloop.data.formats import load_refcoco
from refloop.data.loaders import load_referring
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.data.shards import batch_ranges
from refloop.errors import DataError
from refloop.methods.pink import SHAPES_MIN_AREA_PX, BootstrapConfig, bootstrap

OUTPUTS = ("candidates.jsonl", "pairs.jsonl", "refs.json", "instances.json")


def image_records(tmp_path, scenes: list[list[ObjectAnnotation]], size: int = 200) -> list[ImageRecord]:
    """One grey PNG per scene under tmp_path/images; file names relative to tmp_path."""
    (tmp_path / "images").mkdir(exist_ok=True)
    records = []
    for i, objects in enumerate(scenes):
        file_name = f"images/{i}.png"
        Image.new("RGB", (size, size), (120, 120, 120)).save(tmp_path / file_name)
        records.append(ImageRecord(i, tmp_path / file_name, size, size, tuple(objects), file_name=file_name))
    return records


def obj(box: Box, category: str = "cup", ann_id: int = 0, expressions: tuple[str, ...] = ()) -> ObjectAnnotation:
    return ObjectAnnotation(box, category, ann_id, expressions)


class CountingVLM(ScriptedVLM):
    """Records the REG prompts it is asked (one per described box and sample group)."""

    def __init__(self, answers: dict) -> None:
        super().__init__(answers)
        self.prompts: list[str] = []

    def generate(self, images, prompts, options=None):
        self.prompts += prompts
        return super().generate(images, prompts, options)


def candidates(out) -> list[dict]:
    return [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]


def decisions(out) -> dict:
    """{(image_id, ann_id): (decision, reason)} of each box's chosen (or skipped) line."""
    return {(c["image_id"], c["ann_id"]): (c["decision"], c["reason"]) for c in candidates(out) if c["chosen"] or c["sample"] is None}


def test_a2_filters_skip_images_over_15_objects_and_boxes_under_2000_px(tmp_path):
    sixteen = [obj(Box(i, 0, i + 50, 50), ann_id=i) for i in range(16)]  # 2500 px each, but 16 objects
    fifteen = [obj(Box(20 + i, 0, 70 + i, 50), ann_id=100 + i) for i in range(15)]
    areas = [obj(Box(40, 0, 80, 50), ann_id=200), obj(Box(41, 60, 80.98, 110), ann_id=201)]  # 2000 px; 1999 px
    records = image_records(tmp_path, [sixteen, fifteen, areas])
    vlm = CountingVLM({})
    stats = bootstrap(vlm, records, tmp_path / "out", BootstrapConfig(), image_root=tmp_path, write_report=False)
    got = decisions(tmp_path / "out")
    assert all(got[(0, i)] == ("skipped", "too_many_objects") for i in range(16))
    assert all(got[(1, 100 + i)] == ("rejected", "inconsistent") for i in range(15))  # described; nothing located
    assert got[(2, 200)] == ("rejected", "inconsistent") and got[(2, 201)] == ("skipped", "small_box")
    assert len(vlm.prompts) == 16  # only the considered boxes reach the model
    assert stats["images_total"] == 3 and stats["images"] == 2 and stats["images_skipped"] == {"too_many_objects": 1}
    assert stats["boxes_total"] == 33 and stats["boxes_considered"] == 16
    assert stats["boxes_skipped"] == {"small_box": 1, "too_many_objects": 16}
    assert stats["rejected_by_reason"] == {"inconsistent": 16} and stats["kept"] == 0 and stats["parse_failures"] == 16


def test_kept_at_exactly_lambda_and_the_ground_truth_box_is_stored(tmp_path):
    boxes = [Box(0, 0, 100, 100), Box(1, 100, 101, 200), Box(2, 0, 102, 100)]
    records = image_records(tmp_path, [[obj(b, ann_id=k) for k, b in enumerate(boxes)]])
    answers = {
        "box 0": Box(0, 0, 50, 100),  # IoU exactly 0.5: kept (Pink: IoU >= lambda)
        "box 1": Box(1, 100, 50.99, 200),  # IoU 0.4999: rejected
        "box 2": Box(12, 0, 102, 100),  # IoU 0.9: kept, with the annotated box, not the located one
    }
    stats = bootstrap(ScriptedVLM(answers), records, tmp_path / "out", BootstrapConfig(), image_root=tmp_path, write_report=False)
    rows = {c["ann_id"]: c for c in candidates(tmp_path / "out")}
    assert rows[0]["iou"] == 0.5 and rows[0]["decision"] == "kept"
    assert rows[1]["iou"] == pytest.approx(0.4999) and (rows[1]["decision"], rows[1]["reason"]) == ("rejected", "inconsistent")
    assert rows[2]["located_box"] == [12, 0, 102, 100]
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert [(p["sentences"], p["bbox"]) for p in pairs] == [(["box 0"], [0, 0, 100, 100]), (["box 2"], [2, 0, 100, 100])]
    assert (stats["kept"], stats["rejected"], stats["keep_rate"]) == (2, 1, pytest.approx(2 / 3))
    assert stats["avg_expression_length"] == 2.0 and stats["referring_expressions"] == 2 and stats["images"] == 1
    strict = bootstrap(
        ScriptedVLM(answers), records, tmp_path / "strict", BootstrapConfig(iou_lambda=0.6), image_root=tmp_path, write_report=False
    )
    assert strict["kept"] == 1


def test_distractor_check_rejects_a_description_that_fits_another_box_of_the_category(tmp_path):
    target, other = Box(0, 0, 100, 100), Box(1, 0, 100, 60)
    located = Box(0, 0, 100, 70)  # IoU 0.70 with the target, 0.85 with the other box
    same = [obj(target, "cup", 0), obj(other, "cup", 1)]
    different = [obj(target, "cup", 0), obj(other, "bowl", 1)]
    records = image_records(tmp_path, [same, different])
    answers = {"box 0": located}
    on = bootstrap(ScriptedVLM(answers), records, tmp_path / "on", BootstrapConfig(distractor_check=True), image_root=tmp_path)
    off = bootstrap(ScriptedVLM(answers), records, tmp_path / "off", BootstrapConfig(), image_root=tmp_path, write_report=False)
    assert decisions(tmp_path / "on")[(0, 0)] == ("rejected", "distractor")
    assert decisions(tmp_path / "on")[(1, 0)] == ("kept", None)  # a bowl does not compete with a cup
    assert decisions(tmp_path / "off")[(0, 0)] == ("kept", None)
    row = next(c for c in candidates(tmp_path / "on") if (c["image_id"], c["ann_id"]) == (0, 0))
    assert row["iou"] == pytest.approx(0.7) and row["distractor_iou"] == pytest.approx(5940 / 7000)
    assert on["rejected_by_reason"]["distractor"] == 1 and off["kept"] == on["kept"] + 1
    assert (tmp_path / "on" / "report.html").exists() and (tmp_path / "on" / "rejected.png").stat().st_size > 0


def test_k_samples_keep_the_most_consistent_candidate_that_passes(tmp_path):
    a, b = Box(10, 0, 110, 100), Box(20, 100, 120, 200)
    distractor = Box(21, 100, 120, 190)
    records = image_records(tmp_path, [[obj(a, ann_id=1), obj(b, ann_id=2), obj(distractor, ann_id=3)]])
    answers = {
        "box 10": Box(10, 0, 40, 100),  # greedy: IoU 0.3
        "box 10 #1": Box(10, 0, 100, 100),  # second sample: IoU 0.9, kept
        "box 20": Box(20, 100, 110, 200),  # greedy: IoU 0.9, passes
        "box 20 #1": Box(20, 100, 120, 190),  # IoU 0.9 with b, but 0.99 with the same-category box: a distractor
    }
    cfg = BootstrapConfig(samples=3, distractor_check=True)
    vlm = CountingVLM(answers)
    stats = bootstrap(vlm, records, tmp_path / "out", cfg, image_root=tmp_path, write_report=False)
    rows = [c for c in candidates(tmp_path / "out") if c["ann_id"] in (1, 2)]
    assert [(c["ann_id"], c["sample"], c["expression"]) for c in rows] == [
        (1, 0, "box 10"),
        (1, 1, "box 10"),  # the scripted sampler repeats the greedy text first
        (1, 2, "box 10 #1"),
        (2, 0, "box 20"),
        (2, 1, "box 20"),
        (2, 2, "box 20 #1"),
    ]
    assert [(c["decision"], c["reason"], c["chosen"]) for c in rows] == [
        ("rejected", "inconsistent", False),
        ("rejected", "inconsistent", False),
        ("kept", None, True),
        ("kept", None, True),  # greedy wins the tie with its own repeat
        ("rejected", "not_chosen", False),
        ("rejected", "distractor", False),
    ]
    assert stats["candidates"] == 9 and stats["samples"] == 3
    pairs = load_referring(tmp_path / "out" / "pairs.jsonl", tmp_path)[0][0].objects
    assert [(o.ann_id, o.expressions) for o in pairs] == [(1, ("box 10 #1",)), (2, ("box 20",))]


def test_pairs_reload_as_referring_jsonl_and_refcoco_with_grammar_unique_shares(tmp_path):
    scenes = [
        [obj(Box(0, 0, 100, 100), "cup", 7, ("box 0", "the cup")), obj(Box(1, 100, 101, 200), "plate", 8, ("the plate",))],
        [obj(Box(3, 0, 103, 100), "cup", 9, ("the left cup",))],
        [obj(Box(4, 0, 104, 100), "fork", 10)],
    ]
    records = image_records(tmp_path, scenes)
    answers = {"box 0": Box(0, 0, 100, 100), "box 3": Box(3, 0, 103, 100)}  # box 1 and box 4 are not found
    stats = bootstrap(ScriptedVLM(answers), records, tmp_path / "out", BootstrapConfig(), image_root=tmp_path, write_report=False)
    assert stats["grammar_unique"] == {"kept": 0.5, "rejected": 0.0}  # "box 0" is the grammar's, "box 3" is not
    loaded, report = load_referring(tmp_path / "out" / "pairs.jsonl", tmp_path, verify_images=True)
    assert report.skipped == 0
    assert [(r.image_id, r.file_name, r.size) for r in loaded] == [(0, "images/0.png", (200, 200)), (1, "images/1.png", (200, 200))]
    assert [(o.box, o.category, o.expressions) for r in loaded for o in r.objects] == [
        (Box(0, 0, 100, 100), "cup", ("box 0",)),
        (Box(3, 0, 103, 100), "cup", ("box 3",)),
    ]
    refcoco, _ = load_refcoco(tmp_path / "out" / "instances.json", tmp_path / "out" / "refs.json", tmp_path)
    assert [(r.image_id, r.path, r.objects) for r in refcoco] == [(r.image_id, r.path, r.objects) for r in loaded]
    instances = json.loads((tmp_path / "out" / "instances.json").read_text())
    assert len(instances["images"]) == 2 and len(instances["annotations"]) == 3  # every box of an image with a pair
    assert [c["name"] for c in instances["categories"]] == ["cup", "plate"]
    assert [a["id"] for a in instances["annotations"]] == [7, 8, 9]  # the source file's ids: they join it


def test_refcoco_export_numbers_annotations_when_the_source_ids_are_not_unique_integers(tmp_path):
    scenes = [[obj(Box(0, 0, 100, 100), "cup", 0), obj(Box(1, 100, 101, 200), "plate", 1)], [obj(Box(3, 0, 103, 100), "cup", 0)]]
    answers = {"box 0": Box(0, 0, 100, 100), "box 3": Box(3, 0, 103, 100)}
    bootstrap(
        ScriptedVLM(answers), image_records(tmp_path, scenes), tmp_path / "out", BootstrapConfig(), image_root=tmp_path, write_report=False
    )
    instances = json.loads((tmp_path / "out" / "instances.json").read_text())
    assert [(a["id"], a["source_ann_id"]) for a in instances["annotations"]] == [(1, 0), (2, 1), (3, 0)]
    refs = json.loads((tmp_path / "out" / "refs.json").read_text())
    assert [r["ann_id"] for r in refs] == [1, 3]


def test_a_batch_cut_short_is_redone_without_doubling_records(tmp_path):
    records = image_records(tmp_path, [[obj(Box(i, 0, i + 100, 100), ann_id=i)] for i in range(5)])
    answers = {f"box {i}": Box(i, 0, i + 100, 100) for i in range(0, 5, 2)}
    cfg = BootstrapConfig(batch_size=2)
    bootstrap(ScriptedVLM(answers), records, tmp_path / "straight", cfg, image_root=tmp_path, write_report=False)
    out = tmp_path / "cut"
    bootstrap(ScriptedVLM(answers), records, out, cfg, image_root=tmp_path, write_report=False)
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    (out / "records.shards").mkdir()  # the state of a run killed inside batch 1 (images 2, 3): image 3's line torn
    (out / "records.shards" / "000.jsonl").write_text("".join(lines[:3]) + lines[3][:20])
    for name in (*OUTPUTS, "records.jsonl"):
        (out / name).unlink()
    vlm = CountingVLM(answers)
    stats = bootstrap(vlm, records, out, cfg, image_root=tmp_path, write_report=False)
    assert vlm.prompts == ["box 2", "box 3", "box 4"]  # batch 1 again as a whole, then batch 2
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert stats["kept"] == 3 and stats["boxes_considered"] == 5


def test_an_undecodable_image_stops_the_run_or_is_skipped_and_counted(tmp_path):
    records = image_records(tmp_path, [[obj(Box(i, 0, i + 100, 100), ann_id=i)] for i in range(3)])
    (tmp_path / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    answers = {"box 0": Box(0, 0, 100, 100), "box 2": Box(2, 0, 102, 100)}
    with pytest.raises(DataError, match="1.png"):
        bootstrap(ScriptedVLM(answers), records, tmp_path / "fail", BootstrapConfig(), image_root=tmp_path, write_report=False)
    stats = bootstrap(
        ScriptedVLM(answers), records, tmp_path / "skip", BootstrapConfig(), image_root=tmp_path, on_error="skip", write_report=False
    )
    assert decisions(tmp_path / "skip")[(1, 1)] == ("skipped", "unreadable_image")
    assert stats["images_skipped"] == {"unreadable_image": 1} and stats["kept"] == 2 and stats["boxes_considered"] == 2


def test_batches_stride_over_processes_and_cover_every_image():
    shares = [batch_ranges(10, 3, rank, 2) for rank in range(2)]
    assert shares == [[(0, range(0, 3)), (2, range(6, 9))], [(1, range(3, 6)), (3, range(9, 10))]]
    assert sorted(i for share in shares for _, r in share for i in r) == list(range(10))
    assert BootstrapConfig.shapes().min_area_px == SHAPES_MIN_AREA_PX and BootstrapConfig().min_area_px == 2000


def test_malformed_detections_exit_2_naming_file_and_record(tmp_path, capsys):
    Image.new("RGB", (50, 50)).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 50}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10]},
        ],
        "categories": [{"id": 1, "name": "cup"}],
    }
    (tmp_path / "det.json").write_text(json.dumps(coco))
    code, _, err = run_cli(["bootstrap", "--data", str(tmp_path / "det.json"), "--out", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 2 and "det.json, record annotations[1]" in err and "bbox" in err and "Traceback" not in err, err
    good = {"image_id": 1, "file_name": "a.png", "bbox": [0, 0, 10, 10], "sentences": ["a cup"]}
    (tmp_path / "refs.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    code, _, err = run_cli(["bootstrap", "--data", str(tmp_path / "refs.jsonl"), "--out", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 2 and "refs.jsonl, record line 2" in err and "not valid JSON" in err, err
    assert not (tmp_path / "out" / "stats.json").exists()


# ---- the command: SIGKILL + rerun, two processes ---------------------------------------------------
def cli_args(model, out, num_images: int, batch_size: int) -> list[str]:
    return [
        "bootstrap",
        "--data",
        "crowded",
        "--num-images",
        str(num_images),
        "--model",
        str(model),
        "--out",
        str(out),
        "--samples",
        "2",
        "--batch-size",
        str(batch_size),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-report",
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A one-process run of the command with a tiny random model: the reference outputs."""
    root = tmp_path_factory.mktemp("bootstrap")
    model = save_tiny_random(root / "model")
    env = os.environ | {"REFLOOP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "REFLOOP_CACHE": str(root / "cache")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REFLOOP_CACHE", env["REFLOOP_CACHE"])
        code, _, _ = run_cli(cli_args(model, root / "straight", 16, 2))  # in this process: --threads 1, as the killed run
    assert code == 0
    return model, root / "straight", env


def assert_same_outputs(a, b) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = (json.loads((d / "stats.json").read_text()) for d in (a, b))
    volatile = ("boxes_per_second", "processes", "boxes_described_now")  # a resumed run describes fewer boxes itself
    assert {k: v for k, v in sa.items() if k not in volatile} == {k: v for k, v in sb.items() if k not in volatile}


def test_a_rerun_with_every_image_done_keeps_the_rate_of_the_run_that_described_them(straight, tmp_path):
    import shutil

    model, reference, env = straight
    done = tmp_path / "done"
    shutil.copytree(reference, done)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REFLOOP_CACHE", env["REFLOOP_CACHE"])
        assert run_cli(cli_args(model, done, 16, 2))[0] == 0
    before, after = (json.loads((d / "stats.json").read_text()) for d in (reference, done))
    assert after["boxes_described_now"] == 0 and after["boxes_per_second"] == before["boxes_per_second"] > 0


def test_sigkilled_run_resumes_to_identical_records(straight, tmp_path, monkeypatch):
    model, reference, env = straight
    assert json.loads((reference / "stats.json").read_text())["boxes_considered"] > 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "refloop.cli", *cli_args(model, out, 16, 2)], env=env, stderr=subprocess.DEVNULL)
    shard = out / "records.shards" / "000.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not shard.exists() or shard.read_bytes().count(b"\n") < 2):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert shard.read_bytes().count(b"\n") < 16 and not (out / "stats.json").exists(), "the run finished before it was killed"
    monkeypatch.setenv("REFLOOP_CACHE", env["REFLOOP_CACHE"])
    assert run_cli(cli_args(model, out, 16, 2))[0] == 0  # resumed in this process
    assert_same_outputs(reference, out)
    ids = [c["id"] for c in candidates(out)]
    assert len(ids) == len(set(ids))


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes_to_identical_records(straight, tmp_path, monkeypatch):
    """`timeout`, `kill` and schedulers send SIGTERM: one line saying how to resume, the process ends
    as SIGTERM ends it (status 143 in a shell), the run's manifest closed (what it wrote is
    recorded), and the rerun resumes."""
    model, reference, env = straight
    out = tmp_path / "terminated"
    proc = subprocess.Popen([sys.executable, "-m", "refloop.cli", *cli_args(model, out, 16, 2)], env=env, stderr=subprocess.PIPE, text=True)
    shard = out / "records.shards" / "000.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not shard.exists() or shard.read_bytes().count(b"\n") < 2):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert not (out / "stats.json").exists(), "the run finished before it was stopped"
    assert proc.returncode == -signal.SIGTERM and "interrupted; rerun the same command" in err and "Traceback" not in err
    assert json.loads((out / ".refloop-manifest.json").read_text())["open"] is False
    monkeypatch.setenv("REFLOOP_CACHE", env["REFLOOP_CACHE"])
    assert run_cli(cli_args(model, out, 16, 2))[0] == 0
    assert_same_outputs(reference, out)


# ---- the recipe: YAML, flags as overrides ---------------------------------------------------------
def test_bootstrap_recipe_takes_yaml_with_the_flags_as_overrides(tmp_path, monkeypatch, capsys):
    from refloop.methods import bootstrap_recipe

    seen = []
    monkeypatch.setattr(bootstrap_recipe, "run_bootstrap", lambda recipe, out, progress=None, overwrite=False: seen.append(recipe))
    path = tmp_path / "bootstrap.yaml"
    path.write_text("data: crowded\nnum_images: 40\nbootstrap: {samples: 2, seed: 5}\n")
    code, _, err = run_cli(["bootstrap", "--config", str(path), "--samples", "3", "--no-report", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    (recipe,) = seen
    assert (recipe.data, recipe.num_images, recipe.report) == ("crowded", 40, False)
    assert (recipe.bootstrap.samples, recipe.bootstrap.seed, recipe.bootstrap.min_area_px) == (3, 5, SHAPES_MIN_AREA_PX)
    seen.clear()
    code, _, err = run_cli(["bootstrap", "--data", str(tmp_path / "det.json"), "--batch-size", "8", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert seen[0].bootstrap.min_area_px == 2000 and seen[0].bootstrap.batch_size == 8  # a file: Pink's A.2 value
    code, _, err = run_cli(["bootstrap", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "data" in err  # no --data and no recipe naming it
