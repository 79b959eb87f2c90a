"""`refloop sft`: a YAML recipe around LoRA instruction tuning (Pink Sec. 3.1-3.2) on the RC data
`refloop rc-data` writes: data, vocabulary check, training, export (PEFT adapter + merged HF
checkpoint), results.json and a loss curve.

Adapters go on the language model's blocks and, with `vision_lora`, on every Linear/Conv2d of the
vision tower (Pink: adapt the vision encoder, never tune it fully). refloop-tiny has a word-level
tokenizer; words of the data it maps to `<unk>` are appended to its vocabulary, the embeddings
and LM head grow by mean-initialised rows, and only those new rows train besides the LoRA
tensors (PEFT trainable tokens). Real families' subword tokenizers never need this.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field

from refloop.data.rc import load_rc_data
from refloop.data.records import InstructionExample
from refloop.errors import RefloopError
from refloop.methods.recipe import RecipeRun, run_recipe
from refloop.models.profiles import PromptProfile
from refloop.models.spec import ModelSpec
from refloop.report.plots import sft_curves
from refloop.training.sft import SFT, SFTConfig
from refloop.training.trackers import TrackingSpec


class SFTRecipe(ModelSpec, TrackingSpec):
    """The model fields come from `ModelSpec`, the tracker fields from `TrackingSpec`."""

    train_data: str = Field(..., description="RC chat JSONL written by `refloop rc-data` (relative image paths: see `images`)")
    images: str | None = Field(
        None,
        description="root of the data's relative image paths (default: the root `refloop rc-data` recorded in the counts.json "
        "beside the file, else the file's folder)",
    )
    vision_lora: bool = Field(False, description="also put LoRA on the vision tower's Linear and Conv2d layers (never full tuning)")
    extend_vocabulary: bool = Field(
        True, description="add words the tokenizer maps to <unk> (word-level tokenizers only), else refuse them"
    )
    sft: SFTConfig = Field(default_factory=SFTConfig, description="the training hyperparameters")


def load_examples(recipe: SFTRecipe, profile: PromptProfile | str | None) -> list[InstructionExample]:
    """The training examples, refused when written for another prompt profile or pixel frame than
    the model's (targets in another family's chat format or box frame would train silently wrong)."""
    path = Path(recipe.train_data)
    if not path.is_file():
        raise RefloopError(f"train_data {path} is not a file (write it with `refloop rc-data`)")
    # every image confined to the root before anything opens
    examples = load_rc_data(path, profile, recipe.images, model=recipe.model or "refloop-tiny")
    if not examples:
        raise RefloopError(f"{path}: no examples")
    return examples


def _word_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


def unknown_words(tokenizer, texts: list[str]) -> list[str]:
    """Pre-tokenized pieces of `texts` the tokenizer maps to its unknown token, in first-seen order."""
    unk = tokenizer.unk_token_id
    if unk is None or not _word_level(tokenizer):
        return []
    backend = tokenizer.backend_tokenizer
    vocab = backend.get_vocab()
    out: dict[str, None] = {}
    for text in texts:
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            if piece not in vocab and piece != tokenizer.unk_token:
                out.setdefault(piece, None)
    return list(out)


def extend_vocabulary(vlm, words: list[str]) -> list[int]:
    """Append `words` to the word-level vocabulary of `vlm`'s tokenizer (in place), grow the input
    embeddings and LM head by rows set to the mean of the existing rows, and return the new ids."""
    from tokenizers import Tokenizer

    tokenizer = vlm.processor.tokenizer
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    start = max(len(tokenizer), max(vocab.values()) + 1)
    ids = list(range(start, start + len(words)))
    vocab.update(zip(words, ids, strict=True))
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    if any(tokenizer.convert_tokens_to_ids(w) != i for w, i in zip(words, ids, strict=True)):
        raise RefloopError("could not extend the tokenizer's vocabulary (new words do not map to new ids)")
    model = vlm.model
    old = model.get_input_embeddings().weight.shape[0]
    out_old = model.get_output_embeddings().weight.detach().clone() if model.get_output_embeddings() is not None else None
    model.resize_token_embeddings(start + len(words), mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0)
        head = model.get_output_embeddings()
        if head is not None and out_old is not None and head.weight.data_ptr() != emb.data_ptr():
            head.weight[out_old.shape[0] :] = out_old.mean(0)
    model.config.vocab_size = start + len(words)
    return ids


def _embedding_modules(model) -> dict[str, torch.nn.Module]:
    named = {m: n for n, m in model.named_modules()}
    out = {named[model.get_input_embeddings()]: model.get_input_embeddings()}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        out[named[head]] = head
    return out


def run_sft(recipe: SFTRecipe, out: Path, progress: Callable[[dict], None] | None = None, overwrite: bool = False) -> dict:
    """Train and export in `out`. Rerunning resumes; a run with another recipe (other than its
    thread count) is refused unless `overwrite`."""
    if recipe.generation_backend != "hf":
        raise RefloopError("generation_backend vllm serves sctune recipes and the inference commands; sft recipes generate with hf")

    def body(run: RecipeRun) -> dict:
        return _run_sft(recipe, run, progress)

    def card(results: dict) -> dict:
        return {k: v for k, v in results.items() if k != "added_words"}

    def prepare() -> list[InstructionExample]:  # the data checked against the model before its weights load
        return load_examples(recipe, recipe.load_profile())

    return run_recipe("sft", recipe, out, body, overwrite, card_metrics=card, prepare=prepare)


def _run_sft(recipe: SFTRecipe, run: RecipeRun, progress: Callable[[dict], None] | None) -> dict:
    out, examples = run.out, run.prepared
    vlm = recipe.load_vlm(batch_size=recipe.sft.generation_batch_size)
    missing = unknown_words(vlm.processor.tokenizer, [t for ex in examples for t in (ex.prompt, ex.answer)])
    trainable_tokens = None
    if missing and not recipe.extend_vocabulary:
        shown = ", ".join(map(repr, missing[:20])) + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        raise RefloopError(f"{recipe.train_data}: words the tokenizer maps to <unk>: {shown}; set extend_vocabulary: true")
    if missing:
        ids = extend_vocabulary(vlm, missing)
        trainable_tokens = {name: ids for name in _embedding_modules(vlm.model)}
    cfg = recipe.sft.model_copy(update={"lora": recipe.sft.lora.model_copy(update={"vision_tower": recipe.vision_lora})})
    try:
        tuner = SFT(vlm, cfg, examples, trainable_tokens=trainable_tokens)
    except ValueError as exc:
        raise RefloopError(f"cannot place adapters on {recipe.model or 'refloop-tiny'}: {exc}") from None
    tuner.trainer.track(run.tracking)
    started = time.perf_counter()
    step = (lambda row: progress(row | {"total_steps": tuner.total_steps})) if progress else None  # the bar's total
    summary = tuner.run(out / "train", progress=step)
    results: dict = {
        "train_data": recipe.train_data,
        "examples": len(examples),
        "steps": tuner.total_steps,
        "added_words": missing,
        "vision_lora": recipe.vision_lora,
        "trainable_parameters": sum(p.numel() for p in tuner.adapters.parameters(cfg.adapter)),
        "train_seconds": summary.get("train_seconds"),
        "wall_seconds": time.perf_counter() - started,  # this invocation's: see resumed_from_step
        "resumed_from_step": summary.get("resumed_from_step"),
        "processes": tuner.trainer.world_size,
    }
    adapters = tuner.adapters.unsharded()  # FSDP: gathered into a plain copy (every process); else itself
    if not run.main_process:
        return results
    run.export(vlm.processor, adapters, cfg.adapter)
    if missing:  # the adapter needs the extended tokenizer (its embeddings have the new rows)
        vlm.processor.tokenizer.save_pretrained(out / "adapters" / cfg.adapter)
    losses = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in losses if "loss" in r]
    if losses:
        results["first_loss"], results["final_loss"] = losses[0], losses[-1]
    sft_curves(out / "train" / "metrics.jsonl", out / "curves.png")
    return results
