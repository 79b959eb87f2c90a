"""Ownership of outputs (issue 18): refloop deletes or replaces only what it wrote. A run directory
records what it holds (run.json + a manifest of the entries refloop created); --overwrite replaces
an earlier refloop run (the manifest's entries only) and a directory holding no refloop run is
refused; every output path is checked before any work; a rerun with other data is never a resume."""

import json
from importlib.resources import files
from pathlib import Path

import pytest
from helpers import assert_refused, save_tiny_random
from helpers import run_cli as run

from refloop.errors import RefloopError
from refloop.runs import FINGERPRINT, MANIFEST, check_output, run_directory, write_text_whole

RECIPES = Path(str(files("refloop") / "recipes"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_random(root / "a", seed=0), save_tiny_random(root / "b", seed=1)


@pytest.fixture
def user_dir(tmp_path):
    """A directory of the user's: a file and a folder refloop never wrote."""
    d = tmp_path / "mine"
    (d / "photos").mkdir(parents=True)
    (d / "notes.txt").write_text("mine")
    (d / "photos" / "a.txt").write_text("mine too")
    return d


def assert_untouched(d: Path, extra: set[str] = frozenset()) -> None:
    assert (d / "notes.txt").read_text() == "mine" and (d / "photos" / "a.txt").read_text() == "mine too"
    assert {p.name for p in d.iterdir()} - {".refloop.lock"} == {"notes.txt", "photos"} | set(extra)


def referring_file(tmp_path: Path) -> Path:
    """A one-image referring JSONL whose image exists."""
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(tmp_path / "img.png")
    row = {"ref_id": 1, "image_id": 1, "file_name": "img.png", "width": 32, "height": 32, "bbox": [1, 1, 19, 19]}
    row |= {"category": "square", "sentences": ["the square"]}
    path = tmp_path / "refs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


def every_command(out: Path, model: Path, data: Path) -> dict[str, list[str]]:
    """Each command that writes a directory, with arguments that would otherwise run."""
    o, m, d = str(out), str(model), str(data)
    return {
        "consistency": ["consistency", "--data", "in-domain", "--num-boxes", "2", "--model", m, "--out", o],
        "eval rec": ["eval", "rec", "--data", d, "--model", m, "--out", o],
        "eval caption": ["eval", "caption", "--data", "in-domain", "--num-images", "2", "--model", m, "--out", o],
        "caption": ["caption", "--data", "in-domain", "--num-images", "2", "--model", m, "--out", o],
        "bootstrap": ["bootstrap", "--data", "in-domain", "--num-images", "2", "--model", m, "--out", o],
        "rc-data": ["rc-data", "--data", d, "--out", o],
        "export-world": ["export-world", "--domain", "in-domain", "--num-images", "2", "--out", o],
        "demo": ["demo", "--num-boxes", "2", "--no-sctune", "--no-svp", "--no-bootstrap", "--model", m, "--out", o],
        "pretrain-tiny": ["pretrain-tiny", "--steps", "1", "--work-dir", str(out.parent / "work"), "--out", o],
        "sctune": ["sctune", "--config", str(RECIPES / "sctune-shapes.yaml"), "--out", o],
        "sft": ["sft", "--config", str(RECIPES / "sft-shapes.yaml"), "--set", f"train_data={d}", "--out", o],
        "svp": ["svp", "--config", str(RECIPES / "svp-shapes.yaml"), "--out", o],
    }


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("command", list(every_command(Path("o"), Path("m"), Path("d"))))
def test_a_directory_holding_no_refloop_run_is_refused_by_every_command(tmp_path, models, user_dir, capsys, command, overwrite):
    args = every_command(user_dir, models[0], referring_file(tmp_path))[command] + (["--overwrite"] if overwrite else [])
    assert_refused(run(args, capsys), str(user_dir), "holds no refloop run", "choose an empty or new directory")
    assert_untouched(user_dir)


@pytest.mark.parametrize("task", ["rec", "pope"])  # one of each report module (reg and caption add Java's METEOR, ~15 s)
def test_eval_reports_are_the_runs_own_files(tmp_path, models, capsys, task):
    """report.html and its pictures are written after the run closed: still in its manifest (so
    --overwrite replaces them); a rerun with --no-report removes them (they would describe
    other results: a resumed run may have more rows) and leaves a user's file alone."""
    out = tmp_path / task
    data = ["--data", str(referring_file(tmp_path))] if task in ("rec", "reg") else ["--data", "in-domain", "--num-images", "2"]
    args = ["eval", task, *data, "--model", str(models[0]), "--out", str(out)]
    assert run(args, capsys)[0] == 0
    wrote = {p.name for p in out.iterdir()} - {".refloop.lock", FINGERPRINT, MANIFEST}
    assert "report.html" in wrote and any(name.endswith(".png") for name in wrote)
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == wrote
    (out / "mine.png").write_text("the user's")  # a user's picture beside refloop's
    assert run([*args, "--no-report"], capsys)[0] == 0  # the same run again without a report: the earlier one goes
    assert not (out / "report.html").exists() and [p.name for p in out.glob("*.png")] == ["mine.png"]
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == {n for n in wrote if n != "report.html" and not n.endswith(".png")}


def test_rc_data_into_the_working_directory_deletes_nothing(tmp_path, user_dir, capsys, monkeypatch):
    monkeypatch.chdir(user_dir)
    assert_refused(run(["rc-data", "--data", str(referring_file(tmp_path)), "--out", "."], capsys), "holds no refloop run")
    assert_untouched(user_dir)


def test_overwrite_replaces_only_the_files_of_the_earlier_run(tmp_path, models, capsys):
    out = tmp_path / "run"
    args = ["consistency", "--data", "in-domain", "--num-boxes", "2", "--out", str(out)]
    assert run([*args, "--model", str(models[0])], capsys)[0] == 0
    wrote = {p.name for p in out.iterdir()} - {".refloop.lock", FINGERPRINT, MANIFEST}
    assert {"samples.jsonl", "metrics.json", "report.html"} <= wrote
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == wrote
    (out / "notes.txt").write_text("mine")  # the user's, beside refloop's
    (out / "mine").mkdir()
    assert_refused(run([*args, "--model", str(models[1])], capsys), "holds outputs of another run", "--overwrite")
    assert run([*args, "--model", str(models[1]), "--overwrite"], capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine").is_dir()
    assert json.loads((out / "metrics.json").read_text())["model"] == str(models[1])
    manifest = json.loads((out / MANIFEST).read_text())
    assert "notes.txt" not in manifest["files"] and {"notes.txt", "mine"} <= set(manifest["foreign"])
    assert run([*args, "--model", str(models[1])], capsys)[0] == 0  # the same run resumes beside the user's files
    assert (out / "notes.txt").read_text() == "mine"
    # another command's run is named as such, not as a list of setting differences
    other = ["eval", "rec", "--data", "in-domain", "--model", str(models[1]), "--out", str(out)]
    assert_refused(run(other, capsys), "holds a `consistency` run, not a `rec` one", "--overwrite")


def test_rc_data_rerun_with_other_options_needs_overwrite_and_keeps_the_users_files(tmp_path, capsys):
    data, out = referring_file(tmp_path), tmp_path / "rc"
    assert run(["rc-data", "--data", str(data), "--out", str(out)], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    assert run(["rc-data", "--data", str(data), "--out", str(out)], capsys)[0] == 0  # the same run: redone in place
    assert_refused(run(["rc-data", "--data", str(data), "--seed", "1", "--out", str(out)], capsys), "--overwrite")
    assert run(["rc-data", "--data", str(data), "--seed", "1", "--out", str(out), "--overwrite"], capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "rc.jsonl").exists()


def test_a_killed_run_leaves_its_files_to_the_next_overwrite_but_not_the_users(tmp_path):
    out = tmp_path / "run"
    with run_directory(out, {"task": "t", "v": 1}):
        (out / "a.jsonl").write_text("x")
    (out / "notes.txt").write_text("mine")  # added after a clean run: the user's
    with run_directory(out, {"task": "t", "v": 1}):
        (out / "b.jsonl").write_text("x")
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["open"] and manifest["files"] == ["a.jsonl"] and manifest["foreign"] == ["notes.txt"]
    # a SIGKILL leaves the manifest open and its new files unrecorded: the next run adopts them
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "c.jsonl").write_text("x")
    with run_directory(out, {"task": "t", "v": 1}):
        pass
    assert json.loads((out / MANIFEST).read_text())["files"] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    with run_directory(out, {"task": "t", "v": 2}, overwrite=True):
        assert sorted(p.name for p in out.iterdir() if p.name not in (".refloop.lock", FINGERPRINT, MANIFEST)) == ["notes.txt"]
        (out / "d.jsonl").write_text("x")
        killed = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps(killed))  # killed again, then replaced by a run of other settings
    (out / "e.jsonl").write_text("x")
    with run_directory(out, {"task": "t", "v": 3}, overwrite=True):  # no stale rows of the killed run to resume from
        assert sorted(p.name for p in out.iterdir() if p.name not in (".refloop.lock", FINGERPRINT, MANIFEST)) == ["notes.txt"]


def test_overwrite_refuses_when_the_user_put_files_inside_refloops_folders(tmp_path):
    """A note in eval/, a best adapter copied into adapters/: refloop created the folders, not these.
    --overwrite names them and deletes nothing (it would also have to leave the folders' stale
    outputs beside them); once they are moved out, it replaces the run."""
    out = tmp_path / "run"
    with run_directory(out, {"task": "t", "v": 1}):
        (out / "eval").mkdir()
        (out / "eval" / "metrics.json").write_text("{}")
        (out / "adapters" / "describer").mkdir(parents=True)
        (out / "adapters" / "describer" / "w.bin").write_text("w")
        (out / "train").mkdir()
        (out / "train" / "log.jsonl").write_text("x")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"] == ["adapters/describer/w.bin", "eval/metrics.json", "train/log.jsonl"]
    assert manifest["dirs"] == ["adapters", "adapters/describer", "eval", "train"] and manifest["foreign"] == []
    (out / "eval" / "NOTES.md").write_text("mine")
    (out / "adapters" / "my_best").mkdir()
    (out / "adapters" / "my_best" / "w.bin").write_text("mine")
    (out / "notes.txt").write_text("mine")  # beside refloop's folders: kept, as always
    outside = tmp_path / "precious.txt"
    outside.write_text("mine")
    with run_directory(out, {"task": "t", "v": 1}):  # the same run resumes: what the user added is recorded as theirs
        (out / "train" / "link").symlink_to(outside)  # a symlink refloop wrote: removed itself, its target never
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(RefloopError, match=r"adapters/my_best, adapters/my_best/w.bin, eval/NOTES.md\); refloop never deletes"):
        with run_directory(out, {"task": "t", "v": 2}, overwrite=True):
            pass
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    (out / "eval" / "NOTES.md").rename(tmp_path / "NOTES.md")
    (out / "adapters" / "my_best" / "w.bin").rename(tmp_path / "best.bin")
    (out / "adapters" / "my_best").rmdir()
    with run_directory(out, {"task": "t", "v": 2}, overwrite=True):
        left = sorted(p.name for p in out.iterdir() if p.name not in (".refloop.lock", FINGERPRINT, MANIFEST))
        assert left == ["notes.txt"]
    assert outside.read_text() == "mine"


def test_a_manifest_never_leads_overwrite_out_of_the_run_or_through_a_symlink(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x").write_text("mine")
    with run_directory(out, {"task": "t", "v": 1}):
        (out / "d").symlink_to(elsewhere)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"] += ["../elsewhere/x", "d/x", "/" + str(elsewhere / "x").lstrip("/"), "a/../../elsewhere/x"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with run_directory(out, {"task": "t", "v": 2}, overwrite=True):
        pass
    assert (elsewhere / "x").read_text() == "mine" and not (out / "d").is_symlink()


def test_a_manifest_of_the_older_format_still_owns_its_folders_whole(tmp_path):
    """Runs written before nested manifests named top-level entries only: their folders stay
    refloop's with everything in them, as that refloop treated them; the user's entries stay theirs."""
    out = tmp_path / "run"
    (out / "train").mkdir(parents=True)
    (out / "train" / "state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / FINGERPRINT).write_text(json.dumps({"task": "t", "v": 1}))
    (out / MANIFEST).write_text(json.dumps({"files": ["train"], "foreign": ["notes.txt"], "open": False}))
    with run_directory(out, {"task": "t", "v": 2}, overwrite=True):
        assert sorted(p.name for p in out.iterdir() if p.name not in (".refloop.lock", FINGERPRINT, MANIFEST)) == ["notes.txt"]
    assert json.loads((out / MANIFEST).read_text())["version"] == 2


def test_overwrite_refuses_a_users_file_inside_a_nested_run_and_breaks_nothing(tmp_path):
    """The trainer's train/, the evaluations' eval/...: runs inside a run. A user's note in one
    stops the outer --overwrite before anything is deleted; both runs stay as they were."""
    out = tmp_path / "run"
    with run_directory(out, {"task": "t", "v": 1}):
        with run_directory(out / "train", {"task": "training", "v": 1}):
            (out / "train" / "state.json").write_text("{}")
    (out / "train" / "notes.txt").write_text("mine")
    with pytest.raises(RefloopError, match="train/notes.txt"):
        with run_directory(out, {"task": "t", "v": 2}, overwrite=True):
            pass
    with run_directory(out, {"task": "t", "v": 1}):  # the earlier run still resumes, its nested run too
        with run_directory(out / "train", {"task": "training", "v": 1}):
            assert (out / "train" / "state.json").exists() and (out / "train" / "notes.txt").read_text() == "mine"


def test_a_users_bookkeeping_named_file_inside_their_folder_stays_theirs(tmp_path):
    """A wandb run.json, or a refloop run copied in as a baseline, inside the user's folder."""
    out = tmp_path / "run"
    with run_directory(out, {"task": "t", "v": 1}):
        (out / "samples.jsonl").write_text("x")
    (out / "baseline").mkdir()
    (out / "baseline" / FINGERPRINT).write_text("{}")
    (out / "baseline" / MANIFEST).write_text("{}")
    for v in (2, 3):
        with run_directory(out, {"task": "t", "v": v}, overwrite=True):
            (out / "samples.jsonl").write_text("x")
    assert (out / "baseline" / FINGERPRINT).read_text() == "{}" and (out / "baseline" / MANIFEST).read_text() == "{}"


@pytest.mark.parametrize("user_folder_stays", [True, False])
def test_what_a_run_writes_into_a_folder_the_user_made_is_the_runs(tmp_path, user_folder_stays):
    """eval/ made by the user before refloop writes its eval/samples.jsonl there: --overwrite must
    still clear the rows (a rerun would resume them), and keep the user's note."""
    out = tmp_path / "run"
    with run_directory(out, {"task": "t", "v": 1}):
        (out / "recipe.json").write_text("{}")
    (out / "eval").mkdir()
    (out / "eval" / "note.txt").write_text("mine")
    if not user_folder_stays:
        with run_directory(out, {"task": "t", "v": 1}):  # the user's folder recorded as theirs...
            pass
        (out / "eval" / "note.txt").unlink()  # ...then removed by them
        (out / "eval").rmdir()
    with run_directory(out, {"task": "t", "v": 1}):
        (out / "eval").mkdir(exist_ok=True)
        (out / "eval" / "samples.jsonl").write_text("rows of v1\n")
    with run_directory(out, {"task": "t", "v": 2}, overwrite=True):
        assert not (out / "eval" / "samples.jsonl").exists()
    assert (out / "eval" / "note.txt").read_text() == "mine" if user_folder_stays else not (out / "eval").exists()


def test_a_version_1_run_keeps_what_the_user_added_to_its_folders_after_it_closed(tmp_path):
    import os

    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "samples.jsonl").write_text("x")
    (out / FINGERPRINT).write_text(json.dumps({"task": "t", "v": 1}))
    (out / MANIFEST).write_text(json.dumps({"files": ["eval"], "foreign": [], "open": False}))
    closed = (out / MANIFEST).stat().st_mtime
    os.utime(out / MANIFEST, (closed + 100, closed + 100))  # the run closed after its rows were written...
    (out / "eval" / "my-note.txt").write_text("mine")  # ...this was written after that (its times are now)
    os.utime(out / MANIFEST, (closed - 100, closed - 100))
    os.utime(out / "eval" / "samples.jsonl", (closed - 200, closed - 200))
    with pytest.raises(RefloopError, match="eval/my-note.txt"):
        with run_directory(out, {"task": "t", "v": 2}, overwrite=True):
            pass
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["my-note.txt", "samples.jsonl"]


@pytest.mark.parametrize("manifest", [{"version": 3, "files": []}, {"version": 2, "files": ["a\u0000b"], "dirs": [], "foreign": []}])
def test_a_manifest_refloop_cannot_read_safely_is_damaged_and_never_followed(tmp_path, manifest):
    out = tmp_path / "run"
    out.mkdir()
    (out / FINGERPRINT).write_text(json.dumps({"task": "t"}))
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "samples.jsonl").write_text("x")
    with pytest.raises(RefloopError, match="without a readable manifest"):
        with run_directory(out, {"task": "u"}, overwrite=True):
            pass
    assert (out / "samples.jsonl").read_text() == "x"


def test_a_run_without_a_manifest_resumes_but_is_never_overwritten(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / FINGERPRINT).write_text(json.dumps({"task": "t"}))  # written by a refloop without manifests
    (out / "samples.jsonl").write_text("x")
    with run_directory(out, {"task": "t"}):
        pass
    with pytest.raises(RefloopError, match="without a readable manifest"):
        with run_directory(out, {"task": "u"}, overwrite=True):
            pass
    assert (out / "samples.jsonl").read_text() == "x"


def test_a_new_run_that_fails_before_writing_leaves_no_fingerprint(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RefloopError, match="no such data"):
        with run_directory(out, {"task": "t", "data": "missing"}, setup_files=("recipe.json",)):
            (out / "recipe.json").write_text("{}")
            raise RefloopError("no such data")
    assert not out.exists()  # the corrected rerun starts afresh, no --overwrite needed
    out.mkdir()
    with pytest.raises(RefloopError):
        with run_directory(out, {"task": "t"}):
            raise RefloopError("no such data")
    assert out.is_dir() and not (out / FINGERPRINT).exists()
    with run_directory(out, {"task": "t", "data": "there"}):
        (out / "rows.jsonl").write_text("x")
    with pytest.raises(RefloopError):  # an interrupted resume keeps its run
        with run_directory(out, {"task": "t", "data": "there"}):
            raise RefloopError("later")
    assert (out / FINGERPRINT).exists() and (out / "rows.jsonl").exists()


def test_sft_with_missing_training_data_leaves_no_run_behind(tmp_path, capsys):
    out = tmp_path / "sft"
    args = ["sft", "--config", str(RECIPES / "sft-shapes.yaml"), "--set", f"train_data={tmp_path / 'none.jsonl'}", "--out", str(out)]
    assert_refused(run(args, capsys), "none.jsonl")
    assert not (out / FINGERPRINT).exists()


# ---- one rule for output paths ------------------------------------------------------------------
def test_export_parquet_never_replaces_its_input(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"a": 1}\n')
    assert_refused(run(["export-parquet", str(data), str(data)], capsys), "is one of the input files")
    assert data.read_text() == '{"a": 1}\n'


@pytest.mark.parametrize("where", ["directory", "under a file"])
def test_export_parquet_to_a_bad_place_is_one_error_line(tmp_path, capsys, where):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"a": 1}\n')
    (tmp_path / "file").write_text("x")
    target = tmp_path if where == "directory" else tmp_path / "file" / "x.parquet"
    assert_refused(run(["export-parquet", str(data), str(target)], capsys), str(target))
    assert (tmp_path / "file").read_text() == "x"


def test_filter_replaces_only_a_triplets_file_it_wrote_and_only_with_overwrite(tmp_path, capsys):
    data = tmp_path / "instances.json"
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}], "categories": [{"id": 1, "name": "square"}]}
    coco["annotations"] = [{"id": k, "image_id": 1, "category_id": 1, "bbox": [40 * k, 10, 20, 20]} for k in (0, 1)]
    data.write_text(json.dumps(coco))
    users = tmp_path / "notes.json"
    users.write_text('{"precious": 1}\n')
    assert_refused(run(["filter", str(data), "--out", str(users)], capsys), "exists", "--overwrite")
    assert_refused(run(["filter", str(data), "--out", str(users), "--overwrite"], capsys), "not a file this command writes")
    assert users.read_text() == '{"precious": 1}\n'
    out = tmp_path / "triplets.jsonl"
    assert run(["filter", str(data), "--out", str(out)], capsys)[0] == 0
    first = out.read_text()
    assert_refused(run(["filter", str(data), "--out", str(out)], capsys), "exists", "--overwrite")
    code, _, err = run(["filter", str(data), "--out", str(out), "--overwrite", "--max-overlap-iou", "0.9"], capsys)
    assert code == 0, err
    assert out.read_text() == first  # replaced by the same triplets (no box here overlaps)


