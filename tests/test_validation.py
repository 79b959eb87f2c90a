"""Options, bounds and data checked before any weights load (issue 18, items 6-8): every refusal
is exit 2 with one `error:` line naming the option, file or record, no traceback; and what a new
user meets on the way (reports, progress totals, undefined metrics, warnings) is honest.

In-process CLI runs throughout; weights loading is made to fail loudly where a check must come first."""

import json
import os

import pytest
import yaml
from helpers import assert_refused, run_cli, save_tiny_random

from refloop.errors import RefloopError


@pytest.fixture
def no_weights(monkeypatch):
    """Any weights load fails the test: the refusal under test must come before it."""
    from refloop.models.hf import HFVLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(HFVLM, "from_pretrained", classmethod(refuse))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_random(tmp_path_factory.mktemp("tiny") / "model")


def recipe_file(tmp_path, fields: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(fields))
    return str(path)


# ---- item 6: resource bounds --------------------------------------------------------------------


def test_absurd_thread_counts_are_refused_before_anything_loads(tmp_path, capsys, no_weights):
    args = ["bootstrap", "--data", "in-domain", "--out", str(tmp_path / "b"), "--threads", "100000000"]
    assert_refused(run_cli(args, capsys), "threads", "CPU cores")
    path = recipe_file(tmp_path, {"train_data": "wild", "threads": 100000000})
    assert_refused(run_cli(["svp", "--config", path, "--out", str(tmp_path / "s")], capsys), "threads", "CPU cores")
    assert not (tmp_path / "b").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "command, overrides, fragment",
    [
        ("svp", ["svp.samples=1000000000"], "samples"),
        ("svp", ["svp.images_per_batch=1000000000"], "images_per_batch"),
        ("svp", ["svp.sft.lora.r=100000000"], "lora.r"),
        ("svp", ["svp.max_new_tokens=1000000000"], "max_new_tokens"),
        ("svp", ["svp.seed=-1"], "svp.seed"),
        ("svp", ["svp.seed=1099511627776"], "svp.seed"),
        ("svp", ["grounder.seed=-5"], "grounder.seed"),
        ("sctune", ["sctune.batch_size=1000000000"], "batch_size"),
        ("sctune", ["sctune.group_size=100000"], "group_size"),
        ("sctune", ["sctune.generation_batch_size=0"], "generation_batch_size"),
    ],
)
def test_absurd_sizes_and_seeds_in_recipes_are_refused(tmp_path, capsys, command, overrides, fragment):
    path = recipe_file(tmp_path, {"train_data": "in-domain" if command == "sctune" else "wild"})
    args = [command, "--config", path, "--out", str(tmp_path / "run")]
    for item in overrides:
        args += ["--set", item]
    assert_refused(run_cli(args, capsys), fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["bootstrap", "--data", "in-domain", "--samples", "1000000000"], "bootstrap.samples"),
        (["bootstrap", "--data", "in-domain", "--batch-size", "1000000000"], "bootstrap.batch_size"),
        (["bootstrap", "--data", "in-domain", "--seed", "-1"], "bootstrap.seed"),
        (["bootstrap", "--data", "in-domain", "--scene-seed", "99999999999"], "--scene-seed"),
        (["consistency", "--data", "in-domain", "--batch-size", "1000000000"], "--batch-size"),
        (["consistency", "--data", "in-domain", "--seed", "-3"], "--seed"),
        (["rc-data", "--data", "in-domain", "--seed", "-3"], "--seed"),
        (["eval", "pope", "--data", "in-domain", "--seed", "-3"], "--seed"),
        (["export-world", "--domain", "wild", "--seed", "-3"], "--seed"),
    ],
)
def test_absurd_sizes_and_seeds_on_the_command_line_are_refused(tmp_path, capsys, no_weights, args, fragment):
    assert_refused(run_cli([*args, "--out", str(tmp_path / "out")], capsys), fragment)
    assert not (tmp_path / "out").exists()


BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{b}'] * 9)}]\n" for b, a in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize(
    "text, overrides",
    [
        ("a: &a [x, x, x, x, x, x, x, x, x]\n" + BOMB + "train_data: in-domain\n", []),  # a billion laughs
        ("train_data: in-domain\nsctune: &s {lora: {target_modules: [*s]}}\n", []),  # an anchor inside itself
        ("train_data: in-domain\n", ["eval_data=&a [*a]"]),
    ],
)
def test_yaml_alias_bombs_are_refused_at_once(tmp_path, capsys, text, overrides):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    args = ["sctune", "--config", str(path), "--out", str(tmp_path / "run")]
    for item in overrides:
        args += ["--set", item]
    started = time.perf_counter()
    assert_refused(run_cli(args, capsys), "aliases are expanded")
    assert time.perf_counter() - started < 5


def test_lora_rank_above_every_adapted_layer_width_is_refused_before_peft():
    from helpers import tiny_random_model

    from refloop.training.adapters import LoraSettings, NamedAdapters

    model, _ = tiny_random_model(hidden=32)
    with pytest.raises(RefloopError, match=r"lora.r 512 exceeds .*at most 32.*--set sctune.lora.r=32"):  # the key --set takes
        NamedAdapters(model, LoraSettings(r=512, alpha=16), ["sft"])
    assert not any("lora" in n for n, _ in model.named_modules())


# ---- item 7: every option before weights load -----------------------------------------------------


def test_unknown_processor_option_is_refused_naming_the_accepted_ones(tmp_path, capsys, no_weights):
    import families

    from refloop.models.processors import save_processor

    model, processor = families.qwen2_5_vl()
    model.save_pretrained(tmp_path / "qwen")
    save_processor(processor, tmp_path / "qwen")
    path = recipe_file(tmp_path, {"model": str(tmp_path / "qwen"), "train_data": "in-domain", "processor_options": {"max_pixel": 3136}})
    result = run_cli(["sctune", "--config", path, "--out", str(tmp_path / "run")], capsys)
    assert_refused(result, "processor_options max_pixel", "max_pixels")  # the misspelling and the real name


def test_refloop_tiny_takes_no_processor_options(tiny, tmp_path, capsys, no_weights):
    path = recipe_file(tmp_path, {"model": str(tiny), "train_data": "wild", "processor_options": {"max_pixels": 3136}})
    assert_refused(run_cli(["svp", "--config", path, "--out", str(tmp_path / "run")], capsys), "max_pixels", "takes none")


def test_devices_are_checked_before_data_and_named_with_the_way_to_set_them(tmp_path, capsys, no_weights):
    out = str(tmp_path / "out")
    assert_refused(run_cli(["caption", "--data", "in-domain", "--out", out, "--device", "tpu"], capsys), "--device")
    path = recipe_file(tmp_path, {"train_data": "in-domain", "device": "cuda"})
    result = run_cli(["sctune", "--config", path, "--out", out], capsys)
    assert_refused(result, "no CUDA device", "--set device=cpu")
    assert "--device cpu" not in result[2]  # sctune has no --device option
    assert not (tmp_path / "out").exists()


def test_unknown_grounder_is_one_message_naming_the_option(tmp_path, capsys, no_weights):
    result = run_cli(["caption", "--data", "in-domain", "--out", str(tmp_path / "o"), "--isvp", "--grounder", "yolo"], capsys)
    assert_refused(result, "--grounder", "oracle")
    assert "validation error" not in result[2]


def test_isvp_with_the_scene_oracle_on_a_coco_file_is_refused_as_svp_refuses_it(tmp_path, capsys, no_weights):
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    result = run_cli(["caption", "--data", str(coco), "--out", str(tmp_path / "o"), "--isvp"], capsys)
    assert_refused(result, "scene oracle grounds shapes-world images only")
    path = recipe_file(tmp_path, {"train_data": str(coco)})
    assert_refused(
        run_cli(["svp", "--config", path, "--out", str(tmp_path / "s")], capsys), "scene oracle grounds shapes-world images only"
    )
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("name", ["a.b", "a/b", "../x", "", "reference"])
def test_adapter_names_are_safe_identifiers(tmp_path, capsys, name):
    path = recipe_file(tmp_path, {"train_data": str(tmp_path / "rc.jsonl"), "sft": {"adapter": name}})
    assert_refused(run_cli(["sft", "--config", path, "--out", str(tmp_path / "run")], capsys), "sft.adapter")


def test_target_modules_is_a_valid_pattern_that_matches_the_model(tmp_path, capsys):
    from helpers import tiny_random_model

    from refloop.training.adapters import LoraSettings, NamedAdapters

    path = recipe_file(tmp_path, {"train_data": "in-domain", "sctune": {"lora": {"target_modules": "(q_proj"}}})
    assert_refused(run_cli(["sctune", "--config", path, "--out", str(tmp_path / "run")], capsys), "target_modules", "regular expression")
    model, _ = tiny_random_model()
    with pytest.raises(RefloopError, match=r"matches no Linear.*candidates: .*q_proj"):
        NamedAdapters(model, LoraSettings(target_modules="nothing_here"), ["sft"])


def test_pretraining_shapes_are_checked_before_training(tmp_path, capsys):
    path = recipe_file(tmp_path, {"hidden_size": 32, "num_heads": 3})
    result = run_cli(["pretrain-tiny", "--config", path, "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w")], capsys)
    assert_refused(result, "num_heads 3 must divide hidden_size 32")
    assert not (tmp_path / "w").exists()


def test_pretraining_takes_set_overrides_like_the_recipes(tmp_path, capsys):
    """`--set` reaches the pretraining recipe (checked before training) and a wrong field is refused."""
    args = ["pretrain-tiny", "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w")]
    assert_refused(run_cli([*args, "--set", "hidden_size=32", "--set", "num_heads=3"], capsys), "num_heads 3 must divide hidden_size 32")
    assert_refused(run_cli([*args, "--set", "no_such_field=1"], capsys), "no_such_field")
    assert not (tmp_path / "w").exists()
    # the checkpoint a stage continues from is an input: it may not be the output it would overwrite
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    refused = run_cli([*args, "--set", f"init_from={tmp_path / 'm'}", "--overwrite"], capsys)
    assert_refused(refused, "is one of the input files")
    assert (tmp_path / "m" / "config.json").read_text() == "{}"


