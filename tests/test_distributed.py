"""Two CPU processes under `accelerate launch` (gloo) equal one process, for every sharded command:
consistency, eval rec / reg / caption / pope, caption (plain and iSVP), bootstrap and SVP's inner
loop. One launch runs them all (dist_sharded_worker.py); the one-process references run here."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from dist_sharded_worker import jobs, without_java
from helpers import run_cli, save_tiny_random
from safetensors.torch import load_file

from refloop.data.sources import world_split_dir
from refloop.world.export import REFS_FILE

pytestmark = pytest.mark.distributed

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
LAUNCH += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541"]
SVP = {
    "train_data": "wild",
    "num_images": 4,
    "device": "cpu",
    "dtype": "fp32",
    "svp": {
        "samples": 3,
        "top_fraction": 0.34,
        "max_new_tokens": 8,
        "images_per_batch": 2,
        "iterations": 1,
        "phrases": "both",  # a random model's captions name no shape: the categories give every sample a grounding
        "sft": {"epochs": 1, "batch_size": 2, "lr": 1e-3, "lora": {"r": 4, "alpha": 8}, "checkpoint_every": 1, "generation_batch_size": 8},
    },
}
VOLATILE = {"boxes_per_second", "processes", "wall_seconds", "train_seconds"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(root, jobs): every job run by this process (root/one), then by two launched ones (root/two)."""
    root = tmp_path_factory.mktemp("distributed")
    model = str(save_tiny_random(root / "model"))
    recipe = root / "svp.yaml"
    recipe.write_text(yaml.safe_dump(SVP | {"model": model}))
    cache = str(root / "cache")
    env = os.environ | {"REFLOOP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "REFLOOP_CACHE": cache}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("REFLOOP_CACHE", cache)  # the same scenes (and image paths) as the launch
            patch.setattr(shutil, "which", without_java(shutil.which))
            refs = str(world_split_dir("in-domain", 6) / REFS_FILE)
            for name, (args, _, _) in jobs(model, root / "one", str(recipe), refs).items():
                code, _, _ = run_cli(args)
                assert code == 0, name
    finally:
        torch.set_num_threads(threads)
    worker = str(Path(__file__).with_name("dist_sharded_worker.py"))
    launched = subprocess.run([*LAUNCH, worker, str(root), model, str(recipe), refs], env=env, capture_output=True, timeout=1200)
    assert launched.returncode == 0, launched.stderr.decode()[-4000:]
    return root, jobs(model, Path("."), str(recipe), refs)


@pytest.mark.parametrize("job", list(jobs("m", Path("."), "r", "refs")))
def test_two_processes_write_what_one_process_writes(runs, job):
    root, table = runs
    args, same_bytes, same_json = table[job]
    where = Path(args[args.index("--out") + 1]).name
    one, two = root / "one" / where, root / "two" / where
    assert (one / same_bytes[0]).stat().st_size > 0, same_bytes[0]
    for name in same_bytes:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    for name in same_json:
        a, b = (json.loads((d / name).read_text()) for d in (one, two))
        assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}, name
    assert not list(two.glob("**/*.shards")), "shards are merged away"
    if job in ("consistency", "bootstrap"):
        assert json.loads((two / same_json[0]).read_text())["processes"] == 2
    if job == "svp":  # the SFT averages gradients over the same global batch: the same weights up to summation order
        a, b = (load_file(d / "merged" / "model.safetensors") for d in (one, two))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_end_process_group_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    """The CLI ends the process group after a successful command: left to the interpreter's exit,
    gloo's threads can abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    from refloop.parallel import end_process_group

    end_process_group()  # nothing set up: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        end_process_group()
        assert not dist.is_initialized()
        end_process_group()  # twice: still nothing to do
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_data_error_under_launch_is_one_line_per_process(tmp_path):
    """The main process stops on a missing image; the other one, waiting in a barrier, got gloo's
    "Connection closed by peer" traceback: one line now."""
    from PIL import Image

    images = [{"id": i, "file_name": f"{i}.png", "width": 48, "height": 48} for i in range(2)]
    Image.new("RGB", (48, 48)).save(tmp_path / "0.png")  # 1.png is missing
    anns = [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [4, 4, 20, 20]}]
    data = tmp_path / "bad.json"
    data.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "dog"}]}))
    env = os.environ | {"REFLOOP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    launch = [*LAUNCH[:-1], "29547", "-m", "refloop.cli", "eval", "rec", "--data", str(data), "--out", str(tmp_path / "o")]
    done = subprocess.run(launch, env=env, capture_output=True, timeout=300, text=True)
    assert done.returncode != 0
    assert "error: " in done.stderr and "image file not found" in done.stderr
    assert "[rank1]: Traceback" not in done.stderr