def test_a_file_output_typed_as_a_directory_is_refused_not_written_as_a_file(tmp_path, capsys):
    """`--out runs/` (a new name with a trailing slash) meant a directory: a Path drops the slash,
    and a file named `runs` would be written."""
    data = tmp_path / "instances.json"
    data.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"a": 1}\n')
    assert_refused(run(["filter", str(data), "--out", f"{tmp_path / 'runs'}/"], capsys), "not a directory", "triplets.jsonl")
    assert_refused(run(["export-parquet", str(jsonl), f"{tmp_path / 'exports'}/"], capsys), "not a directory", "samples.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instances.json", "rows.jsonl"]


def test_outputs_replaced_whole_never_touch_a_neighbouring_tmp_file_or_follow_its_symlink(tmp_path):
    from refloop.data.jsonl import write_records

    (tmp_path / "notes.tmp").write_text("keep me")  # the name a fixed-suffix temporary file would take
    target = tmp_path / "target.txt"
    target.write_text("mine")
    (tmp_path / "out.jsonl.tmp").symlink_to(target)
    write_records(tmp_path / "notes", [{"a": 1}])
    write_records(tmp_path / "out.jsonl", [{"a": 2}])
    assert (tmp_path / "notes.tmp").read_text() == "keep me" and target.read_text() == "mine"
    assert not (tmp_path / "out.jsonl").is_symlink() and (tmp_path / "out.jsonl").read_text() == '{"a": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "notes.tmp", "out.jsonl", "out.jsonl.tmp", "target.txt"]


