"""LoRA target discovery: which Linear layers of a model are its language model's blocks and which
its vision tower, found by module path (no weights needed: works on a meta-device skeleton, so
`refloop inspect` lists them without loading a checkpoint)."""

from __future__ import annotations

import re

import torch

_BLOCK_INDEX = re.compile(r"\\\.(\d+)\\\.")  # a layer index inside an escaped module name
# Module paths of vision towers and vision-to-text projectors (never LoRA targets).
VISION_MODULE = re.compile(r"(^|\.)(vision|visual|image_to_text|multi_modal_projector)", re.IGNORECASE)
# Projectors between the towers: matched by VISION_MODULE but not part of the vision tower.
_PROJECTOR = re.compile(r"(^|\.)(image_to_text|multi_modal_projector|mm_projector)", re.IGNORECASE)


def language_model_targets(model: torch.nn.Module) -> str:
    """A regex (PEFT full-matches it) naming every Linear inside the language model's
    transformer blocks, and nothing in the vision tower, projector or LM head.

    Name-suffix lists are not safe across families: on Qwen2.5-VL 'gate/up/down_proj' also name
    the vision blocks' MLP, and SigLIP/CLIP towers (PaliGemma, Kosmos-2) use the same
    'layers.N.self_attn.q_proj' names as the LM. So the LM is found by module path
    ('language_model', 'text_model'; the whole model for refloop-tiny) and its block layers listed.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    roots = sorted({n[: n.index(key) + len(key)] for n in names for key in ("language_model.", "text_model.") if key in n}, key=len)
    root = roots[0] if roots else ""
    patterns = []
    for name in names:
        if not name.startswith(root) or (not root and VISION_MODULE.search(name)):
            continue
        rel = name[len(root) :]
        if not re.search(r"(^|\.)layers?\.\d+\.", rel):
            continue
        pattern = _BLOCK_INDEX.sub(r"\\.\\d+\\.", re.escape(name))
        if pattern not in patterns:
            patterns.append(pattern)
    if not patterns:
        raise ValueError("no Linear layers found in a language model's blocks; set lora.target_modules explicitly")
    return "|".join(patterns)


def vision_targets(model: torch.nn.Module) -> list[str]:
    """The full module paths of every Linear and Conv2d inside the vision tower (Pink Sec. 3.1:
    adapt the vision encoder, never tune it fully), found by module path like
    `language_model_targets`; projectors between the towers and the language model are left out."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and VISION_MODULE.search(n) and not _PROJECTOR.search(n)
    ]
    if not names:
        raise ValueError("no Linear or Conv2d layers found in a vision tower (no module path names vision/visual)")
    return names
