"""SC-Tune's roles on ONE base model (DESIGN.md "Model roles without copies").

`describer` and `locator` are LoRA adapters of the same base; the frozen reference policy for
the KL term is the base with adapters disabled (tuning starts from the base), or a frozen
snapshot adapter. "Synchronise parameters" copies adapter tensors. The authors keep three full
model copies instead; here the extra memory is a few adapters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

ROLES = ("describer", "locator")
AUTO_TARGETS = "auto"
_BLOCK_INDEX = re.compile(r"\\\.(\d+)\\\.")  # a layer index inside an escaped module name
# Module paths of vision towers and vision-to-text projectors (never LoRA targets).
VISION_MODULE = re.compile(r"(^|\.)(vision|visual|image_to_text|multi_modal_projector)", re.IGNORECASE)


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


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, description="LoRA rank")
    alpha: int = Field(32, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, description="LoRA dropout (0 keeps rollouts and updates deterministic)")
    target_modules: str | list[str] = Field(
        AUTO_TARGETS, description="regex or module names to adapt; auto = every Linear in the language model's blocks"
    )


class RoleModel:
    """A base model with one LoRA adapter per role.

    PEFT's `set_adapter` marks the active adapter trainable and the others frozen; callers use
    `parameters(role)` (cached at construction) to build optimizers, so switching roles never
    changes which tensors an optimizer holds.
    """

    def __init__(self, base: torch.nn.Module, lora: LoraSettings, reference: str = "base") -> None:
        if reference not in ("base", "snapshot"):
            raise ValueError("reference must be 'base' or 'snapshot'")
        targets = language_model_targets(base) if lora.target_modules == AUTO_TARGETS else lora.target_modules
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
        self.peft: PeftModel = get_peft_model(base, config, adapter_name=ROLES[0])
        for role in ROLES[1:]:
            self.peft.add_adapter(role, config)
        self.reference_kind = reference
        if reference == "snapshot":
            self.peft.add_adapter("reference", config)
            self.copy_adapter(ROLES[0], "reference")
        self.module = self.peft.base_model.model  # the original model, LoRA layers injected
        self._params = {
            name: [p for n, p in self.module.named_parameters() if f".{name}." in n]
            for name in (*ROLES, *(["reference"] if reference == "snapshot" else []))
        }
        self.use(ROLES[0], trainable=False)

    def parameters(self, role: str) -> list[torch.nn.Parameter]:
        return self._params[role]

    def use(self, role: str, trainable: bool) -> None:
        """Make `role` the active adapter; only its tensors require grad, and only if `trainable`."""
        self.peft.set_adapter(role)
        for name, params in self._params.items():
            for p in params:
                p.requires_grad_(trainable and name == role)

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen reference policy pi_ref of SC-Tune Eq. 2."""
        if self.reference_kind == "base":
            with self.peft.disable_adapter():
                yield
        else:
            active = self.peft.active_adapter
            self.peft.set_adapter("reference")
            try:
                yield
            finally:
                self.peft.set_adapter(active)

    @torch.no_grad()
    def copy_adapter(self, source: str, target: str) -> None:
        """Parameter synchronisation (SC-Tune Sec. 3.2): target's adapter := source's."""
        set_peft_model_state_dict(self.peft, get_peft_model_state_dict(self.peft, adapter_name=source), adapter_name=target)

    def adapter_state(self, role: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft, adapter_name=role).items()}

    def load_adapter_state(self, role: str, state: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self.peft, state, adapter_name=role)

    def save_adapters(self, directory: Path) -> None:
        """Each role in PEFT's own format (`adapter_config.json` + `adapter_model.safetensors`)."""
        for role in self._params:
            self.peft.save_pretrained(str(directory), selected_adapters=[role])

    def save_state(self, path: Path) -> None:
        tensors = {f"{role}/{k}": v.contiguous() for role in self._params for k, v in self.adapter_state(role).items()}
        save_file(tensors, str(path))

    def load_state(self, path: Path) -> None:
        tensors = load_file(str(path))
        for role in self._params:
            prefix = f"{role}/"
            self.load_adapter_state(role, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})

    def merged_copy(self, role: str) -> torch.nn.Module:
        """A plain model with `role`'s adapter merged in (for export as an HF checkpoint)."""
        import copy

        clone = copy.deepcopy(self.peft)
        clone.set_adapter(role)
        for other in list(clone.peft_config):
            if other != role:
                clone.delete_adapter(other)
        return clone.merge_and_unload()