def _merge_one_shard(path: Path) -> None:
    from refloop.data.shards import merge

    shards = path.with_name(path.name + ".shards")
    shards.mkdir()
    (shards / "0.jsonl").write_text('{"id": "a"}\n')
    merge(path, shards, {"a": 0}, "id")


def _writers():
    from refloop.data.bootstrapped import write_stats
    from refloop.runs import _write_json
    from refloop.training.checkpoint import truncate_log, write_json_durably

    return {
        "rc.jsonl": lambda path: write_text_whole(path, ['{"a": 1}\n']),  # rc-data's writer
        "stats.json": lambda path: write_stats(path.parent, {"a": 1}),
        "state.json": lambda path: write_json_durably(path, {"a": 1}),
        "log.jsonl": lambda path: (path.write_text('{"step": 1}\n{"step": 2}\n'), truncate_log(path, 1)),
        "merged.jsonl": _merge_one_shard,
        FINGERPRINT: lambda path: _write_json(path, {"a": 1}),  # the run's bookkeeping
        MANIFEST: lambda path: _write_json(path, {"a": 1}),
    }


@pytest.mark.parametrize("name", ["rc.jsonl", "stats.json", "state.json", "log.jsonl", "merged.jsonl", FINGERPRINT, MANIFEST])
def test_refloops_own_files_are_replaced_through_a_fresh_name_never_a_users_tmp_file(tmp_path, name):
    """Inside a run directory too, a whole-file write goes through a fresh temporary name: a user's
    `NAME.tmp` beside it (the fixed name these writers once used) is neither replaced nor removed."""
    (tmp_path / f"{name}.tmp").write_text("keep me")
    _writers()[name](tmp_path / name)
    assert (tmp_path / f"{name}.tmp").read_text() == "keep me"
    assert (tmp_path / name).read_text().strip()
    assert {p.name for p in tmp_path.iterdir()} == {name, f"{name}.tmp"}
    if name == "log.jsonl":  # truncated to the rows up to the step, replaced whole
        assert (tmp_path / name).read_text() == '{"step": 1}\n'


