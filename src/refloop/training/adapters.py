"""Named LoRA adapters on ONE base model (DESIGN.md "Model roles without copies").

A method names the adapters it trains (SC-Tune: `describer` and `locator`; SFT: one) and gets a
VLM view per name. The frozen reference policy is the base with adapters disabled (tuning starts
from the base) or a frozen `reference` snapshot. "Synchronise parameters" copies adapter
tensors. SC-Tune's authors keep three full model copies instead; here the extra memory is a few
adapters.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field, field_validator

from refloop.errors import RefloopError
from refloop.limits import LoraRank
from refloop.models.lora import language_model_targets, vision_targets
from refloop.training import distributed

REFERENCE = "reference"  # the reserved name of the frozen snapshot adapter
AUTO_TARGETS = "auto"


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: LoraRank = Field(16, description="LoRA rank")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (0 keeps rollouts and updates deterministic)")
    target_modules: str | list[str] = Field(
        AUTO_TARGETS, description="regex or module names to adapt; auto = every Linear in the language model's blocks"
    )
    vision_tower: bool = Field(False, description="also adapt every Linear and Conv2d of the vision tower (LoRA, never full tuning)")

    @field_validator("target_modules")
    @classmethod
    def _compiles(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value or not all(value):
                raise ValueError("a list of module names must hold at least one non-empty name")
        elif value != AUTO_TARGETS:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression ({exc})") from None
        return value


def _matches(targets: str | list[str], name: str) -> bool:
    """PEFT's rule: a regex must match the whole module name, a list entry its last components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# Where a recipe keeps its LoRA settings, as `--set` spells them.
_RECIPE_KEYS = "in a recipe: --set sctune.lora.{field}={value}, sft.lora.{field}=..., svp.sft.lora.{field}=..."


