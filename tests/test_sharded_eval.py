"""Sharded inference: `refloop consistency` and `refloop eval rec` under `accelerate launch` with two
CPU processes write one shard each, merged into outputs equal to a one-process run's."""

import json
import os
import subprocess
import sys

import pytest
from helpers import save_tiny_random

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
LAUNCH += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533", "-m", "refloop.cli"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    model = save_tiny_random(root / "model")
    env = os.environ | {"REFLOOP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "REFLOOP_CACHE": str(root / "cache")}
    return model, root, env


def jobs(model, out):
    common = ["--data", "in-domain", "--model", str(model), "--device", "cpu", "--batch-size", "4"]
    return {
        "consistency": (["consistency", *common, "--num-boxes", "12", "--no-report", "--out", str(out / "consistency")], "samples.jsonl"),
        "rec": (["eval", "rec", *common, "--limit", "14", "--out", str(out / "rec")], "rec_samples.jsonl"),
    }


@pytest.mark.parametrize("job", ["consistency", "rec"])
def test_two_processes_merge_into_the_one_process_output(setup, job):
    model, root, env = setup
    args, name = jobs(model, root / "one")[job]
    one = subprocess.run([sys.executable, "-m", "refloop.cli", *args], env=env, capture_output=True, timeout=600)
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    args, _ = jobs(model, root / "two")[job]
    two = subprocess.run([*LAUNCH, *args], env=env, capture_output=True, timeout=600)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    a, b = (root / run / job / name for run in ("one", "two"))
    assert a.read_bytes() == b.read_bytes()
    assert not (b.parent / (b.stem + ".shards")).exists()
    metrics = "metrics.json" if job == "consistency" else "rec_metrics.json"
    ma, mb = (json.loads((p.parent / metrics).read_text()) for p in (a, b))
    drop = {"boxes_per_second", "processes"}
    assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}
    if job == "consistency":
        assert mb["processes"] == 2