def test_filter_overwrite_recognises_its_file_by_every_line(tmp_path):
    from refloop.data.filters import is_triplets_file

    row = {"image_id": 1, "category": "a", "boxes": [[0, 0, 1, 1]], "file_name": "x.png", "width": 2, "height": 2}
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    ours.write_text(json.dumps(row) + "\n")
    theirs.write_text((json.dumps(row) + "\n") * 6 + '{"note": "mine"}\n')  # triplet-like at the top only
    assert is_triplets_file(ours) and not is_triplets_file(theirs)


def test_export_parquet_replaces_only_a_parquet_file_it_wrote(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    data = tmp_path / "rows.jsonl"
    data.write_text('{"a": 1}\n')
    users = tmp_path / "users.parquet"
    users.write_bytes(b"PAR1 not refloop's")
    for extra in ([], ["--overwrite"]):
        assert_refused(run(["export-parquet", str(data), str(users), *extra], capsys), str(users))
    assert users.read_bytes() == b"PAR1 not refloop's"
    out = tmp_path / "rows.parquet"
    assert run(["export-parquet", str(data), str(out)], capsys)[0] == 0
    assert_refused(run(["export-parquet", str(data), str(out)], capsys), "exists", "--overwrite")
    data.write_text('{"a": 2}\n')
    code, _, err = run(["export-parquet", str(data), str(out), "--overwrite"], capsys)
    assert code == 0, err
    import pyarrow.parquet as pq

    assert pq.read_table(out).to_pylist() == [{"a": 2}]


def test_demo_and_pretrain_refuse_a_file_as_out_before_any_work(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert_refused(run(["demo", "--out", str(taken)], capsys), "not a directory")
    # the real recipe trains for 80 minutes: the refusal comes before the first step
    args = ["pretrain-tiny", "--work-dir", str(tmp_path / "work"), "--out", str(taken)]
    assert_refused(run(args, capsys), "not a directory")
    assert not (tmp_path / "work").exists() and taken.read_text() == "x"
    assert_refused(run([*args[:-1], str(tmp_path / "work" / "model")], capsys), "overlap")


def test_out_inside_or_equal_to_an_input_is_refused(tmp_path, models, capsys):
    data = referring_file(tmp_path)
    for out in (tmp_path, tmp_path / "outs" / "x"):
        args = ["eval", "rec", "--data", str(data), "--images", str(tmp_path), "--model", str(models[0]), "--out", str(out)]
        assert_refused(run(args, capsys), "inside the input" if out != tmp_path else "is one of the input files")
    assert not (tmp_path / "outs").exists()
    assert_refused(run(["filter", str(data), "--out", str(data)], capsys), "is one of the input files")


def test_out_under_a_file_is_refused_before_anything_loads(tmp_path, models, capsys):
    (tmp_path / "file").write_text("x")
    args = ["consistency", "--data", "in-domain", "--num-boxes", "2", "--model", str(models[0]), "--out", str(tmp_path / "file" / "o")]
    assert_refused(run(args, capsys), "is a file, not a directory")


def test_check_output_creates_nothing(tmp_path):
    check_output(tmp_path / "a" / "b")
    check_output(tmp_path / "c.parquet", kind="file")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_directory_is_left_as_it_was_found(tmp_path):
    """Through the Python API (no CLI pre-check) a folder of the user's was refused, but its lock
    file stayed behind in it (a first-contact helper's finding)."""
    (tmp_path / "mine.txt").write_text("my notes")
    with pytest.raises(RefloopError, match="holds no refloop run"):
        with run_directory(tmp_path, {"task": "x"}):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


# ---- fingerprints carry the data ----------------------------------------------------------------
def test_caption_rerun_with_other_images_is_refused_not_resumed(tmp_path, models, capsys):
    out = tmp_path / "cap"
    args = ["caption", "--data", "in-domain", "--model", str(models[0]), "--out", str(out), "--num-images"]
    assert run([*args, "2"], capsys)[0] == 0
    assert_refused(run([*args, "3"], capsys), "holds outputs of another run", "data.records")
    assert run([*args, "3", "--overwrite"], capsys)[0] == 0
    assert len((out / "captions.jsonl").read_text().splitlines()) == 3
    assert run([*args, "3"], capsys)[0] == 0  # the same data resumes


def test_consistency_rerun_on_a_changed_data_file_is_refused(tmp_path, models, capsys):
    data = referring_file(tmp_path)
    args = ["consistency", "--data", str(data), "--model", str(models[0]), "--no-report", "--out", str(tmp_path / "o")]
    assert run(args, capsys)[0] == 0
    row = json.loads(data.read_text())
    row["bbox"] = [2, 2, 28, 28]
    data.write_text(json.dumps(row) + "\n")
    assert_refused(run(args, capsys), "holds outputs of another run", "data_files")


# ---- parquet: one image per file_name, text under the failure policy ----------------------------
def _png(colour) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _referring_parquet(path: Path, rows: list[dict], bad_text_row: int | None = None) -> Path:
    """lmms-eval's referring layout; `bad_text_row`: that row's file_name is not UTF-8."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    names = [r["file_name"].encode() for r in rows]
    if bad_text_row is not None:
        names[bad_text_row] = b"img\xff.png"
    offsets = [0]
    for n in names:
        offsets.append(offsets[-1] + len(n))
    file_name = pa.Array.from_buffers(
        pa.string(), len(names), [None, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1]), pa.py_buffer(b"".join(names))]
    )
    table = pa.table(
        {
            "image": pa.array([{"bytes": r["image"], "path": None} for r in rows]),
            "bbox": [[1.0, 1.0, 10.0, 10.0]] * len(rows),
            "answer": [["the square"]] * len(rows),
            "file_name": file_name,
        }
    )
    pq.write_table(table, path)
    return path


def test_parquet_rows_sharing_a_file_name_with_other_image_bytes_are_refused_naming_both(tmp_path, models, capsys):
    from refloop.data.parquet import load_parquet

    red, blue = _png((200, 0, 0)), _png((0, 0, 200))
    rows = [{"file_name": "a.png", "image": red}, {"file_name": "a.png", "image": red}, {"file_name": "a.png", "image": blue}]
    path = _referring_parquet(tmp_path / "refs.parquet", rows)
    with pytest.raises(RefloopError, match=r"record row 2: image 'a.png' is also the image of row 0, with other bytes"):
        load_parquet(path)
    records, report = load_parquet(path, on_error="skip")  # the rows that agree stay on their own picture
    assert report.skipped == 1 and len(records) == 1 and len(records[0].objects) == 2 and records[0].data == red
    args = ["eval", "rec", "--data", str(path), "--model", str(models[0]), "--out", str(tmp_path / "o")]
    assert_refused(run(args, capsys), "row 2", "row 0", "other bytes")


def test_parquet_text_that_is_not_utf8_is_one_error_line_or_skipped(tmp_path, models, capsys):
    rows = [{"file_name": f"{k}.png", "image": _png((40 * k, 0, 0))} for k in range(3)]
    path = _referring_parquet(tmp_path / "refs.parquet", rows, bad_text_row=1)
    args = ["consistency", "--data", str(path), "--model", str(models[0]), "--no-report", "--out"]
    assert_refused(run([*args, str(tmp_path / "o")], capsys), str(path), "row 1", "'file_name'", "not UTF-8")
    code, _, err = run([*args, str(tmp_path / "o2"), "--on-error", "skip"], capsys)
    assert code == 0 and "skipped 1 bad record (" in err, err
    assert len((tmp_path / "o2" / "samples.jsonl").read_text().splitlines()) == 2


def test_export_parquet_of_rows_parquet_cannot_hold_is_one_error_line(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    data = tmp_path / "rows.jsonl"
    data.write_text('{"a": {}, "b": 1}\n')
    assert_refused(run(["export-parquet", str(data), str(tmp_path / "x.parquet")], capsys), str(data), "struct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


# ---- training data: one confinement rule for image paths ----------------------------------------
def _rc_line(image: str, n: int = 0) -> str:
    return json.dumps({"id": f"s{n}", "image": image, "prompt": "<image> how many? <sep>", "answer": "1", "profile": "refloop-tiny"})


@pytest.mark.parametrize(
    "name, problem",
    [("../outside.png", "escapes the image root"), ("/etc/hostname", "is absolute"), ("link/x.png", "escapes the image root")],
)
def test_training_data_image_paths_are_confined_before_anything_opens(tmp_path, capsys, monkeypatch, name, problem):
    from refloop.data.rc import load_rc_data

    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "outside.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "elsewhere").mkdir()
    (data / "link").symlink_to(tmp_path / "elsewhere")
    path = data / "rc.jsonl"
    path.write_text(_rc_line("ok.png") + "\n" + _rc_line(name, 1) + "\n")
    opened = []
    monkeypatch.setattr("PIL.Image.open", lambda *a, **k: opened.append(a))
    with pytest.raises(RefloopError, match=rf"rc.jsonl, record line 2: image path .*{problem}"):
        load_rc_data(path)
    assert not opened
    monkeypatch.undo()
    args = ["sft", "--config", str(RECIPES / "sft-shapes.yaml"), "--set", f"train_data={path}", "--out", str(tmp_path / "run")]
    assert_refused(run(args, capsys), "record line 2", problem)


def test_rc_data_records_its_image_root_and_sft_reads_the_images_under_it(tmp_path, capsys):
    from refloop.data.rc import load_rc_data

    data = referring_file(tmp_path)
    assert run(["rc-data", "--data", str(data), "--out", str(tmp_path / "rc")], capsys)[0] == 0
    assert json.loads((tmp_path / "rc" / "counts.json").read_text())["image_root"] == str(tmp_path.resolve())
    examples = load_rc_data(tmp_path / "rc" / "rc.jsonl")
    assert examples and {e.image_path for e in examples} == {str((tmp_path / "img.png").resolve())}


def test_sctune_that_finds_no_training_boxes_leaves_nothing_to_block_the_corrected_rerun(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    out = tmp_path / "run"
    args = ["sctune", "--config", str(RECIPES / "sctune-shapes.yaml"), "--set", f"train_data={empty}", "--out", str(out)]
    assert_refused(run(args, capsys), "empty.json")
    assert not out.exists()


def test_no_output_goes_inside_refloops_own_package(tmp_path, capsys):
    """The packaged model is an input of every command run without --model, named by none."""
    packaged = Path(str(files("refloop") / "assets" / "refloop-tiny"))
    assert_refused(run(["consistency", "--data", "in-domain", "--num-boxes", "1", "--out", str(packaged / "run")], capsys), "own package")
    assert_refused(run(["filter", str(tmp_path / "x.json"), "--out", str(packaged.parent / "t.jsonl")], capsys), "own package")
    assert not (packaged / "run").exists() and not (packaged.parent / "t.jsonl").exists()


def test_claiming_a_report_never_races_a_run_holding_the_directory_and_reaches_the_enclosing_run(tmp_path, caplog):
    import fcntl

    from refloop.runs import LOCK, claim_outputs

    out = tmp_path / "run"
    with run_directory(out, {"task": "t"}):
        with run_directory(out / "eval", {"task": "e"}):
            (out / "eval" / "samples.jsonl").write_text("x")
    (out / "eval" / "report.html").write_text("r")  # a report drawn after both runs closed
    with open(out / "eval" / LOCK, "a+") as held:  # another process's run holds the nested directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        claim_outputs(out / "eval", out / "eval" / "report.html")  # written already: said, not fatal
    assert "not recorded as refloop's" in caplog.text
    claim_outputs(out / "eval", out / "eval" / "report.html")
    assert "report.html" in json.loads((out / "eval" / MANIFEST).read_text())["files"]
    assert "eval/report.html" in json.loads((out / MANIFEST).read_text())["files"]  # the enclosing run's too
    with run_directory(out, {"task": "t", "v": 2}, overwrite=True):  # so its --overwrite clears it, refusing nothing
        assert not (out / "eval").exists()