def _check_targets(model: torch.nn.Module, targets: str | list[str], lora: LoraSettings) -> None:
    """Before PEFT touches the model: the targets must name at least one layer LoRA can adapt
    (else the message lists the candidates), and the rank must not exceed every such layer's
    width (the update B A has rank at most min(in, out): a larger r only allocates)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding))}
    matched = [m for n, m in layers.items() if _matches(targets, n)]
    if not matched:
        candidates = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", n) for n in layers))
        shown = ", ".join(candidates[:15]) + (f" (+{len(candidates) - 15} more)" if len(candidates) > 15 else "")
        raise RefloopError(
            f"lora.target_modules {targets!r} matches no Linear, Conv2d or Embedding layer; candidates: {shown} "
            f"({_RECIPE_KEYS.format(field='target_modules', value='...')})"
        )
    widest = max(min(m.weight.shape[0], m.weight[0].numel()) for m in matched)
    if lora.r > widest:
        raise RefloopError(
            f"lora.r {lora.r} exceeds the rank any adapted layer can take (at most {widest} here); choose r <= {widest} "
            f"({_RECIPE_KEYS.format(field='r', value=widest)})"
        )


def lora_targets(model: torch.nn.Module, lora: LoraSettings) -> str | list[str]:
    """PEFT's target_modules for `lora` on `model`: the settings' targets, plus the vision tower's
    layers (as escaped full paths) when `lora.vision_tower`, checked against the model."""
    targets = language_model_targets(model) if lora.target_modules == AUTO_TARGETS else lora.target_modules
    if lora.vision_tower:
        vision = vision_targets(model)
        if isinstance(targets, list):
            targets = list(dict.fromkeys(targets + vision))
        else:
            targets = "|".join([f"(?:{targets})", *(re.escape(n) for n in vision)])
    _check_targets(model, targets, lora)
    return targets


@contextmanager
def _embedding_notice_held() -> Iterator[None]:
    """PEFT warns on every save of a model whose embeddings were resized (refloop-tiny's extended
    vocabulary) that it saves them too: what refloop wants (PEFT's "auto"), not news to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`", category=UserWarning)
        yield


def _peft_state(peft, name: str) -> dict[str, torch.Tensor]:
    with _embedding_notice_held():
        return get_peft_model_state_dict(peft, adapter_name=name)


class NamedAdapters:
    """A base model with one LoRA adapter per name, created in the order given (the first is
    active at the start).

    PEFT's `set_adapter` marks the active adapter trainable and the others frozen; `use` undoes
    that once for everyone, and optimizers are built from `parameters(name)` (cached at
    construction), so switching adapters never changes which tensors an optimizer holds.
    """

    def __init__(
        self,
        base: torch.nn.Module,
        lora: LoraSettings,
        names: Sequence[str],
        reference: str = "base",
        trainable_tokens: dict[str, list[int]] | None = None,
        shard: bool = True,
    ) -> None:
        """`trainable_tokens` maps embedding-like modules (input embeddings, LM head) to the token
        rows each adapter trains besides its LoRA tensors (PEFT's trainable_token_indices), used
        when a vocabulary was extended. Under `accelerate launch` with an FSDP config the model is
        sharded by accelerate's FSDP2 once the adapters exist (`refloop.training.distributed`),
        unless `shard` is False (a fresh unsharded copy for export and evaluation)."""
        if reference not in ("base", "snapshot"):
            raise ValueError("reference must be 'base' or 'snapshot'")
        names = list(names)
        if not names or len(set(names)) != len(names) or REFERENCE in names:
            raise ValueError(f"adapter names must be unique, non-empty and not {REFERENCE!r}: {names}")
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_targets(base, lora),
            trainable_token_indices=trainable_tokens or None,
        )
        self._settings = (lora, trainable_tokens)  # to rebuild the same adapters on an unsharded copy
        self.peft: PeftModel = get_peft_model(base, config, adapter_name=names[0])
        for name in names[1:]:
            self.peft.add_adapter(name, config)
        self.names = tuple(names)
        self.reference_kind = reference
        stored = list(names)
        if reference == "snapshot":
            self.peft.add_adapter(REFERENCE, config)
            stored.append(REFERENCE)
        self.module = self.peft.base_model.model  # the original model, LoRA layers injected
        if shard:
            distributed.shard(self.module)  # in place; parameters become DTensors
        self.sharded = distributed.sharded(self.module)
        self._params = {name: _adapter_parameters(self.module, name) for name in stored}
        self._identity: dict[str, tuple] = {}  # name -> (tensor versions when checked, result)
        self._named: dict[str, list] = {}
        if reference == "snapshot":
            self.copy(names[0], REFERENCE)
        self.use(names[0], trainable=False)

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        return self._params[name]

    def is_identity(self, name: str) -> bool:
        """Whether adapter `name` changes nothing: every LoRA B matrix (and trainable-token delta)
        is zero, as for an adapter never trained (PEFT starts B at 0). Such an adapter can run as
        the base, without its LoRA matmuls, with the same outputs bit for bit. Checked again only
        after its tensors change (an optimizer step or a copy bumps their version counters)."""
        params = self._named_params(name)
        versions = tuple(p._version for _, p in params)
        cached = self._identity.get(name)
        if cached is not None and cached[0] == versions:
            return cached[1]
        deltas = [p for n, p in params if _ZERO_MEANS_IDENTITY.search(n)]
        if self.sharded or len(deltas) + sum(1 for n, _ in params if ".lora_A." in n or ".lora_embedding_A." in n) != len(params):
            result = False  # sharded tensors, or tensors (DoRA magnitudes) whose zero is not the identity
        else:
            with torch.no_grad():
                result = all(not p.any() for p in deltas)
        self._identity[name] = (versions, result)
        return result

    def _named_params(self, name: str) -> list[tuple[str, torch.nn.Parameter]]:
        named = self._named.get(name)
        if named is None:
            wanted = {id(p) for p in self._params[name]}
            named = self._named[name] = [(n, p) for n, p in self.module.named_parameters() if id(p) in wanted]
        return named

    def use(self, name: str, trainable: bool) -> None:
        """Make `name` the active adapter; only its tensors require grad, and only if `trainable`."""
        self.peft.set_adapter(name)
        for other, params in self._params.items():
            for p in params:
                p.requires_grad_(trainable and other == name)

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen reference policy (pi_ref of SC-Tune Eq. 2)."""
        if self.reference_kind == "base":
            with self.peft.disable_adapter():
                yield
        else:
            active = self.peft.active_adapter
            self.peft.set_adapter(REFERENCE)
            try:
                yield
            finally:
                self.peft.set_adapter(active)

    @torch.no_grad()
    def copy(self, source: str, target: str) -> None:
        """Parameter synchronisation (SC-Tune Sec. 3.2): target's adapter := source's."""
        set_peft_model_state_dict(self.peft, _peft_state(self.peft, source), adapter_name=target)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors, whole (gathered across processes when sharded: a collective)."""
        return {k: distributed.full(v.detach()).clone() for k, v in _peft_state(self.peft, name).items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter's tensors, keyed `name/tensor` (the trainer checkpoints this)."""
        return {f"{name}/{k}": v.contiguous() for name in self._params for k, v in self.adapter_state(name).items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self._params:
            prefix = f"{name}/"
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if self.sharded:  # whole tensors cut to this process's shards
                current = _peft_state(self.peft, name)
                state = {k: distributed.like(v, current[k]) if k in current else v for k, v in state.items()}
            set_peft_model_state_dict(self.peft, state, adapter_name=name)

    def unsharded(self) -> NamedAdapters:
        """After an FSDP run: the same base weights and adapters, whole, on a plain copy of the model
        (every process must call it: the weights are gathered). Exports and evaluation use it."""
        if not self.sharded:
            return self
        state = {k: distributed.full(v.detach()) for k, v in self.module.state_dict().items()}  # collective
        base = distributed.unsharded_model(self.module, state)
        lora, trainable_tokens = self._settings
        names = [n for n in self._params if n != REFERENCE]
        copy = NamedAdapters(base, lora, names, reference=self.reference_kind, trainable_tokens=trainable_tokens, shard=False)
        missing, unexpected = copy.module.load_state_dict(state, strict=False)
        if missing or unexpected:  # the same class, config and adapters: the same keys
            raise RuntimeError(f"unsharded copy does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        copy.use(self.peft.active_adapter, trainable=False)
        return copy

    def save_pretrained(self, directory: Path) -> None:
        """Each adapter in PEFT's own format (`NAME/adapter_config.json` + `adapter_model.safetensors`)."""
        if self.sharded:
            raise RuntimeError("save a sharded run from its unsharded() copy")
        for name in self._params:
            with _embedding_notice_held():
                self.peft.save_pretrained(str(directory), selected_adapters=[name])

    def merged_copy(self, name: str) -> torch.nn.Module:
        """A plain model with `name`'s adapter merged in (for export as an HF checkpoint)."""
        import copy

        if self.sharded:
            raise RuntimeError("merge a sharded run from its unsharded() copy")
        clone = copy.deepcopy(self.peft)
        clone.set_adapter(name)
        for other in list(clone.peft_config):
            if other != name:
                clone.delete_adapter(other)
        return clone.merge_and_unload()

    def view(self, vlm, name: str) -> AdapterView:
        """`vlm` (which must wrap `self.module`) seen through one adapter, or `REFERENCE`."""
        if name != REFERENCE and name not in self.names:
            raise KeyError(f"no adapter named {name!r}; have {', '.join(self.names)}")
        return AdapterView(vlm, self, name)


_LORA_TENSOR = re.compile(r"\.(lora_(A|B|embedding_A|embedding_B|magnitude_vector)|trainable_tokens_delta)\.(?P<name>[^.]+)(\.|$)")


def _adapter_parameters(module: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The LoRA tensors of adapter `name`, found by PEFT's naming (`...lora_A.<name>.weight`)."""
    params = [p for n, p in module.named_parameters() if (m := _LORA_TENSOR.search(n)) and m["name"] == name]
    if not params:
        raise ValueError(f"adapter {name!r} has no LoRA tensors")
    return params


_ZERO_MEANS_IDENTITY = re.compile(r"\.(lora_B|lora_embedding_B|trainable_tokens_delta)\.")


class AdapterView:
    """A VLM with one named adapter active. Every call activates it first, so views of the same
    base can be used in any order (the describer's view, then the locator's); `logprobs(...,
    grad=True)` is the only call that makes the adapter trainable."""

    _GENERATING = frozenset({"generate", "describe", "locate", "caption", "answer"})

    def __init__(self, vlm, adapters: NamedAdapters, name: str) -> None:
        self.vlm, self.adapters, self.adapter = vlm, adapters, name

    def __getattr__(self, attr: str):
        value = getattr(self.vlm, attr)  # profile, name, tokenizer, device, answer_ids, ...
        if attr not in self._GENERATING:
            return value

        def call(*args, **kwargs):
            with self._active():
                return value(*args, **kwargs)

        return call

    @contextmanager
    def _active(self, trainable: bool = False) -> Iterator[None]:
        if self.adapter == REFERENCE:
            with self.adapters.reference():
                yield
        elif not trainable and self.adapters.is_identity(self.adapter):
            # A never-trained adapter (LoRA B = 0) is the base: run without the LoRA matmuls.
            self.adapters.use(self.adapter, trainable=False)
            with self.adapters.peft.disable_adapter():
                yield
        else:
            # Left trainable on exit: autograd skips leaves that no longer require grad, and the
            # caller back-propagates after this returns. The next call through any view resets it.
            self.adapters.use(self.adapter, trainable=trainable)
            yield

    def logprobs(self, *args, grad: bool = False, **kwargs):
        with self._active(trainable=grad):
            return self.vlm.logprobs(*args, grad=grad, **kwargs)
