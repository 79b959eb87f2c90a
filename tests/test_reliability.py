"""The failure policy at the command line: bad input ends with exit 2 and one message naming the
problem (no traceback), and no rerun or concurrent run silently mixes outputs."""

import json

import pytest
from helpers import assert_refused, save_tiny_random
from helpers import run_cli as run

from refloop.runs import run_directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_random(root / "a", seed=0), save_tiny_random(root / "b", seed=1)


def consistency_args(out, model, *extra) -> list[str]:
    return ["consistency", "--data", "in-domain", "--out", str(out), "--model", str(model), "--num-boxes", "3", "--no-report", *extra]


def test_rerun_with_another_model_refuses_the_old_samples_and_overwrite_replaces_them(tmp_path, models, capsys):
    a, b = models
    assert run(consistency_args(tmp_path / "out", a), capsys)[0] == 0
    assert_refused(run(consistency_args(tmp_path / "out", b), capsys), "holds outputs of another run", "--overwrite")
    code, out, _ = run(consistency_args(tmp_path / "out", b, "--overwrite"), capsys)
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["model"] == str(b) and metrics["num_boxes"] == 3
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == 3
    assert run(consistency_args(tmp_path / "out", b), capsys)[0] == 0  # the same run resumes


def test_a_second_run_into_a_directory_being_written_is_refused(tmp_path, models, capsys):
    with run_directory(tmp_path / "out"):
        assert_refused(run(consistency_args(tmp_path / "out", models[0]), capsys), "being written by another refloop run")
    assert run(consistency_args(tmp_path / "out", models[0]), capsys)[0] == 0


def test_damaged_line_in_a_resumable_file_is_named(tmp_path, models, capsys):
    assert run(consistency_args(tmp_path / "out", models[0]), capsys)[0] == 0
    path = tmp_path / "out" / "samples.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    assert_refused(run(consistency_args(tmp_path / "out", models[0]), capsys), "samples.jsonl, record line 2", "damaged record")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--device", "cuda"], ["no CUDA device"]),
        (["--device", "tpu"], ["--device"]),
        (["--dtype", "int3"], ["--dtype"]),
        (["--profile", "qwen2-vl"], ["does not fit", "tokenizer"]),
        (["--profile", "no-such-profile"], ["unknown prompt profile"]),
    ],
)
def test_model_options_are_checked_before_any_weights_load(tmp_path, models, capsys, args, fragments):
    assert_refused(run(consistency_args(tmp_path / "out", models[0], *args), capsys), *fragments)


def test_missing_local_model_path_fails_at_once(tmp_path, capsys, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert_refused(run(consistency_args(tmp_path / "out", "models/none"), capsys), "does not exist")
    assert_refused(run(consistency_args(tmp_path / "out", "./none"), capsys), "does not exist")


def test_corrupt_or_missing_weights_are_a_clear_error(tmp_path, models, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models[0], broken)
    (broken / "model.safetensors").write_bytes(b"\x00\x01 not safetensors")
    assert_refused(run(consistency_args(tmp_path / "out", broken), capsys), "cannot load the weights", str(broken))
    (broken / "model.safetensors").unlink()
    assert_refused(run(consistency_args(tmp_path / "out2", broken), capsys), "cannot load the weights", str(broken))


def test_output_that_is_a_file_is_refused(tmp_path, models, capsys):
    (tmp_path / "taken").write_text("x")
    assert_refused(run(consistency_args(tmp_path / "taken", models[0]), capsys), "not a directory")


def test_absurd_number_of_scenes_is_refused_before_rendering(tmp_path, models, capsys):
    args = consistency_args(tmp_path / "out", models[0])
    args[args.index("--num-boxes") + 1] = "1000000000"
    assert_refused(run(args, capsys), "1 to 200000 scenes")


def test_error_text_is_not_read_as_markup(tmp_path, models, capsys):
    data = tmp_path / "odd [bold]name.jsonl"
    data.write_text("{not json\n")
    code, _, err = run(["consistency", "--data", str(data), "--out", str(tmp_path / "o"), "--model", str(models[0])], capsys)
    assert code == 2 and "odd [bold]name.jsonl" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "recipe, overrides, fragments",
    [
        ("train_data: in-domain\n", ["sctune.describer_steps=-2"], ["describer_steps", "greater than or equal to 1"]),
        ("train_data: in-domain\n", ["sctune.kl_coef=.nan"], ["kl_coef"]),
        ("train_data: in-domain\n", ["sctune.lora.r=0"], ["lora.r"]),
        ("train_data: in-domain\n", ["sctune.top_p=1.5"], ["top_p"]),
        # a typo in --set is blamed on --set (not the file) with the nearest field; one line, no pydantic dump
        ("train_data: in-domain\n", ["sctune.phasez=2"], ["--set sctune.phasez: unknown field (did you mean phases?)"]),
        ("train_data: in-domain\nsctune: {phasez: 2}\n", [], ["recipe.yaml: sctune.phasez: unknown field (did you mean phases?)"]),
        ("sctune: {phases: 2}\n", [], ["train_data: required, not given"]),
        # a --set shorter than the error's path, and a path below the key given
        ("train_data: in-domain\n", ["sctune.lorra.r=2"], ["--set sctune.lorra: unknown field (did you mean lora?)"]),
        ("train_data: in-domain\n", ["eval_data=[{data: in-domain, imagez: x}]"], ["--set eval_data", "did you mean images?"]),
        ("train_data: in-domain\n", ["train_data.x=1"], ["train_data", "not a mapping"]),
        ("train_data: [in-domain\n", [], ["not valid YAML"]),
        ("!!python/object/apply:os.system ['true']\n", [], ["not valid YAML"]),
        ("- a\n", [], ["expected a mapping"]),
    ],
)
def test_bad_recipes_fail_before_anything_runs(tmp_path, capsys, recipe, overrides, fragments):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    args = ["sctune", "--config", str(path), "--out", str(tmp_path / "run")]
    for item in overrides:
        args += ["--set", item]
    assert_refused(run(args, capsys), *fragments)
    assert not (tmp_path / "run").exists()


