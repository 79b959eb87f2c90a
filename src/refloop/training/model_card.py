"""Model cards (README.md with Hugging Face metadata) for exported adapters and merged checkpoints,
so an export pushed to the Hub says what it is: the base model, the method, the recipe that made
it and the numbers it reached."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

METHODS = {
    "sctune": "SC-Tune (self-consistency tuning): a describer trained by PPO on how well a locator finds its "
    "descriptions again, and a locator trained on the describer's captions, alternating on one base model",
    "sft": "LoRA instruction tuning on referential-comprehension data (Pink's recipe)",
    "svp": "SVP: captions sampled with and without grounding feedback, the most informative kept by the "
    "log-ratio score, then LoRA fine-tuning on them, iterated",
}


def _model_type(checkpoint: str) -> str | None:
    """The model_type of a local checkpoint folder (None: not one, or unreadable)."""
    try:
        return json.loads((Path(checkpoint) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def model_card(
    base_model: str,
    method: str,
    recipe: dict,
    metrics: dict | None = None,
    adapter: str | None = None,
    extended_vocabulary: int | None = None,
    folded: str | None = None,
) -> str:
    """README.md text: YAML metadata the Hub reads, how to load, the recipe, the metrics.
    `extended_vocabulary`: the embedding rows the run trained with, when it added words to the
    base's tokenizer (SFT's extend_vocabulary; the tokenizer is in the adapter's folder): the base's
    embeddings are resized to them before the adapter loads. `folded`: what a merged checkpoint
    holds beyond the base (e.g. "the `locator` adapter")."""
    local = Path(base_model).exists()
    meta = {
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["refloop", method, *(["lora"] if adapter else [])],
    }
    if not local:
        meta["base_model"] = base_model  # a Hub id; a local directory is named in the text only
    kind = f"LoRA adapter `{adapter}`" if adapter else f"merged checkpoint ({folded or 'the adapter'} folded into the base weights)"
    packaged = base_model in ("refloop-tiny", "refloop-tiny-context")
    tiny = packaged or _model_type(base_model) == "refloop-tiny"
    # refloop-tiny is no transformers architecture: importing refloop.models registers it with the Auto classes
    register = "import refloop.models  # registers refloop-tiny with transformers' Auto classes\n" if tiny else ""
    if adapter:
        base = "refloop.models.default_model_path()" if packaged else f'"{base_model}"'
        resize = (
            f"base.resize_token_embeddings({extended_vocabulary})  # the rows of the words this run added (tokenizer: this folder)\n"
            if extended_vocabulary
            else ""
        )
        load = (
            f"```python\n{register}from peft import PeftModel\nfrom transformers import AutoModelForImageTextToText\n\n"
            f"base = AutoModelForImageTextToText.from_pretrained({base})\n{resize}"
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")\n```'
        )
    else:
        alone = "After `import refloop.models`" if tiny else "With transformers alone"
        load = (
            "```python\nfrom refloop.models import load_vlm\n\n"
            'vlm = load_vlm("path/to/this/folder")  # model, processor and prompt profile\n```\n\n'
            f"{alone}: `AutoModelForImageTextToText.from_pretrained` loads the model; "
            "`AutoProcessor.from_pretrained` needs torchvision for the processors of Qwen-VL and InternVL "
            "(refloop's loader builds them without their video half)."
        )
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---",
        f"# {method} {kind} on {base_model}",
        f"Made with refloop by {METHODS.get(method, method)}.",
        f"- base model: `{base_model}`\n- method: `{method}`" + (f"\n- adapter: `{adapter}`" if adapter else ""),
        "## Loading\n\n" + load,
        "## Recipe\n\n```yaml\n" + yaml.safe_dump(recipe, sort_keys=False).rstrip() + "\n```",
    ]
    if metrics:
        rows = "\n".join(f"| {key} | {json.dumps(value)} |" for key, value in metrics.items())
        parts.append("## Results\n\n| metric | value |\n| --- | --- |\n" + rows)
    else:
        parts.append("## Results\n\nNo evaluation was recorded with this export.")
    return "\n\n".join(parts) + "\n"


def _trained_vocabulary(out: Path) -> int | None:
    """The embedding rows of the run's merged checkpoint (its config's vocab_size, or its text
    config's): the size an extended-vocabulary adapter was trained at."""
    try:
        config = json.loads((Path(out) / "merged" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) else None


def write_model_cards(
    out: Path, base_model: str, method: str, recipe: dict, metrics: dict | None = None, folded: str | None = None
) -> list[Path]:
    """README.md into every adapter folder under `out` (PEFT's NAME/adapter_config.json) and into
    `out/merged` (`folded`: what it holds beyond the base); returns the cards written."""
    written = []
    for config in sorted(Path(out).glob("**/adapter_config.json")):
        path = config.parent / "README.md"
        extended = _trained_vocabulary(out) if (config.parent / "tokenizer_config.json").exists() else None  # SFT's extended tokenizer
        card = model_card(base_model, method, recipe, metrics, adapter=config.parent.name, extended_vocabulary=extended)
        iteration = next((int(p.split("-")[1]) for p in config.relative_to(out).parts if re.fullmatch(r"iteration-\d+", p)), 1)
        if iteration > 1:  # SVP's outer loop: each iteration tunes the model the previous ones were merged into
            card = card.replace(
                "## Loading\n",
                f"## Loading\n\nThis adapter of iteration {iteration} was trained on the base with "
                + ("the adapter of iteration 1" if iteration == 2 else f"the adapters of iterations 1 to {iteration - 1}")
                + " merged into it in turn: merge those first, or load `merged/` (every iteration folded in).\n",
                1,
            )
        path.write_text(card)
        written.append(path)
    merged = Path(out) / "merged"
    if (merged / "config.json").exists():
        (merged / "README.md").write_text(model_card(base_model, method, recipe, metrics, folded=folded))
        written.append(merged / "README.md")
    return written
