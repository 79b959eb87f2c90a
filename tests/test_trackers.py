"""Trackers: the trainer's metrics rows and the run's config reach TensorBoard (read back from the
event files), a resumed run logs every step once, and a tracker that is not installed is refused."""

import importlib.util
import json

import pytest
import torch
import yaml
from helpers import run_cli

from refloop.config import load_recipe
from refloop.errors import RefloopError
from refloop.methods.sft_recipe import SFTRecipe
from refloop.training.trackers import Tracking, flat_hparams
from refloop.training.trainer import Trainer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(directory) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _rows(work) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


class Stop(Exception):
    pass


def _trainer(total_steps: int = 4) -> Trainer:
    return Trainer(torch.nn.Linear(2, 2), config={"lr": 0.1}, total_steps=total_steps, checkpoint_every=2)


def test_tensorboard_gets_every_metrics_row_and_the_config(tmp_path):
    trainer = _trainer()
    trainer.track(Tracking("tensorboard", config={"model": "tiny", "sft": {"lr": 0.001, "lora": {"r": 4}}, "eval": [1, 2], "x": None}))
    trainer.run(tmp_path, lambda step: {"loss": 1.0 / (step + 1), "role": "describer", "tokens": 10 * step})
    rows = _rows(tmp_path)
    scalars = _scalars(tmp_path / "tensorboard")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "tokens", "step_seconds", "tokens_per_s", "peak_memory_mb", "elapsed_s"):
        assert scalars[key] == pytest.approx({r["step"]: r[key] for r in rows}, rel=1e-6), key
    assert "role" not in scalars and "step" not in scalars  # text stays in metrics.jsonl; the step is the x axis
    (hparams_file,) = (tmp_path / "tensorboard").glob("*/hparams.yml")
    assert yaml.safe_load(hparams_file.read_text()) == {"model": "tiny", "sft.lr": 0.001, "sft.lora.r": 4, "eval": "[1, 2]", "x": "null"}


def test_resumed_run_logs_each_step_once_at_its_own_step(tmp_path):
    """Killed after step 3 (checkpoint at 2): the resumed run logs 3..6 again; TensorBoard keeps
    the resumed values of step 3 (purge_step), as metrics.jsonl does."""

    def first(step):
        if step == 3:
            raise Stop
        return {"loss": float(step)}

    trainer = _trainer(6)
    trainer.track(Tracking("tensorboard", config={"lr": 0.1}))
    with pytest.raises(Stop):
        trainer.run(tmp_path, first)
    assert _scalars(tmp_path / "tensorboard")["loss"] == {1: 0.0, 2: 1.0, 3: 2.0}  # closed cleanly: all written
    resumed = _trainer(6)
    resumed.track(Tracking("tensorboard", config={"lr": 0.1}))
    resumed.run(tmp_path, lambda step: {"loss": 100.0 + step})
    assert _scalars(tmp_path / "tensorboard")["loss"] == {1: 0.0, 2: 1.0, 3: 102.0, 4: 103.0, 5: 104.0, 6: 105.0}
    assert [r["loss"] for r in _rows(tmp_path)] == [0.0, 1.0, 102.0, 103.0, 104.0, 105.0]


def test_no_tracker_writes_no_event_files(tmp_path):
    _trainer(2).run(tmp_path, lambda step: {"loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()


def test_flat_hparams_are_scalars_with_dotted_keys():
    assert flat_hparams({"a": {"b": {"c": True}}, "d": [], "e": {}, "f": 1.5}) == {"a.b.c": True, "d": "[]", "e": "{}", "f": 1.5}


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_a_tracker_that_is_not_installed_is_refused_clearly(name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    with pytest.raises(RefloopError, match=f"needs the '{name}' package.*pip install {name}"):
        Tracking(name)


def test_unknown_tracker_names_are_refused_by_the_recipe():
    with pytest.raises(RefloopError, match="report_to"):
        load_recipe(SFTRecipe, None, ["train_data=x.jsonl", "report_to=mlflow"])
    with pytest.raises(RefloopError, match="not a tracker refloop knows"):
        Tracking("comet")


def test_cli_report_to_refuses_a_missing_tracker_before_loading_a_model(tmp_path, capsys):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    data = tmp_path / "rc.jsonl"
    data.write_text("")
    code, _, err = run_cli(["sft", "--out", str(tmp_path / "run"), "--set", f"train_data={data}", "--report-to", "wandb"], capsys)
    assert code == 2 and "pip install wandb" in err
    code, _, err = run_cli(["sctune", "--out", str(tmp_path / "run2"), "--set", "train_data=in-domain", "--report-to", "mlflow"], capsys)
    assert code == 2 and "report_to" in err


def test_sft_recipe_reports_its_rows_and_recipe_to_tensorboard(tmp_path):
    from helpers import save_tiny_random

    from refloop.data.rc import build_rc_data, load_rc_annotations
    from refloop.methods.sft_recipe import run_sft

    rc = tmp_path / "rc.jsonl"
    records, relations, _ = load_rc_annotations("crowded", num_images=1)
    build_rc_data(records, rc, None, "refloop-tiny", 0, 1, relations)
    model = save_tiny_random(tmp_path / "model")
    sft = {"epochs": 1, "batch_size": 4, "lora": {"r": 4, "alpha": 8}, "checkpoint_every": 1, "generation_batch_size": 8}
    fields = {"model": str(model), "train_data": str(rc), "device": "cpu", "dtype": "fp32", "sft": sft}
    run_sft(SFTRecipe.model_validate(fields | {"report_to": "tensorboard"}), tmp_path / "run")
    rows = _rows(tmp_path / "run" / "train")
    scalars = _scalars(tmp_path / "run" / "train" / "tensorboard")
    assert scalars["loss"] == pytest.approx({r["step"]: r["loss"] for r in rows}, rel=1e-6)
    (hparams_file,) = (tmp_path / "run" / "train" / "tensorboard").glob("*/hparams.yml")
    hparams = yaml.safe_load(hparams_file.read_text())
    assert hparams["sft.lora.r"] == 4 and hparams["report_to"] == "tensorboard" and hparams["model"] == str(model)
    # The tracker does not change the run: the same recipe without it resumes the finished run.
    assert run_sft(SFTRecipe.model_validate(fields), tmp_path / "run")["steps"] == len(rows)
