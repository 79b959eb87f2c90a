"""The VLM interface every method talks to: describe (REG), locate (REC), caption, answer, sampling,
and log-probabilities of given completions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from PIL import Image

from refloop.boxes import Box
from refloop.codecs.profiles import PromptProfile

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
    # log p of each token as the model computed it while generating (log-softmax of its logits,
    # before temperature / top-k / top-p), where the backend returns them (vLLM); else None
    logprobs: tuple[float, ...] | None = None


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


class ProfileTasks:
    """describe / locate / caption / answer on top of a backend's `generate`, with the backend's
    prompt profile and tokenizer: every backend asks and reads the same text."""

    profile: PromptProfile
    tokenizer: PreTrainedTokenizerBase

    def generate(self, images, prompts, options: GenerateOptions = GREEDY) -> list[list[Completion]]:
        raise NotImplementedError

    def describe(self, images: Sequence[Image.Image], boxes: Sequence[Box], options: GenerateOptions = GREEDY) -> list[str]:
        """K = options.num_return_sequences expressions per box, box-major (sample j of box i at i * K + j)."""
        prompts = [self.profile.reg_prompt(b, img.size) for img, b in zip(images, boxes, strict=True)]
        return [self.profile.read_expression(c.text) for group in self.generate(images, prompts, options) for c in group]

    def locate(self, images: Sequence[Image.Image], expressions: Sequence[str], options: GenerateOptions | None = None) -> list[Located]:
        """K answers per expression, expression-major; `options=None` is greedy within `_locate_budget` tokens."""
        prompts = [self.profile.rec_prompt(e) for e in expressions]
        options = options or GenerateOptions(max_new_tokens=self._locate_budget(expressions))
        groups = self.generate(images, prompts, options)
        return [Located(self.profile.read_box(c.text, img.size), c.text) for img, group in zip(images, groups, strict=True) for c in group]

    def _locate_budget(self, expressions: Sequence[str]) -> int:
        """Greedy REC token budget: the token length of this family's own REC answer for the longest
        expression and a box with four-digit coordinates, plus 8 spare tokens; at least 32. Families
        that repeat the expression around the box (Qwen-VL, InternVL, Florence-2, PaliGemma) get
        room for long model-written captions; refloop-tiny's short answer keeps 32."""
        longest = max(expressions, key=lambda e: len(self.tokenizer.encode(e, add_special_tokens=False)), default="")
        answer = self.profile.rec_answer(Box(1234.0, 1234.0, 2345.0, 2345.0), (4000, 4000), longest)
        return max(GREEDY.max_new_tokens, len(self.tokenizer.encode(answer, add_special_tokens=False)) + 8)

    def caption(self, images: Sequence[Image.Image], options: GenerateOptions = GREEDY) -> list[str]:
        """K = options.num_return_sequences captions per image, image-major."""
        prompts = [self.profile.caption_prompt()] * len(images)
        return [self.profile.read_caption(c.text) for group in self.generate(images, prompts, options) for c in group]

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], options: GenerateOptions = GREEDY) -> list[str]:
        """K = options.num_return_sequences answers per question, question-major. The question is the
        whole instruction inside the family's prompt, so its wording is the caller's."""
        prompts = [self.profile.prompt(q) for q in questions]
        return [self.profile.read_answer(c.text) for group in self.generate(images, prompts, options) for c in group]
