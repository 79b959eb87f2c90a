import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import run_cli, save_tiny_random, scene_box_items, scene_images, tiny_random_model
from safetensors.torch import load_file

from refloop.methods.sctune import SCTune, SCTuneConfig, schedule
from refloop.models.hf import HFVLM
from refloop.models.profiles import TinyProfile
from refloop.training.adapters import LoraSettings, NamedAdapters

SMALL = dict(
    phases=3,
    describer_steps=2,
    locator_steps=2,
    batch_size=4,
    describer_lr=1e-3,
    locator_lr=1e-3,
    max_new_tokens=5,
    lora=LoraSettings(r=4, alpha=8),
    checkpoint_every=1,
    generation_batch_size=8,
)


def test_schedule_alternates_and_ablations_repeat_one_role():
    cfg = SCTuneConfig(phases=4, describer_steps=3, locator_steps=2)
    assert [(p.role, p.start, p.steps) for p in schedule(cfg)] == [
        ("describer", 0, 3),
        ("locator", 3, 2),
        ("describer", 5, 3),
        ("locator", 8, 2),
    ]
    ablation = schedule(cfg.model_copy(update={"tune": "locator"}))
    assert [(p.role, p.steps) for p in ablation] == [("locator", 3), ("locator", 2), ("locator", 3), ("locator", 2)]


def _tuner(tmp_path, **overrides):
    vlm = HFVLM.from_pretrained(save_tiny_random(tmp_path / "base"), device="cpu")
    return SCTune.from_base(vlm, SCTuneConfig(**(SMALL | overrides)), scene_box_items(4))


def test_micro_batches_accumulate_to_the_same_update(tmp_path):
    """micro_batch_size bounds activation memory; the update must not change (up to float sums)."""
    results, starts = [], []
    for micro in (None, 1, 3):
        tuner = _tuner(tmp_path / str(micro), phases=2, micro_batch_size=micro, minibatches=2)
        starts.append({r: [p.detach().clone() for p in tuner.adapters.parameters(r)] for r in ("describer", "locator")})
        torch.manual_seed(0)
        d = tuner.describer_step(tuner.batch(0))
        loc = tuner.locator_step(tuner.batch(1), step=1)
        results.append((d, loc, {r: [p.detach().clone() for p in tuner.adapters.parameters(r)] for r in ("describer", "locator")}))
    (d0, l0, p0), *others = results
    for role in p0:  # both updates move their adapter: a no-op update would pass the comparisons below
        assert any(not torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(p0[role], starts[0][role], strict=True)), role
    for d, loc, params in others:
        for key in ("loss", "approx_kl", "clipfrac", "grad_norm", "reward"):
            assert d[key] == pytest.approx(d0[key], rel=1e-4, abs=1e-6), key
        assert loc["loss"] == pytest.approx(l0["loss"], rel=1e-5)
        for role in params:
            for a, b in zip(params[role], p0[role], strict=True):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_old_logprobs_from_the_first_epoch_equal_a_separate_pass(tmp_path, kl_coef):
    """One minibatch: the first PPO epoch's forward, detached, is log pi_theta_old, so the no-grad
    pass is skipped; the update (over micro-batches, with or without the KL term) must not change.
    A first step (separate pass in both arms) moves the describer away from the reference, so
    log pi_old differs from log pi_ref, and the rows reach the micro-batches out of order."""
    results = []
    for separate in (True, False):
        tuner = _tuner(tmp_path / str(separate), phases=1, batch_size=8, ppo_epochs=2, micro_batch_size=3, kl_coef=kl_coef)
        # a random locator finds nothing: give the captions distinct rewards
        tuner.rollout = lambda *a, rollout=tuner.rollout, **k: (ro := rollout(*a, **k))._replace(
            reward=torch.linspace(0, 1, len(ro.token_ids))
        )
        tuner.old_logprobs_from_first_epoch = False
        torch.manual_seed(0)
        tuner.describer_step(tuner.batch(0))
        tuner.old_logprobs_from_first_epoch = not separate
        calls, updates = [], []

        def scored(*a, grad=False, scorer=tuner.describer.logprobs, calls=calls, **k):
            calls.append(grad)
            return scorer(*a, grad=grad, **k)

        def updated(name, loss_of, rows, update=tuner.trainer.update, updates=updates, **k):
            updates.append(list(rows))
            return update(name, loss_of, rows, **k)

        tuner.describer.logprobs, tuner.trainer.update = scored, updated
        torch.manual_seed(1)
        stats = tuner.describer_step(tuner.batch(1))
        results.append((stats, calls, [p.detach().clone() for p in tuner.adapters.parameters("describer")]))
    first_epoch = updates[0]
    assert any(first_epoch[i : i + 3] != sorted(first_epoch[i : i + 3]) for i in range(0, len(first_epoch), 3)), first_epoch
    (s_sep, calls_sep, p_sep), (s_one, calls_one, p_one) = results
    assert calls_sep.count(False) == 1 and calls_one.count(False) == 0  # the no-grad pass is gone
    assert calls_one.count(True) == calls_sep.count(True)
    keys = ("loss", "approx_kl", "clipfrac", "grad_norm", "reward", "advantage", *(["kl_to_reference"] if kl_coef else []))
    for key in keys:
        assert s_one[key] == pytest.approx(s_sep[key], rel=1e-4, abs=1e-6), key
    assert s_one["grad_norm"] > 0
    if kl_coef:
        assert abs(s_one["kl_to_reference"]) > 1e-6  # pi_old is not pi_ref: a fill from the reference would show
    for a, b in zip(p_one, p_sep, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_describer_step_changes_only_the_describer_and_sync_copies_it(tmp_path):
    tuner = _tuner(tmp_path, phases=1)
    before = {r: [p.detach().clone() for p in tuner.adapters.parameters(r)] for r in ("describer", "locator")}
    torch.manual_seed(0)
    tuner.describer_step(tuner.batch(0))
    changed = {r: any(not torch.equal(a, b) for a, b in zip(before[r], tuner.adapters.parameters(r))) for r in before}
    assert changed == {"describer": True, "locator": False}
    tuner.adapters.copy("describer", "locator")
    for a, b in zip(tuner.adapters.parameters("describer"), tuner.adapters.parameters("locator")):
        assert torch.equal(a, b)


def test_reference_policy_is_the_base_model(tmp_path):
    tuner = _tuner(tmp_path, phases=1)
    for p in tuner.adapters.parameters("describer"):
        torch.nn.init.normal_(p, std=0.3)
    _, images = scene_images(1)
    prompt = tuner.vlm.profile.caption_prompt()
    inputs = tuner.vlm._inputs(images, [prompt])
    base, _ = tiny_random_model()
    with torch.no_grad(), tuner.adapters.reference():
        ref = tuner.vlm.model(**inputs).logits
    tuner.adapters.use("describer", trainable=False)
    with torch.no_grad():
        tuned = tuner.vlm.model(**inputs).logits
        assert torch.allclose(ref, base(**inputs).logits, atol=1e-5)
    assert not torch.allclose(ref, tuned)


def test_roles_share_one_base_model():
    model, _ = tiny_random_model(hidden=64)
    base_params = sum(p.numel() for p in model.parameters())
    roles = NamedAdapters(model, LoraSettings(r=4, alpha=8), ("describer", "locator"))
    adapters = sum(p.numel() for r in ("describer", "locator") for p in roles.parameters(r))
    total = sum(p.numel() for p in roles.module.parameters())
    assert total == base_params + adapters and adapters < 0.2 * base_params


def write_recipe(tmp_path) -> tuple:
    model_dir = save_tiny_random(tmp_path / "base")
    recipe = {
        "model": str(model_dir),
        "train_data": "in-domain",
        "train_images": 12,
        "min_area_fraction": 0.0,
        "device": "cpu",
        "dtype": "fp32",
        "threads": 1,
        "sctune": SMALL | {"lora": {"r": 4, "alpha": 8}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def sctune_args(recipe, out) -> list[str]:
    return ["sctune", "--config", str(recipe), "--out", str(out), "--skip-base-eval"]


def test_sigkilled_run_resumes_to_the_same_adapters_and_metrics(tmp_path):
    """A real kill of the command; the uninterrupted baseline and the resume run in this process
    (the recipe's one thread, as the killed run's)."""
    recipe = write_recipe(tmp_path)
    env = os.environ | {"REFLOOP_NO_PROGRESS": "1"}
    assert run_cli(sctune_args(recipe, tmp_path / "straight"))[0] == 0
    command = [sys.executable, "-m", "refloop.cli", *sctune_args(recipe, tmp_path / "killed")]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "train" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) < 6, "the run finished before it was killed"
    assert run_cli(sctune_args(recipe, tmp_path / "killed"))[0] == 0  # resumed in this process
    a = load_file(tmp_path / "straight" / "train" / "checkpoint" / "weights.safetensors")
    b = load_file(tmp_path / "killed" / "train" / "checkpoint" / "weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def rows(run):
        return [
            {k: v for k, v in r.items() if k not in ("elapsed_s", "captions_per_second", "step_seconds", "tokens_per_s", "peak_memory_mb")}
            for r in map(json.loads, (tmp_path / run / "train" / "metrics.jsonl").read_text().splitlines())
        ]

    assert rows("straight") == rows("killed")
    assert (tmp_path / "killed" / "merged" / "config.json").exists()
    assert (tmp_path / "killed" / "adapters" / "describer" / "adapter_model.safetensors").exists()


def test_resume_with_another_config_is_refused(tmp_path):
    tuner = _tuner(tmp_path, phases=1, describer_steps=1)
    tuner.run(tmp_path / "run")
    other = _tuner(tmp_path, phases=1, describer_steps=1, kl_coef=0.5)
    from refloop.errors import RefloopError

    with pytest.raises(RefloopError, match="another config"):
        other.run(tmp_path / "run")


@pytest.mark.distributed
def test_two_processes_stay_in_sync(tmp_path):
    """accelerate launch, two CPU processes (gloo): each rank tunes its half of every batch; the
    averaged gradients keep their adapters identical."""
    from pathlib import Path

    worker = Path(__file__).parent / "dist_sctune_worker.py"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        str(worker),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(k.startswith("describer/") and "lora_B" in k and a[k].abs().sum() > 0 for k in a), "no update happened"
    rows = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4


def test_eval_sets_with_one_file_name_get_folders_of_their_own(tmp_path):
    """RefCOCO, RefCOCO+ and RefCOCOg exports are all refs.jsonl: each eval set writes its own
    folder (a domain keeps its name), so the second is not refused as another run of the first."""
    from refloop.config import DataSpec
    from refloop.methods.sctune_recipe import SCTuneRecipe, eval_folders, evaluate

    specs = [DataSpec.of(v) for v in ("a/refs.jsonl", "b/refs.jsonl", "wild")]
    assert eval_folders(specs) == ["a-refs", "b-refs", "wild"]
    assert eval_folders([DataSpec.of("p/x/refs.jsonl"), DataSpec.of("q/x/refs.jsonl")]) == ["x-refs-0", "x-refs-1"]
    files = []
    for domain in ("in-domain", "crowded"):
        out = tmp_path / domain
        assert run_cli(["export-world", "--domain", domain, "--seed", "7", "--num-images", "3", "--out", str(out)])[0] == 0
        files.append(str(out / "refs.jsonl"))
    model_dir = save_tiny_random(tmp_path / "base")
    recipe = SCTuneRecipe(model=str(model_dir), train_data="in-domain", eval_data=files, eval_boxes=2, device="cpu", dtype="fp32")
    vlm = HFVLM(*tiny_random_model(), TinyProfile(), batch_size=4)
    results = evaluate(vlm, recipe, tmp_path / "eval", "base")
    assert set(results) == set(files)
    assert sorted(p.name for p in (tmp_path / "eval" / "base").iterdir()) == ["crowded-refs", "in-domain-refs"]


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_the_locator_step_logs_what_it_learned_from(tmp_path, ratio):
    """Beside loss and grad norm: its partner's captions (words, distinct share) and L_sup's share."""
    from dataclasses import replace

    items = scene_box_items(4)
    pairs = [replace(it, expression="the red circle") for it in items[:3]]
    vlm = HFVLM.from_pretrained(save_tiny_random(tmp_path / "base"), device="cpu")
    tuner = SCTune.from_base(vlm, SCTuneConfig(**(SMALL | {"supervised_ratio": ratio})), items, supervised=pairs)
    row = tuner.locator_step(tuner.batch(1), step=1)
    assert {"loss", "grad_norm", "caption_words", "distinct_captions", "supervised_share"} <= set(row)
    assert row["supervised_share"] == ratio
    assert 0 < row["distinct_captions"] <= 1 and row["caption_words"] >= 0
