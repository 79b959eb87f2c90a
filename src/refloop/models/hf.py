"""Hugging Face transformers backend: any `AutoModelForImageTextToText` checkpoint plus its
`AutoProcessor`, from a local directory or a hub id."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.cache_utils import DynamicCache, DynamicLayer

import refloop.models.tiny  # noqa: F401  (registers refloop-tiny with the Auto classes)
from refloop import parallel
from refloop.boxes import Box
from refloop.codecs.profiles import MODEL_TYPES, PromptProfile, get_profile, profile_for_config
from refloop.errors import RefloopError
from refloop.models.base import GREEDY, Completion, GenerateOptions, ProfileTasks
from refloop.models.processors import load_processor

log = logging.getLogger(__name__)


def select_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def select_dtype(dtype: str, device: torch.device) -> torch.dtype:
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return table[dtype]
    except KeyError:
        raise RefloopError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16") from None


def validate_config(config) -> None:
    """Refuse configs that load without error but compute wrong positions.

    Qwen2/2.5/3-VL's multimodal RoPE splits each head's rotary half (head_dim/2 frequencies)
    into temporal/height/width sections: `mrope_section` must live in
    `text_config.rope_parameters` (transformers 5.x) and sum to head_dim/2.
    """
    if getattr(config, "model_type", "") not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        return
    text = getattr(config, "text_config", config)
    rope = getattr(text, "rope_parameters", None) or {}
    section = rope.get("mrope_section")
    if section is None:
        raise RefloopError(
            f"{config.model_type}: text_config.rope_parameters has no mrope_section (transformers 5.x reads it there; "
            "move it from rope_scaling or the top-level config)"
        )
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if sum(section) != head_dim // 2:
        raise RefloopError(
            f"{config.model_type}: mrope_section {list(section)} sums to {sum(section)}, but must sum to head_dim/2 = {head_dim // 2}"
        )


def check_local_or_hub(path: str, what: str = "model directory") -> None:
    """A checkpoint named by a path must exist: a hub id is `name` or `org/name` with no such local
    folder; anything else is a local path, and asking the hub for it would only time out (or
    answer with its repo-id rules). A hub id on a machine that cannot resolve the hub's host reads
    the hub cache only (`offline_if_unreachable`)."""
    if Path(path).exists():
        return
    if not _HUB_ID.fullmatch(path) or Path(path).parent.is_dir() and str(Path(path).parent) != ".":
        raise RefloopError(f"{what} {path} does not exist (and it is not a hub id such as org/name)")
    offline_if_unreachable()


def offline_reason(path: str) -> str | None:
    """What to do when a hub id is needed, the hub cannot be asked and the cache lacks it (None:
    not that case; a cached checkpoint that fails to load keeps its own error)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if Path(path).exists() or not constants.HF_HUB_OFFLINE:
        return None
    try:
        cached = try_to_load_from_cache(path, "config.json")
    except ValueError:  # an id the hub's rules refuse (e.g. "org/a..b"): its own error says why
        return None
    if isinstance(cached, str):
        return None
    return (
        f"offline, and the Hugging Face cache ({constants.HF_HUB_CACHE}) does not hold it: download it where there is "
        f"network (`hf download {path} --local-dir DIR`) and pass DIR, or copy that machine's cache here"
    )


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def offline_if_unreachable(timeout: float = 3.0) -> bool:
    """Switch huggingface_hub to offline mode for this process when the hub's host does not
    resolve, and say so. huggingface_hub retries a failed request five times with back-off (about
    25 s) before it falls back to its cache or fails; a name that does not resolve will not resolve
    on the fifth try either. Behind a proxy (which resolves names itself), with HF_HUB_OFFLINE set,
    or when the lookup is merely slow, nothing changes. Returns whether offline mode is on."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return bool(constants.HF_HUB_OFFLINE)
    host = urlparse(constants.ENDPOINT).hostname
    failed: list[BaseException] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
        except socket.gaierror as exc:
            failed.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    if not failed:  # resolved, or still resolving: the hub client decides
        return False
    constants.HF_HUB_OFFLINE = True
    if parallel.is_main_process():
        log.info(f"{host} does not resolve (no network?): reading the Hugging Face cache only, as with HF_HUB_OFFLINE=1")
    return True


def load_parts(
    path: str, profile: PromptProfile | str | None = None, processor_options: dict | None = None, trust_remote_code: bool = False
) -> tuple:
    """A checkpoint's validated config, its processor and its prompt profile (no weights)."""
    if Path(path).exists() and not (Path(path) / "config.json").exists():
        if (Path(path) / "adapter_config.json").exists():  # a run's adapters/NAME: the model is the run's merged/
            raise RefloopError(f"{path} holds a LoRA adapter, not a model: pass the run's merged/ checkpoint as --model")
        raise RefloopError(f"{path} is not a model directory (no config.json)")
    check_local_or_hub(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RefloopError(f"cannot load a model config from {path}: {offline_reason(path) or exc}") from None
    validate_config(config)
    processor = load_processor(path, config, trust_remote_code=trust_remote_code, **(processor_options or {}))
    check_processor_options(processor, processor_options or {}, path)
    name = profile if isinstance(profile, str) else None
    if isinstance(profile, str):
        own = MODEL_TYPES.get(getattr(config, "model_type", None))
        if own is not None and own != profile and parallel.is_main_process():
            log.warning(f"prompt profile {profile} for {path}, a {config.model_type} checkpoint (its family's profile: {own})")
        try:
            profile = get_profile(profile, processor)
        except (AttributeError, TypeError, KeyError) as exc:  # a profile reading settings another family's processor lacks
            raise RefloopError(
                f"prompt profile {profile} does not fit {path} (its processor has no {exc}); choose the profile of this model's "
                f"family (--profile{f' {own}' if own else ''})"
            ) from None
    profile = profile or profile_for_config(config, processor)
    check_profile_fits(profile, processor, path, name)
    return config, processor, profile


def check_processor_options(processor, options: dict, path: str) -> None:
    """Every processor option must be one the checkpoint's image processor takes: transformers
    drops an unknown one silently, so a misspelt `max_pixel` would run at the default size."""
    image_processor = getattr(processor, "image_processor", None)
    known = set(getattr(type(image_processor), "valid_kwargs", dict).__annotations__) if image_processor is not None else set()
    if image_processor is not None and hasattr(image_processor, "to_dict"):
        known |= set(image_processor.to_dict())
    unknown = sorted(set(options) - known)
    if unknown:
        takes = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
        raise RefloopError(f"processor_options {', '.join(unknown)}: not an option of {path}'s image processor ({takes})")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_profile_fits(profile: PromptProfile, processor, path: str, name: str | None = None) -> None:
    """The profile's box text must survive this checkpoint's tokenizer: a REC answer, tokenized,
    decoded and read back, names the same box. A profile of another family fails here, before
    any weights load, instead of every answer being silently unparseable."""
    tokenizer = getattr(processor, "tokenizer", processor)
    box, size = Box(10.0, 20.0, 60.0, 80.0), (100, 100)
    answer = profile.rec_answer(box, size, "the thing")
    ids = tokenizer.encode(answer, add_special_tokens=False)
    found = profile.read_box(profile.decode(tokenizer, ids), size)
    if found is None or box.iou(found) < 0.5:
        raise RefloopError(
            f"prompt profile {name or type(profile).__name__} does not fit {path}: its box text {answer!r} does not survive the "
            "checkpoint's tokenizer; choose the profile of this model's family (--profile)"
        )
    # The profile's prompt must be one the checkpoint's processor takes with an image (another
    # family's prompt lacks this one's image placeholder: transformers fails inside the first batch).
    if not callable(processor) or processor is tokenizer:
        return
    try:
        processor(images=[Image.new("RGB", (56, 56))], text=[profile.prompt(profile.rec_instruction("the thing"))], return_tensors="pt")
    except Exception as exc:  # noqa: BLE001 (any failure of the family's processor stops here, named)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if name is None:  # the family's own profile: the processor itself is broken (a missing dependency, a bad file)
            raise RefloopError(f"the processor of {path} cannot prepare an image and a prompt: {reason}") from None
        raise RefloopError(
            f"prompt profile {name} does not fit {path}: the checkpoint's processor refuses its prompt "
            f"({reason}); choose the profile of this model's family (--profile)"
        ) from None


def placeholder_tokens(config, processor) -> set[int]:
    """Image and video placeholder token ids a config or processor names (never to be generated)."""
    found = {getattr(config, k, None) for k in ("image_token_id", "image_token_index", "video_token_id")}
    found |= {getattr(processor, k, None) for k in ("image_token_id", "video_token_id")}
    return {t for t in found if isinstance(t, int)}


class PreallocatedLayer(DynamicLayer):
    """transformers' DynamicLayer with its keys and values as views into buffers sized for the
    whole generate() call: a step writes its tokens in place. DynamicLayer concatenates, which
    allocates and copies the layer's whole cache at every step; on CPU those fresh
    multi-megabyte tensors also cost page faults (about 2 ms per layer and step for 8 rows of a
    100M model, a quarter of a 32-token greedy answer's time). The values are the same, so are
    the outputs. Whatever replaces `keys`/`values` (batch selection or repetition, offloading) is
    copied into a new buffer at the next update; a crop keeps the buffer."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _owns_states(self) -> bool:
        if self._buffers is None:
            return False
        return all(
            t.data_ptr() == buf.data_ptr() and t.shape[:2] == buf.shape[:2] and t.stride() == buf.stride()
            for t, buf in zip((self.keys, self.values), self._buffers, strict=True)
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.get_seq_length(), key_states.shape[-2]
        if n == 0 or not self._owns_states() or n + t > self._buffers[0].shape[-2]:
            size = max(self.capacity, n + t)
            buffers = []
            for old, new in ((self.keys, key_states), (self.values, value_states)):
                buf = new.new_empty((*new.shape[:-2], size, new.shape[-1]))
                if n:
                    buf[..., :n, :] = old
                buffers.append(buf)
            self._buffers = (buffers[0], buffers[1])
        keys, values = self._buffers
        keys[..., n : n + t, :] = key_states
        values[..., n : n + t, :] = value_states
        self.keys, self.values = keys[..., : n + t, :], values[..., : n + t, :]
        return self.keys, self.values


# The steps of transformers' generate() that `lean_generate` replaces on the model instance.
GENERATE_HOOKS = ("_expand_inputs_for_generation", "_prefill", "_prepare_cache_for_generation")


@contextlib.contextmanager
def lean_generate(model, shared_prefill: bool = True, preallocated_cache: bool = True) -> Iterator[None]:
    """Two hooks into transformers' generate() (>= 5.2x), within this context, both exact (the same
    computation; outputs token for token the same, tested per family):

    - `shared_prefill`: a generate() of `num_return_sequences = K > 1` prefills each prompt once,
      then repeats its cache and first-step logits K times, instead of prefilling the K copies
      that transformers makes of every prompt before the prefill. It hooks
      `_expand_inputs_for_generation` (to keep the prompt inputs as they were before the
      expansion) and `_prefill` (to run it on those and expand the result with the cache's own
      `batch_repeat_interleave`); the decode steps and the sampling (its random draws too) are
      generate()'s own.
    - `preallocated_cache`: the cache's full-attention layers are `PreallocatedLayer`s sized for
      the prompt and the new tokens (hooks `_prepare_cache_for_generation`).

    Anywhere they cannot apply (an encoder-decoder, whose decoder prefill is one start token; a
    cache other than DynamicCache; a transformers without those steps) generate() runs unchanged."""
    if getattr(model.config, "is_encoder_decoder", False) or not all(callable(getattr(model, h, None)) for h in GENERATE_HOOKS):
        yield
        return
    expand, prefill, prepare_cache = (getattr(model, h) for h in GENERATE_HOOKS)
    before: dict = {}

    def expand_keeping_prompts(expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
        before.update(size=expand_size, input_ids=input_ids, kwargs=dict(model_kwargs))
        if isinstance(model_kwargs.get("mm_encoder_outputs"), dict):
            # Expanded in place (their pooler_output is reassigned): expand copies, keep these.
            model_kwargs["mm_encoder_outputs"] = {m: copy.copy(o) for m, o in model_kwargs["mm_encoder_outputs"].items()}
        return expand(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)

    def prefill_once(input_ids, generation_config, model_kwargs, is_first_iteration: bool = True, **kw):
        k, prompts = before.get("size", 1), before.get("input_ids")
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if (
            k <= 1
            or prompts is None
            or input_ids.shape[0] != prompts.shape[0] * k
            or type(cache) is not DynamicCache
            or cache.get_seq_length() > 0
        ):
            return prefill(input_ids, generation_config, model_kwargs, is_first_iteration, **kw)
        # The prompt inputs as they were before the expansion; what generate() added after it
        # (the cache, logits_to_keep, use_cache) stays.
        outputs = prefill(prompts, generation_config, {**model_kwargs, **before["kwargs"]}, is_first_iteration, **kw)
        if outputs.get("cache", outputs.get("past_key_values")) is not cache:
            raise RuntimeError("shared prompt prefill: the model returned another cache than generate() passed")
        cache.batch_repeat_interleave(k)
        outputs.logits = outputs.logits.repeat_interleave(k, dim=0)
        return outputs

    def prepare_preallocated_cache(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kw):
        prepare_cache(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kw)
        cache = model_kwargs.get("cache")
        if type(cache) is DynamicCache and max_cache_length > 0:
            cache.layers = [PreallocatedLayer(max_cache_length) if type(layer) is DynamicLayer else layer for layer in cache.layers]
            if cache.layer_class_to_replicate is DynamicLayer:
                cache.layer_class_to_replicate = functools.partial(PreallocatedLayer, max_cache_length)

    replaced = {}
    if shared_prefill:
        replaced.update(_expand_inputs_for_generation=expand_keeping_prompts, _prefill=prefill_once)
    if preallocated_cache:
        replaced["_prepare_cache_for_generation"] = prepare_preallocated_cache
    for name, hook in replaced.items():
        setattr(model, name, hook)
    try:
        yield
    finally:
        for name in replaced:
            delattr(model, name)


class HFVLM(ProfileTasks):
    """Batched generation with left padding; log-probs from one forward pass with the real mask.
    Decoder-only and encoder-decoder (Florence-2) models alike."""

    def __init__(
        self, model, processor, profile: PromptProfile, name: str = "model", batch_size: int = 32, lineage: Sequence[dict] = ()
    ) -> None:
        """`name`: the checkpoint the weights came from; `lineage`: how `model` was changed in memory
        since (e.g. SVP's merged iterations), so a run's fingerprint tells it from the checkpoint."""
        self.model, self.processor, self.profile, self.name, self.batch_size = model, processor, profile, name, batch_size
        self.lineage: list[dict] = list(lineage)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # Some processors pad with the tokenizer's own side whatever the call says (Kosmos-2).
        self.tokenizer.padding_side = "left"
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        # Never generate an image placeholder: fed back (log-probs, the locator's input) it would be
        # taken for an image slot and the forward fails or reads garbage.
        suppressed = set(model.generation_config.suppress_tokens or []) | placeholder_tokens(model.config, processor)
        self.suppress_tokens = sorted(suppressed)
        # Rows that share an image reuse its image tokens' states, where the family can (refloop-tiny),
        # in whole-sequence forwards and in generate()'s prefill (the locator's queries on one image);
        # equal up to float rounding, so trainers opt in (SC-Tune).
        self.share_image_states = False
        # K samples of a prompt share one prefill of it, and the cache is preallocated
        # (`lean_generate`): the same computation, so on by default; with share_image_states the
        # prefill also computes the image tokens once per image. False: the plain generate() (A/B runs).
        self.shared_prefill = True
        self.preallocated_cache = True

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        profile: PromptProfile | str | None = None,
        trust_remote_code: bool = False,
        batch_size: int = 32,
        processor_options: dict | None = None,
    ) -> HFVLM:
        """Load a checkpoint; `profile` (a name from `refloop.codecs.profiles.PROFILES`) overrides
        the one chosen from the config's model_type; `processor_options` go to the processor
        (image size limits such as Qwen's max_pixels; the profile reads them back)."""
        path = str(name_or_path)
        config, processor, profile = load_parts(path, profile, processor_options, trust_remote_code)
        dev = select_device(device)
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                path, config=config, dtype=select_dtype(dtype, dev), trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise RefloopError(
                f"cannot load the weights of {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        model.to(dev).eval()
        return cls(model, processor, profile, name=path, batch_size=batch_size)

    def with_module(self, model, batch_size: int | None = None, lineage: Sequence[dict] = ()) -> HFVLM:
        """This VLM's processor, profile and checkpoint name around another module of the same
        checkpoint (with adapters injected, or merged), at `batch_size` (default: this one's) and
        with the `lineage` of how that module was changed in memory."""
        return HFVLM(model, self.processor, self.profile, self.name, self.batch_size if batch_size is None else batch_size, lineage)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
        # Families whose processor can share one encoding among the prompts about the same image
        # (refloop-tiny: the boxes of an image, its K samples) are asked to.
        shared = {"share_images": True} if getattr(self.processor, "supports_shared_images", False) else {}
        batch = self.processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt", padding_side="left", **shared)
        batch.pop("labels", None)  # PaliGemma's processor adds training labels
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    @property
    def _decoder_start(self) -> int:
        cfg = self.model.generation_config
        start = cfg.decoder_start_token_id
        if start is None:
            start = getattr(self.model.config.get_text_config(), "decoder_start_token_id", None)
        return start if start is not None else self.tokenizer.eos_token_id

    def answer_ids(self, text: str) -> list[int]:
        """Token ids a model writes for answer `text`, as generate() returns them (ending in EOS;
        encoder-decoders that force BOS at the first step start with it)."""
        forced = self.model.generation_config.forced_bos_token_id if self.encoder_decoder else None
        head = [forced] if forced is not None else []
        return head + self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]

    @torch.no_grad()
    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str], options: GenerateOptions = GREEDY) -> list[list[Completion]]:
        """`num_return_sequences` completions per prompt, in prompt order."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        kwargs = {
            "do_sample": options.do_sample,
            "max_new_tokens": options.max_new_tokens,
            "num_return_sequences": options.num_return_sequences,
            "pad_token_id": pad,
            "suppress_tokens": self.suppress_tokens or None,
        }
        if options.do_sample:
            kwargs.update(temperature=options.temperature, top_k=options.top_k or 0, top_p=options.top_p or 1.0)
        out: list[list[Completion] | None] = [None] * len(prompts)
        batches = self._generation_batches(prompts)
        real = len(batches)
        if parallel.synced_generation(self.model):
            # Sharded weights: every process runs as many generate() calls as the busiest one
            # (repeating its last batch, output discarded), each stepping until all are done.
            if not batches:
                raise RuntimeError("a process with no prompts cannot join sharded generation; give every process work")
            kwargs["synced_gpus"] = True
            batches += [batches[-1]] * (parallel.max_over_processes(real) - real)
        for call, batch in enumerate(batches):
            inputs = self._inputs([images[i] for i in batch], [prompts[i] for i in batch])
            if self.shared_prefill and self.share_image_states and "image_index" in inputs:
                inputs["share_image_states"] = True  # the prefill computes each image's tokens once
            lean = lean_generate(self.model, self.shared_prefill, self.preallocated_cache)
            with lean if "synced_gpus" not in kwargs else contextlib.nullcontext():
                generated = self.model.generate(**inputs, **kwargs)
            if call >= real:
                continue
            # Decoder-only: the prompt comes back first; encoder-decoder: the decoder start token.
            skip = 1 if self.encoder_decoder else inputs["input_ids"].shape[1]
            new = generated[:, skip:].tolist()
            n = options.num_return_sequences
            for row, index in enumerate(batch):
                group = []
                for ids in new[row * n : (row + 1) * n]:
                    if eos in ids:
                        ids = ids[: ids.index(eos) + 1]
                    ids = [t for t in ids if t != pad or t == eos]
                    group.append(Completion(self.profile.decode(self.tokenizer, ids), tuple(ids)))
                out[index] = group
        return out

    def _generation_batches(self, prompts: Sequence[str]) -> list[list[int]]:
        """Prompt indices per generate() call: consecutive chunks, or chunks of equal token length
        for families whose decoding cannot take left padding."""
        order = list(range(len(prompts)))
        if not self.profile.unpadded_generation:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        lengths = [len(self.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        batches: list[list[int]] = []
        for length in sorted(set(lengths)):
            same = [i for i in order if lengths[i] == length]
            batches += [same[i : i + self.batch_size] for i in range(0, len(same), self.batch_size)]
        return batches

    def logprobs(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        completions: Sequence[Sequence[int]],
        grad: bool = False,
        full_vocab: bool = False,
    ) -> list[torch.Tensor]:
        """Per-token log p(completion | image, prompt) [T_i], or with `full_vocab` the log-distributions
        [T_i, V] at those positions. One forward per batch, real attention mask (left-padded prompts,
        right-padded completions). Equal to the log-softmax of the logits generate() sees at each step
        (tested per family).

        Vocabulary logits are computed at the completion positions only: with left-padded prompts
        and right-padded completions they are the last width + 1 positions of every row, so a
        decoder-only forward gets `logits_to_keep=width + 1` and the prompt's [B, L, V] logits (most
        of the memory with ~1000 image tokens) never exist."""
        out: list[torch.Tensor] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            inputs = self._inputs(images[start:stop], prompts[start:stop])
            comps = [list(c) for c in completions[start:stop]]
            width = max(len(c) for c in comps)
            pad = self.tokenizer.pad_token_id
            comp_ids = torch.tensor([c + [pad] * (width - len(c)) for c in comps], device=self.device)
            comp_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in comps], device=self.device)
            with torch.set_grad_enabled(grad):
                if self.encoder_decoder:
                    # Teacher forcing: the decoder reads [start, c_1 .. c_{T-1}] and predicts c_1 .. c_T.
                    decoder_in = torch.cat([torch.full_like(comp_ids[:, :1], self._decoder_start), comp_ids[:, :-1]], dim=1)
                    logits = self.model(**inputs, decoder_input_ids=decoder_in, decoder_attention_mask=comp_mask).logits.float()
                else:
                    # Per-token side inputs grow as the family's generate() grows them (Qwen-VL's
                    # mm_token_type_ids with 0: left without them, Qwen-VL silently computes wrong
                    # positions; PaliGemma's token_type_ids with 1: answer tokens attend causally).
                    for key, value in list(inputs.items()):
                        if key not in ("input_ids", "attention_mask") and isinstance(value, torch.Tensor):
                            if value.shape == inputs["input_ids"].shape:
                                fill = self.profile.completion_fill.get(key, 0)
                                inputs[key] = torch.cat([value, torch.full_like(comp_ids, fill, dtype=value.dtype)], dim=1)
                    inputs["input_ids"] = torch.cat([inputs["input_ids"], comp_ids], dim=1)
                    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], comp_mask], dim=1)
                    if self._forward_keeps_logits:
                        inputs["logits_to_keep"] = width + 1
                    if self.share_image_states and "image_index" in inputs:
                        inputs["share_image_states"] = True
                    # The last prompt position predicts c_1; the last position predicts nothing.
                    # (A forward without logits_to_keep returns every position: the slice is the same.)
                    logits = self.model(**inputs).logits[:, -(width + 1) : -1].float()
                log_dist = torch.log_softmax(logits, dim=-1)
                rows = log_dist if full_vocab else log_dist.gather(-1, comp_ids[..., None]).squeeze(-1)
            out += [rows[i, : len(c)] for i, c in enumerate(comps)]
        return out

    @property
    def _forward_keeps_logits(self) -> bool:
        """Whether the model's forward takes `logits_to_keep` (every decoder-only family in
        transformers 5 and refloop-tiny do; a wrapper such as DDP hides it, and then logits are sliced)."""
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters
