"""Word-level tokenizer (built offline) and processor of refloop-tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import BatchFeature, PreTrainedTokenizerFast

from refloop.world import vocabulary

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<region>", "<sep>"]
NUM_COORD_BINS = 101  # minigpt-v2 style integer coordinates 0..100
NUM_CELLS = 49
NUM_RESERVED = 32
# Instruction words of the tiny prompt profile, plus words later methods' prompts use.
INSTRUCTION_WORDS = [
    "describe",
    "locate",
    "caption",
    "image",
    "region",
    "objects",
    "with",
    "grounding",
    "in",
    "of",
    "this",
    "what",
    "where",
    "how",
    "many",
    "are",
    "which",
    "count",
    "detect",
    "all",
    "near",
    "next",
    "to",
    "above",
    "below",
    "between",
    "one",
    "it",
    "an",
    ".",
    ":",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
]
# Coordinate/pointer tokens are single units; words and punctuation split as usual.
_PRETOKENIZE = r"<[^<>\s]+>|[{}()\[\],.?:;!]|[^\s<>{}()\[\],.?:;!]+"


def coord_token(value: int) -> str:
    return f"<{value}>"


def cell_token(index: int) -> str:
    return f"<cell_{index}>"


def build_vocab() -> list[str]:
    words = list(dict.fromkeys(INSTRUCTION_WORDS + vocabulary()))
    tokens = SPECIAL_TOKENS + [coord_token(i) for i in range(NUM_COORD_BINS)] + [cell_token(i) for i in range(NUM_CELLS)]
    tokens += [w for w in words if w not in tokens]
    tokens += [f"<extra_{i}>" for i in range(NUM_RESERVED)]
    return tokens


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(build_vocab())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<image>", "<region>", "<sep>"],
        padding_side="left",
    )


def distinct_images(images: list[Image.Image]) -> tuple[list[Image.Image], list[int]]:
    """The distinct images of `images` (first occurrences, in order) and each image's position
    among them. The same object is recognised at once; other images by size, mode and pixels."""
    distinct: list[Image.Image] = []
    by_object: dict[int, int] = {}
    by_pixels: dict[tuple, int] = {}
    index = []
    for img in images:
        found = by_object.get(id(img))
        if found is None:
            key = (img.size, img.mode, img.tobytes())
            found = by_pixels.get(key)
            if found is None:
                found = by_pixels[key] = len(distinct)
                distinct.append(img)
            by_object[id(img)] = found
        index.append(found)
    return distinct, index


class RefloopTinyProcessor:
    """Turns (image, prompt) pairs into model inputs.

    A prompt holds one "<image>" placeholder, expanded to one token per grid cell. Images are
    resized to the model's square input and scaled to [-1, 1].
    """

    config_name = "refloop_processor.json"
    supports_shared_images = True  # see __call__(share_images=...)

    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_size: int = 112, num_image_tokens: int = NUM_CELLS) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens

    def preprocess_images(self, images: list[Image.Image]) -> torch.Tensor:
        arrays = [
            np.asarray(img.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR), dtype=np.float32) for img in images
        ]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return batch / 127.5 - 1.0

    def expand_prompt(self, text: str) -> str:
        if text.count("<image>") != 1:
            raise ValueError(f"a refloop-tiny prompt needs exactly one <image> placeholder: {text!r}")
        return text.replace("<image>", " ".join(["<image>"] * self.num_image_tokens))

    def __call__(
        self,
        images: list[Image.Image] | None = None,
        text: list[str] | str | None = None,
        padding: bool | str = True,
        return_tensors: str = "pt",
        padding_side: str = "left",
        share_images: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """`share_images`: each distinct image is preprocessed and encoded once; `pixel_values`
        holds the distinct images and `image_index[i]` the row of prompt i (the same PIL object,
        or equal pixels, counts as one image). Off by default: callers that slice or reorder
        `pixel_values` per prompt (e.g. other trainers) get one row per prompt, as usual."""
        if isinstance(text, str):
            text = [text]
        data = {}
        if text is not None:
            enc = self.tokenizer(
                [self.expand_prompt(t) for t in text],
                padding=padding,
                padding_side=padding_side,
                return_tensors=return_tensors,
                add_special_tokens=False,
            )
            data.update(enc)
        if images is not None and share_images:
            distinct, index = distinct_images(list(images))
            data["pixel_values"] = self.preprocess_images(distinct)
            data["image_index"] = torch.tensor(index, dtype=torch.long)
        elif images is not None:
            data["pixel_values"] = self.preprocess_images(list(images))
        return BatchFeature(data=data, tensor_type=None)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        (path / self.config_name).write_text(
            json.dumps({"image_size": self.image_size, "num_image_tokens": self.num_image_tokens}, indent=2) + "\n"
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> RefloopTinyProcessor:
        """A local folder, or a hub id (read through the hub's cache, like the model's files)."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            settings_file, tokenizer = path / cls.config_name, PreTrainedTokenizerFast.from_pretrained(path)
        else:
            from huggingface_hub import hf_hub_download

            hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token") if kwargs.get(k) is not None}
            settings_file = Path(hf_hub_download(str(pretrained_model_name_or_path), cls.config_name, **hub))
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(pretrained_model_name_or_path), **hub)
        return cls(tokenizer, **json.loads(settings_file.read_text()))
