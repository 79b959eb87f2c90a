"""Supervised losses on answer tokens (SC-Tune Eq. 4, Pink and SVP instruction tuning)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from refloop.models.base import VLM
from refloop.training.ppo import pad_rows


def answer_nll(
    vlm: VLM,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    targets: Sequence[Sequence[int]],
    num_tokens: int | None = None,
) -> torch.Tensor:
    """-sum_t log p(a_t | image, prompt, a_<t) over the answer tokens only, divided by
    `num_tokens` (default: these answers' token count). Prompt and padding positions carry no
    loss. Passing the whole minibatch's count makes micro-batch losses sum to the minibatch's."""
    logp, mask = pad_rows(vlm.logprobs(images, prompts, targets, grad=True))
    n = num_tokens if num_tokens is not None else max(sum(len(t) for t in targets), 1)
    return -(logp * mask).sum() / n
