"""The VLM interface every method talks to: describe (REG), locate (REC), caption, answer, sampling,
and log-probabilities of given completions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from PIL import Image

from refloop.boxes import Box
from refloop.models.profiles import PromptProfile

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerateOptions:
    """Decoding settings; greedy by default (the papers' evaluation protocol)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 32
    num_return_sequences: int = 1


GREEDY = GenerateOptions()


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # generated ids up to and including EOS, no padding


@dataclass(frozen=True)
class Located:
    box: Box | None  # None when the answer does not parse
    text: str


class VLM(Protocol):
    """What the methods need of a model, so a fast backend (vLLM, SGLang) can stand in for the
    HF one. Task methods return flat lists: with K = `options.num_return_sequences`, sample j of
    input i is at index i * K + j."""

    profile: PromptProfile  # the family's prompts and answer readers: training and inference text agree
    name: str  # checkpoint path or hub id, recorded in run outputs
    tokenizer: PreTrainedTokenizerBase  # builds training targets and token budgets
    batch_size: int  # inputs per forward; callers chunk by it to bound memory

    @property
    def device(self) -> torch.device:
        """Where tensors for the model's forward (rewards, masks) must live."""
        ...

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str], options: GenerateOptions = GREEDY) -> list[list[Completion]]:
        """K completions per prompt, in prompt order: rollouts need the token ids, not only text."""
        ...

    def logprobs(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        completions: Sequence[Sequence[int]],
        grad: bool = False,
        full_vocab: bool = False,
    ) -> list[torch.Tensor]:
        """log p(completion token | image, prompt, earlier tokens): [T_i] per completion (PPO ratios,
        KL, MLE), or with `full_vocab` the whole log-distribution [T_i, V] at those positions (SVP's
        Eq. 5-6). `grad` keeps the graph for training."""
        ...

    def answer_ids(self, text: str) -> list[int]:
        """Token ids the model would write for answer `text` (EOS included): MLE targets that match
        what generate() returns."""
        ...

    def describe(self, images: Sequence[Image.Image], boxes: Sequence[Box], options: GenerateOptions = GREEDY) -> list[str]:
        """Referring expressions of each box (REG), K per box, box-major."""
        ...

    def locate(self, images: Sequence[Image.Image], expressions: Sequence[str], options: GenerateOptions | None = None) -> list[Located]:
        """The box each expression refers to (REC), K per expression. None: greedy, with a token
        budget long enough for families whose answer repeats the expression."""
        ...

    def caption(self, images: Sequence[Image.Image], options: GenerateOptions = GREEDY) -> list[str]:
        """Image captions, K per image, image-major."""
        ...

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], options: GenerateOptions = GREEDY) -> list[str]:
        """Free answers to one question per image (POPE's yes/no probes), K per question, question-major."""
        ...