def test_rc_data_reads_or_refuses_every_file_it_is_given(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert_refused(
        run_cli(["rc-data", "--data", "in-domain", "--out", str(tmp_path / "a"), "--expressions", str(bad)], capsys),
        "--expressions",
        "shapes-world domain",
    )
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    result = run_cli(["rc-data", "--data", str(coco), "--out", str(tmp_path / "b"), "--expressions", str(bad)], capsys)
    assert_refused(result, "bad.jsonl")


def test_sctune_supervised_ratio_without_supervised_data_is_refused(tmp_path, capsys, no_weights):
    path = recipe_file(tmp_path, {"train_data": "in-domain", "sctune": {"supervised_ratio": 0.5}})
    assert_refused(run_cli(["sctune", "--config", path, "--out", str(tmp_path / "run")], capsys), "supervised_data")


def test_sctune_missing_supervised_data_is_refused_before_weights_load(tiny, tmp_path, capsys, no_weights):
    fields = {"model": str(tiny), "train_data": "in-domain", "train_images": 4, "min_area_fraction": 0.0, "device": "cpu"}
    path = recipe_file(tmp_path, fields | {"supervised_data": str(tmp_path / "missing.jsonl")})
    assert_refused(run_cli(["sctune", "--config", path, "--out", str(tmp_path / "run")], capsys), "missing.jsonl")


def test_pope_without_questions_names_the_table_and_the_way_out_before_weights_load(tmp_path, capsys, no_weights):
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "0.png")
    coco = {
        "images": [{"id": 0, "file_name": "0.png", "width": 40, "height": 40}],
        "annotations": [{"id": 1, "image_id": 0, "category_id": 7, "bbox": [2, 2, 20, 20]}],
        "categories": [{"id": 7, "name": "widget"}],
    }
    (tmp_path / "d.json").write_text(json.dumps(coco))
    result = run_cli(["eval", "pope", "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "o")], capsys)
    assert_refused(result, "no POPE questions", "coco category table", "widget", "COCO's 80 categories")


# ---- item 8: a new user's path ------------------------------------------------------------------


def test_rc_data_records_the_checkpoint_frame_and_sft_refuses_another(tmp_path, capsys, no_weights):
    import families

    from refloop.models.processors import save_processor

    model, processor = families.qwen2_5_vl()
    qwen = tmp_path / "qwen"
    model.save_pretrained(qwen)
    save_processor(processor, qwen)
    code, _, err = run_cli(
        ["rc-data", "--data", "in-domain", "--num-images", "2", "--out", str(tmp_path / "rc"), "--model", str(qwen)], capsys
    )
    assert code == 0, err
    line = json.loads((tmp_path / "rc" / "rc.jsonl").read_text().splitlines()[0])
    assert line["profile"] == "qwen2.5-vl" and line["frame"] == "factor=28,min_pixels=3136,max_pixels=12544"
    code, _, err = run_cli(
        ["rc-data", "--data", "in-domain", "--num-images", "2", "--out", str(tmp_path / "rc2"), "--profile", "qwen2.5-vl"], capsys
    )
    assert code == 0, err  # the profile's default frame, not this checkpoint's
    base = {"model": str(qwen), "device": "cpu"}
    path = recipe_file(tmp_path, base | {"train_data": str(tmp_path / "rc2" / "rc.jsonl")})
    result = run_cli(["sft", "--config", path, "--out", str(tmp_path / "run")], capsys)
    assert_refused(result, "rc.jsonl, record line 1", "pixel frame", "max_pixels=1003520", "refloop rc-data --model")
    path = recipe_file(tmp_path, base | {"train_data": str(tmp_path / "rc" / "rc.jsonl"), "processor_options": {"max_pixels": 6272}})
    assert_refused(run_cli(["sft", "--config", path, "--out", str(tmp_path / "run")], capsys), "pixel frame", "max_pixels=6272")
    assert not (tmp_path / "run").exists()  # refused before the run directory was claimed


def test_sft_refuses_rc_data_of_another_family_before_weights_load(tiny, tmp_path, capsys, no_weights):
    code, _, err = run_cli(
        ["rc-data", "--data", "in-domain", "--num-images", "2", "--out", str(tmp_path / "rc"), "--profile", "qwen2-vl"], capsys
    )
    assert code == 0, err
    path = recipe_file(tmp_path, {"model": str(tiny), "train_data": str(tmp_path / "rc" / "rc.jsonl"), "device": "cpu"})
    assert_refused(run_cli(["sft", "--config", path, "--out", str(tmp_path / "run")], capsys), "'qwen2-vl', not 'refloop-tiny'")


def test_family_recipes_take_bf16_on_gpus_and_fp32_on_cpu():
    from importlib.resources import files

    import torch

    from refloop.models.hf import select_dtype

    recipes = [p for p in (files("refloop") / "recipes").iterdir() if p.name.startswith("sctune-") and "shapes" not in p.name]
    assert len(recipes) == 7
    for path in recipes:
        data = yaml.safe_load(path.read_text())
        assert data["device"] == "cuda" and data["dtype"] == "auto", path.name
    assert select_dtype("auto", torch.device("cpu")) == torch.float32


def test_consistency_report_on_parquet_reads_images_from_memory(tiny, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    rows = []
    for k in range(3):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (40 * k, 90, 200)).save(buffer, format="PNG")
        rows.append({"image": buffer.getvalue(), "file_name": f"img{k}.png", "answer": [f"thing {k}"], "bbox": [2.0, 3.0, 20.0, 10.0]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    args = ["consistency", "--data", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "out"), "--model", str(tiny), "--num-boxes", "3"]
    for _ in range(2):  # the rerun resumes and reports again
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
        assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "best.png").stat().st_size > 1000


def test_progress_totals_are_known_for_every_bar(tiny, tmp_path, capsys, monkeypatch):
    import contextlib

    import refloop.progress

    bars = []

    @contextlib.contextmanager
    def recording(description, total, enabled=True):
        if not enabled:  # progress_bar's contract: no bar, advance is None
            yield None
            return
        bar = {"description": description, "total": total, "done": 0}
        bars.append(bar)

        def advance(n=1, total=None, completed=None):  # progress_bar's advance: relative, or absolute (a trainer's step)
            bar["total"] = total if total is not None else bar["total"]
            bar["done"] = completed if completed is not None else bar["done"] + n

        yield advance

    monkeypatch.setattr(refloop.progress, "progress_bar", recording)
    from PIL import Image

    lines = []
    for i in range(2):
        Image.new("RGB", (60, 50), "white").save(tmp_path / f"{i}.png")
        sentences = ["the left thing", "a red one"]
        lines.append({"image_id": i, "file_name": f"{i}.png", "bbox": [5, 5, 20, 20], "sentences": sentences})
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    model = ["--model", str(tiny), "--device", "cpu"]
    for task, extra in (
        ("rec", ["--data", str(tmp_path / "refs.jsonl"), "--limit", "3"]),
        ("pope", ["--data", "in-domain", "--num-images", "2", "--per-image", "1"]),
    ):
        code, _, err = run_cli(["eval", task, *model, "--out", str(tmp_path / task), *extra], capsys)
        assert code == 0, err
    code, _, err = run_cli(
        ["rc-data", "--data", "in-domain", "--num-images", "2", "--out", str(tmp_path / "rc"), "--tasks", "counting"], capsys
    )
    assert code == 0, err
    sft = {"epochs": 1, "batch_size": 2, "lora": {"r": 2, "alpha": 4}, "checkpoint_every": 5}
    path = recipe_file(tmp_path, {"model": str(tiny), "train_data": str(tmp_path / "rc" / "rc.jsonl"), "device": "cpu", "sft": sft})
    code, _, err = run_cli(["sft", "--config", path, "--out", str(tmp_path / "sft")], capsys)
    assert code == 0, err
    assert [b["description"].split()[0] for b in bars] == ["rec", "pope", "sft"]
    assert [(b["total"], b["done"]) for b in bars[:2]] == [(3, 3), (4, 4)]  # eval reg: the same path as rec (METEOR is slow)
    assert bars[2]["total"] == bars[2]["done"] == json.loads((tmp_path / "sft" / "results.json").read_text())["steps"]


def test_cli_shows_no_weight_loading_bars(tiny, tmp_path, capsys):
    args = ["consistency", "--data", "in-domain", "--out", str(tmp_path / "o"), "--model", str(tiny), "--num-boxes", "2", "--no-report"]
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "Loading weights" not in err and "FutureWarning" not in err, err


def test_undefined_caption_metrics_are_null_with_the_reason():
    from refloop.evaluation.hallucination import chair_from_rows, recall_from_rows, undefined_metrics

    rows = [{"mentioned": [], "hallucinated": [], "gt_objects": [], "recalled": []}] * 2
    metrics = chair_from_rows(rows) | recall_from_rows(rows)
    assert (metrics["chair_i"], metrics["chair_s"], metrics["object_recall"]) == (None, 0.0, None)
    reasons = undefined_metrics(metrics, "coco")
    assert set(reasons) == {"chair_i", "object_recall"} and "coco category table" in reasons["object_recall"]


def test_eval_reg_with_only_empty_descriptions_reports_null_scores_and_counts_them(tiny, tmp_path):
    from helpers import scene_images

    from refloop.boxes import Box
    from refloop.data.records import ImageRecord, ObjectAnnotation
    from refloop.evaluation.referring import evaluate_reg
    from refloop.models import load_vlm

    _, images = scene_images(3)
    records = [
        ImageRecord(
            i, tmp_path / f"{i}.png", 112, 112, (ObjectAnnotation(Box(5, 5, 50, 50), "x", expressions=("a red circle",)),), image=img
        )
        for i, img in enumerate(images)
    ]
    vlm = load_vlm(str(tiny), device="cpu", dtype="fp32")
    vlm.describe = lambda imgs, boxes, options=None: [""] * len(boxes)
    metrics = evaluate_reg(vlm, records, tmp_path / "reg", java=False)
    assert metrics["empty_predictions"] == 3 and metrics["num"] == 3
    assert metrics["CIDEr"] is None and metrics["BLEU-4"] is None and "all 3 predictions are empty" in metrics["undefined"]


def test_bootstrap_with_no_pair_kept_does_not_point_at_an_empty_file(tiny, tmp_path, capsys):
    args = ["bootstrap", "--data", "in-domain", "--num-images", "2", "--out", str(tmp_path / "b"), "--model", str(tiny), "--no-report"]
    code, out, err = run_cli([*args, "--lambda", "1.0"], capsys)  # a random model never re-locates a box exactly
    assert code == 0, err
    assert "read the pairs back" not in out and "no pair was kept" in err
    # nothing left to describe after A.2's filters: the message names the filter, not rejected_by_reason
    args[args.index("--out") + 1] = str(tmp_path / "c")
    code, out, err = run_cli([*args, "--min-area-px", "1e9"], capsys)
    assert code == 0, err
    assert "no box was described" in err and "small_box" in err and "--min-area-px" in err and "rejected_by_reason" not in err


def test_svp_stops_when_the_grounding_was_empty_for_every_image(tiny, tmp_path, capsys):
    svp = {
        "samples": 2,
        "top_fraction": 0.5,
        "max_new_tokens": 4,
        "images_per_batch": 2,
        "sft": {"batch_size": 2, "lora": {"r": 2, "alpha": 4}, "checkpoint_every": 5},
    }
    fields = {"model": str(tiny), "train_data": "wild", "num_images": 2, "device": "cpu", "svp": svp}
    fields["grounder"] = {"miss_rate": 1.0, "false_positive_rate": 0.0}  # an oracle that finds nothing
    code, out, err = run_cli(["svp", "--config", recipe_file(tmp_path, fields), "--out", str(tmp_path / "run")], capsys)
    # every score is 0 by construction (the guided prompt is p's): nothing to select by, so nothing is trained
    assert code == 2 and "the grounder found nothing in any of the 2 images" in err and "no feedback" in err


def test_sctune_evaluation_metrics_name_their_data(tiny, tmp_path, capsys):
    sctune = {"phases": 1, "describer_steps": 1, "batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4, "lora": {"r": 2, "alpha": 4}}
    fields = {"model": str(tiny), "train_data": "in-domain", "train_images": 4, "min_area_fraction": 0.0, "device": "cpu"}
    fields |= {"eval_data": ["in-domain"], "eval_boxes": 2, "sctune": sctune}
    code, _, err = run_cli(["sctune", "--config", recipe_file(tmp_path, fields), "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "eval" / "base" / "in-domain" / "metrics.json").read_text())["data"] == "in-domain"


def test_config_takes_a_packaged_recipe_by_name_and_lists_the_names_when_neither(tmp_path):
    from refloop.config import load_recipe, packaged_recipes
    from refloop.methods.sctune_recipe import SCTuneRecipe

    by_name = load_recipe(SCTuneRecipe, "sctune-shapes", ["sctune.phases=1"])
    by_file = load_recipe(SCTuneRecipe, packaged_recipes()["sctune-shapes"], ["sctune.phases=1"])
    assert by_name == by_file == load_recipe(SCTuneRecipe, "sctune-shapes.yaml", ["sctune.phases=1"])
    (tmp_path / "sctune-shapes").write_text("train_data: crowded\ntrain_images: 7\n")  # a file of that name is the user's recipe
    assert load_recipe(SCTuneRecipe, tmp_path / "sctune-shapes").train_images == 7
    with pytest.raises(RefloopError, match="recipe not found: sctune-nope .*packaged recipe's name: .*sctune-shapes"):
        load_recipe(SCTuneRecipe, "sctune-nope")
    with pytest.raises(RefloopError, match="recipe not found: sub/sctune-shapes"):
        load_recipe(SCTuneRecipe, "sub/sctune-shapes")  # a path is a path, never a packaged name


def test_sctune_supervised_data_without_expressions_is_refused_and_unused_data_is_said(tiny, tmp_path, capsys, caplog, no_weights):
    """L_sup on a detection file (boxes, no expressions) would be off without a word: refused; data
    given at ratio 0 is said unused."""
    code, _, err = run_cli(["export-world", "--domain", "in-domain", "--num-images", "2", "--out", str(tmp_path / "w")], capsys)
    assert code == 0, err
    fields = {"model": str(tiny), "train_data": "in-domain", "train_images": 4, "min_area_fraction": 0.0, "device": "cpu"}
    detections = str(tmp_path / "w" / "instances.json")
    path = recipe_file(tmp_path, fields | {"supervised_data": detections, "sctune": {"supervised_ratio": 0.5}})
    assert_refused(run_cli(["sctune", "--config", path, "--out", str(tmp_path / "run")], capsys), "no referring expressions", "L_sup")
    from refloop.methods.sctune_recipe import SCTuneRecipe, _supervised_pairs

    unused = SCTuneRecipe.model_validate(fields | {"supervised_data": str(tmp_path / "w" / "refs.jsonl")})
    assert _supervised_pairs(unused) is None and "is unused: sctune.supervised_ratio is 0" in caplog.text


def test_options_that_would_be_ignored_are_refused_before_weights_load(tmp_path, capsys, no_weights):
    """Plain captioning grounds nothing and `eval rec` without --refs reads no split: options given
    for them would be ignored (and the caption ones would still enter the run's fingerprint)."""
    caption = ["caption", "--data", "wild", "--num-images", "2", "--out", str(tmp_path / "c")]
    assert_refused(run_cli([*caption, "--miss-rate", "0.3", "--phrases", "both"], capsys), "--miss-rate, --phrases", "add --isvp")
    assert_refused(run_cli([*caption, "--grounder", "vlm"], capsys), "--grounder applies to iSVP only")
    rec = ["eval", "rec", "--data", "in-domain", "--split", "testA", "--out", str(tmp_path / "r")]
    assert_refused(run_cli(rec, capsys), "--split", "without --refs")
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_version_and_short_help(capsys):
    import refloop

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"refloop {refloop.__version__}" and refloop.__version__[0].isdigit()
    code, out, _ = run_cli(["eval", "pope", "-h"], capsys)
    assert code == 0 and "--strategy" in out and "--captions" not in out  # each eval task lists only its own options


def test_help_shows_no_value_placeholder_after_a_flag(capsys, monkeypatch):
    """Typer prints `<bool>` after a flag (its own -h/--help included), as if it took a value."""
    import typer

    from refloop import cli

    monkeypatch.setenv("COLUMNS", "200")
    group = typer.main.get_group(cli.app)
    commands = [[name] for name in group.commands if name != "eval"] + [["eval", name] for name in group.commands["eval"].commands]
    assert len(commands) >= 16
    for args in [[], ["eval"], *commands]:
        code, out, _ = run_cli([*args, "--help"], capsys)
        assert code == 0 and "--help" in out and "<bool>" not in out, args


def test_threads_default_to_refloop_threads_and_a_bad_value_is_named(monkeypatch, capsys):
    from refloop import cli

    monkeypatch.setenv("REFLOOP_THREADS", "1")
    assert cli._model_spec(None, "cpu", "fp32", None, False).threads == 1
    assert cli._model_spec(None, "cpu", "fp32", None, False, threads=2).threads == 2  # --threads wins
    monkeypatch.setenv("REFLOOP_THREADS", "100000")  # set for a bigger machine: this one's cores
    assert cli._model_spec(None, "cpu", "fp32", None, False).threads == os.cpu_count()
    monkeypatch.setenv("REFLOOP_THREADS", "two")
    assert_refused(run_cli(["consistency", "--data", "in-domain", "--out", "o", "--num-boxes", "1"], capsys), "REFLOOP_THREADS")


def test_refloop_threads_reaches_every_command_through_torchs_own_setting():
    """The demo and recipes take no --threads option: torch is imported after the CLI starts, so
    REFLOOP_THREADS becomes OMP_NUM_THREADS unless that is set."""
    import subprocess
    import sys

    script = (
        "import sys\nsys.argv = ['refloop', '--version']\nfrom refloop import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "import os, torch\nprint(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"REFLOOP_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["1", "1"]


def test_svp_without_a_recipe_is_refused_rather_than_starting_a_full_run(tmp_path, capsys):
    """Every SVP field has a default, so `refloop svp --out X` started a 200-image run nobody named."""
    assert_refused(run_cli(["svp", "--out", str(tmp_path / "run")], capsys), "--config", "svp-shapes", "--set")
    assert not (tmp_path / "run").exists()


def test_caption_takes_a_profile_and_remote_code_as_the_other_inference_commands(tmp_path, capsys):
    args = ["caption", "--data", "in-domain", "--num-images", "2", "--out", str(tmp_path / "c"), "--profile", "refloop-tiny"]
    code, _, err = run_cli([*args, "--device", "cpu"], capsys)
    assert code == 0, err
    assert len((tmp_path / "c" / "captions.jsonl").read_text().splitlines()) == 2
