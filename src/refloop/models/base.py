"""The VLM interface every method talks to: describe (REG), locate (REC), caption, sampling,
and log-probabilities of given completions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from refloop.boxes import Box
from refloop.models.profiles import PromptProfile


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
    profile: PromptProfile
    name: str

    def generate(
        self, images: Sequence[Image.Image], prompts: Sequence[str], options: GenerateOptions = GREEDY
    ) -> list[list[Completion]]: ...

    def logprobs(
        self, images: Sequence[Image.Image], prompts: Sequence[str], completions: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]: ...

    def describe(self, images: Sequence[Image.Image], boxes: Sequence[Box], options: GenerateOptions = GREEDY) -> list[str]: ...

    def locate(self, images: Sequence[Image.Image], expressions: Sequence[str]) -> list[Located]: ...

    def caption(self, images: Sequence[Image.Image], options: GenerateOptions = GREEDY) -> list[str]: ...