def test_sctune_rerun_with_another_recipe_is_refused(tmp_path, models, capsys):
    import yaml
    from test_sctune import SMALL

    recipe = {
        "model": str(models[0]),
        "train_data": "in-domain",
        "train_images": 6,
        "min_area_fraction": 0.0,
        "device": "cpu",
        "dtype": "fp32",
        "threads": 1,
        "sctune": SMALL | {"phases": 1, "describer_steps": 1, "lora": {"r": 4, "alpha": 8}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    base = ["sctune", "--config", str(path), "--out", str(tmp_path / "run"), "--skip-base-eval"]
    assert run(base, capsys)[0] == 0
    assert_refused(run([*base, "--set", "sctune.kl_coef=0.5"], capsys), "holds outputs of another run", "kl_coef")
    assert run([*base, "--set", "sctune.kl_coef=0.5", "--overwrite"], capsys)[0] == 0


def test_filter_refuses_to_overwrite_its_input(tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert_refused(run(["filter", str(data), "--out", str(data)], capsys), "is one of the input files")
    assert json.loads(data.read_text()) == {"images": [], "annotations": [], "categories": []}


def test_undecodable_image_is_skipped_and_counted_in_eval(tmp_path, models, capsys):
    from PIL import Image

    rows = []
    for i in range(3):
        Image.new("RGB", (40, 40), "white").save(tmp_path / f"{i}.png")
        rows.append({"image_id": i, "file_name": f"{i}.png", "bbox": [5, 5, 20, 20], "sentences": ["the thing"], "width": 40, "height": 40})
    raw = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(raw[: len(raw) // 2])  # the header is intact, the pixels are not
    data = tmp_path / "refs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "rec", "--data", str(data), "--model", str(models[0])]
    assert_refused(run([*args, "--out", str(tmp_path / "fail")], capsys), "1.png")
    code, out, err = run([*args, "--out", str(tmp_path / "skip"), "--on-error", "skip"], capsys)
    assert code == 0, err
    metrics = json.loads(out[out.index("{") :])
    assert metrics["num"] == 2 and metrics["skipped_images"] == 1
    assert "1 items skipped under --on-error skip" in err and "1.png" in err  # the file is named, not only counted


def test_models_changed_in_memory_never_share_a_fingerprint():
    """An evaluation directory of one tuned model is never resumed by another with the same name."""
    import torch

    from refloop.runs import model_fingerprint

    class Adapters:
        def __init__(self, value):
            self.tensors = {"sft/lora_A": torch.full((2, 2), value)}

        def state_dict(self):
            return self.tensors

    class View:
        name, profile, adapter = "refloop-tiny", None, "sft"

        def __init__(self, value):
            self.adapters = Adapters(value)

    assert model_fingerprint(View(0.0)) == model_fingerprint(View(0.0))
    assert model_fingerprint(View(0.0)) != model_fingerprint(View(1.0))

    class Merged:
        name, profile = "refloop-tiny", None

    tuned = Merged()
    tuned.lineage = [{"svp_iteration": 1, "adapter": "abc"}]
    assert model_fingerprint(tuned) != model_fingerprint(Merged())


@pytest.mark.parametrize("raised, flagged", [(SystemExit(130), False), (KeyboardInterrupt(), False), (SystemExit(1), True)])
def test_ctrl_c_says_how_to_resume_and_exits_130(monkeypatch, capsys, raised, flagged):
    """Typer turns Ctrl-C inside a command into SystemExit(130), click (older typers) into an Abort
    that exits 1 (refloop's SIGINT handler flagged it); one outside the command is a KeyboardInterrupt."""
    from refloop import cli

    def interrupted():
        raise raised

    monkeypatch.setattr(cli, "app", interrupted)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # leave pytest's process its own handler
    monkeypatch.setattr(cli, "_interrupted", [cli.signal.SIGINT] if flagged else [])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 130
    assert "interrupted; rerun the same command" in capsys.readouterr().err


def test_a_resumed_run_s_progress_bar_starts_at_its_step(monkeypatch, capsys):
    from refloop.progress import progress_bar

    monkeypatch.delenv("REFLOOP_NO_PROGRESS", raising=False)
    with progress_bar("sc-tune", 80) as advance:
        for step in range(61, 64):  # the trainer's absolute steps after a resume at step 60
            advance(completed=step)
    assert "63/80" in capsys.readouterr().out


def test_an_adapter_folder_given_as_model_points_at_merged(tmp_path, capsys):
    adapter = tmp_path / "adapters" / "sft"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    args = ["consistency", "--data", "in-domain", "--num-boxes", "2", "--model", str(adapter), "--out", str(tmp_path / "o")]
    assert_refused(run(args, capsys), "holds a LoRA adapter, not a model", "merged/")


def test_a_union_field_s_failed_branches_are_one_line_named_as_the_recipe_spells_it():
    from refloop.config import load_recipe
    from refloop.errors import RefloopError
    from refloop.methods.svp_recipe import SVPRecipe

    with pytest.raises(RefloopError) as exc:
        load_recipe(SVPRecipe, None, ["svp.length_normalize=2"])
    message = str(exc.value)
    assert message.count("--set svp.length_normalize:") == 1 and " or " in message
    assert "constrained-float" not in message and "bool:" not in message


def test_sctune_warns_when_a_small_model_keeps_the_paper_s_7b_learning_rates(caplog):
    from types import SimpleNamespace

    import torch

    from refloop.methods.sctune import SCTuneConfig
    from refloop.methods.sctune_recipe import _warn_paper_rates_on_a_small_model

    small = SimpleNamespace(model=torch.nn.Linear(10, 10))
    with caplog.at_level("WARNING", logger="refloop"):
        _warn_paper_rates_on_a_small_model(SCTuneConfig(), small)
        _warn_paper_rates_on_a_small_model(SCTuneConfig(describer_lr=3e-4, locator_lr=2e-4), small)
    assert len(caplog.records) == 1 and "sctune.describer_lr and sctune.locator_lr" in caplog.text


def _offline_cli(tmp_path, *args):
    """`refloop ARGS` in a child whose hub host cannot resolve (the reserved .invalid domain),
    with a hub cache of its own and no proxy."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith(("HF_", "TRANSFORMERS_"))}
    env |= {"HF_ENDPOINT": "https://refloop-test.invalid", "HF_HUB_CACHE": str(tmp_path / "hub"), "REFLOOP_NO_PROGRESS": "1"}
    script = "import sys; from refloop.cli import main; sys.argv = ['refloop', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)


def test_a_hub_id_without_network_reads_the_cache_at_once(tmp_path, models):
    """huggingface_hub retries an unresolvable host five times (~25 s) before using its cache or
    failing; refloop switches it to offline mode when the host does not resolve."""
    import shutil

    snapshot = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(models[0], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    cached = _offline_cli(tmp_path, "inspect", "--model", "someorg/tiny")
    assert cached.returncode == 0, cached.stderr
    assert "does not resolve" in cached.stderr and "refloop-tiny" in cached.stdout
    ran = _offline_cli(tmp_path, *consistency_args(tmp_path / "out", "someorg/tiny"))  # weights and processor from the cache
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "out" / "metrics.json").exists()
    missing = _offline_cli(tmp_path, "inspect", "--model", "someorg/absent")
    assert missing.returncode == 2
    assert "does not resolve" in missing.stderr  # offline mode: no retries with back-off
    assert "offline" in missing.stderr and "hf download someorg/absent" in missing.stderr


def test_nothing_left_after_skipping_says_what_was_skipped(tmp_path, capsys):
    """Every record skipped under --on-error skip (here: missing images) ended with "no referring
    expressions to evaluate (`eval rec` reads a referring .jsonl ...)" for a referring .jsonl."""
    lines = [{"image_id": k, "file_name": f"gone{k}.png", "bbox": [1, 1, 5, 5], "sentences": ["a dog"]} for k in (1, 2)]
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for command in (["eval", "rec"], ["consistency"]):
        args = [*command, "--data", str(tmp_path / "refs.jsonl"), "--on-error", "skip", "--out", str(tmp_path / command[-1])]
        assert_refused(run(args, capsys), "2 records were skipped", "image file not found: 2")


def test_asking_whether_this_is_the_main_process_creates_no_process_state():
    """A bare PartialState() made before a recipe sets up its CPU state became the singleton, and
    under a CPU launch every rank then ran the whole job as the main process (a review's finding:
    the offline note and the profile warning asked early)."""
    import os
    import subprocess
    import sys

    script = (
        "from accelerate.state import PartialState\n"
        "from refloop.parallel import is_main_process\n"
        "print(is_main_process(), bool(PartialState._shared_state))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE")} | {"RANK": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
