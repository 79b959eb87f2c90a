"""Hub conventions of exports: adapters in PEFT's format with a model card load with
`PeftModel.from_pretrained`, merged checkpoints with `AutoModelForImageTextToText.from_pretrained`,
for refloop-tiny and a tiny real family; the recipes write the cards."""

import pytest
import torch
import yaml
from helpers import tiny_random_model

import refloop.models  # noqa: F401 (registers refloop-tiny with the Auto classes)
from refloop.training.adapters import LoraSettings, NamedAdapters
from refloop.training.model_card import model_card, write_model_cards


def _qwen2_vl():
    from families import qwen2_vl

    return qwen2_vl()


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("build", [tiny_random_model, _qwen2_vl], ids=["refloop-tiny", "qwen2-vl"])
def test_exported_adapter_loads_with_peft_and_merged_checkpoint_with_auto_class(tmp_path, build):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model, _ = build()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    adapters = NamedAdapters(model, LoraSettings(r=2, alpha=4), ("sft",))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapters.parameters("sft"):
            p.normal_(0, 0.2)  # a trained adapter: B is no longer zero
    run = tmp_path / "run"
    adapters.save_pretrained(run / "adapters")
    adapters.merged_copy("sft").save_pretrained(run / "merged")
    cards = write_model_cards(run, str(base_dir), "sft", {"sft": {"lr": 0.001}}, {"final_loss": 0.25})
    assert cards == [run / "adapters" / "sft" / "README.md", run / "merged" / "README.md"]

    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), run / "adapters" / "sft")
    merged = AutoModelForImageTextToText.from_pretrained(run / "merged")
    unmerged = loaded.merge_and_unload().state_dict()
    base = AutoModelForImageTextToText.from_pretrained(base_dir).state_dict()
    merged_state = merged.state_dict()
    assert unmerged.keys() == merged_state.keys()
    for key, value in merged_state.items():
        torch.testing.assert_close(unmerged[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(base[k], merged_state[k]) for k in base), "the adapter changed no weight"

    adapter_card = (run / "adapters" / "sft" / "README.md").read_text()
    meta = _front_matter(adapter_card)
    assert meta["library_name"] == "peft" and {"refloop", "sft", "lora"} <= set(meta["tags"])
    assert str(base_dir) in adapter_card and "PeftModel.from_pretrained" in adapter_card
    assert "final_loss | 0.25" in adapter_card and "lr: 0.001" in adapter_card
    merged_card = (run / "merged" / "README.md").read_text()
    assert _front_matter(merged_card)["library_name"] == "transformers" and "AutoModelForImageTextToText" in merged_card


def test_hub_base_models_go_in_the_metadata_local_ones_only_in_the_text(tmp_path):
    assert _front_matter(model_card("Qwen/Qwen2-VL-7B-Instruct", "sctune", {}, None, "describer"))["base_model"] == (
        "Qwen/Qwen2-VL-7B-Instruct"
    )
    card = model_card(str(tmp_path), "svp", {"svp": {"iterations": 1}})
    assert "base_model" not in _front_matter(card) and str(tmp_path) in card and "No evaluation was recorded" in card


def test_sft_recipe_export_carries_model_cards(tmp_path):
    from helpers import save_tiny_random

    from refloop.data.rc import build_rc_data, load_rc_annotations
    from refloop.methods.sft_recipe import SFTRecipe, run_sft

    rc = tmp_path / "rc.jsonl"
    records, relations, _ = load_rc_annotations("crowded", num_images=1)
    build_rc_data(records, rc, ["visual-grounding"], "refloop-tiny", 0, 1, relations)
    model = save_tiny_random(tmp_path / "model")
    sft = {"epochs": 1, "batch_size": 4, "lora": {"r": 4, "alpha": 8}, "checkpoint_every": 1, "generation_batch_size": 8}
    results = run_sft(
        SFTRecipe.model_validate({"model": str(model), "train_data": str(rc), "device": "cpu", "dtype": "fp32", "sft": sft}),
        tmp_path / "run",
    )
    for folder in ("adapters/sft", "merged"):
        card = (tmp_path / "run" / folder / "README.md").read_text()
        assert str(model) in card and "`sft`" in card and f"final_loss | {results['final_loss']}" in card
    # the merged checkpoint's card says what was folded into it
    assert (
        "# sft merged checkpoint (the `sft` adapter folded into the base weights)"
        in (tmp_path / "run" / "merged" / "README.md").read_text()
    )


def test_a_refloop_tiny_export_loads_as_its_card_says_in_a_fresh_interpreter(tmp_path):
    """refloop-tiny is no transformers architecture: its card says to import refloop.models first
    (which registers it); the README and the card said "with transformers alone", which failed in a
    fresh interpreter unless refloop.models.tiny had been imported (a first-contact helper's finding)."""
    import subprocess
    import sys

    card = model_card("refloop-tiny", "sft", {}, None, "sft")
    assert "import refloop.models" in card and "default_model_path()" in card and '"refloop-tiny"' not in card
    assert "After `import refloop.models`" in model_card("refloop-tiny", "svp", {})
    from refloop.models import default_model_path

    local = model_card(str(default_model_path()), "sft", {}, None, "sft")  # a refloop-tiny folder, e.g. a run's merged/
    assert "import refloop.models" in local and "After `import refloop.models`" in model_card(str(default_model_path()), "svp", {})
    snippet = card.split("```python\n")[1].split("```")[0].replace('PeftModel.from_pretrained(base, "path/to/this/folder")', "base")
    done = subprocess.run([sys.executable, "-c", snippet + "\nprint(type(model).__name__)"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "RefloopTinyForConditionalGeneration"


def test_svp_iteration_adapters_say_what_they_were_trained_on(tmp_path):
    """SVP's outer loop merges each iteration's adapter before the next trains: the second
    iteration's adapter does not load onto the plain base, and its card says so."""
    from refloop.training.model_card import write_model_cards

    for i in (1, 2):
        folder = tmp_path / f"iteration-{i}" / "adapters" / "svp"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    write_model_cards(tmp_path, "refloop-tiny", "svp", {"svp": {}}, folded="the `svp` adapters of iterations 1 to 2, in turn,")
    first, second = ((tmp_path / f"iteration-{i}" / "adapters" / "svp" / "README.md").read_text() for i in (1, 2))
    assert "merged into it in turn" not in first
    assert "This adapter of iteration 2 was trained on the base with the adapter of iteration 1 merged" in second
