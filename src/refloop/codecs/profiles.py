"""Prompt profiles: how one model family is asked for REG, REC and captions, and how its
answers are read. Training and inference build text from the same profile, so they cannot drift."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from refloop.boxes import Box
from refloop.codecs import Codec, ImageSize, get_codec
from refloop.errors import RefloopError


@dataclass
class PromptProfile:
    """A model family's conventions. Subclasses override what differs."""

    name: str
    codec: Codec
    # Values given to per-token side inputs (Qwen-VL's mm_token_type_ids, Kosmos-2's
    # image_embeds_position_mask, PaliGemma's token_type_ids) on appended answer tokens, as the
    # family's own generate() extends them. Keys not listed get 0.
    completion_fill: dict[str, int] = field(default_factory=dict)
    # Generate only in batches of equal prompt length: the family's incremental decoding
    # mis-positions left-padded rows (Kosmos-2 counts pads into its position ids after the first step).
    unpadded_generation: bool = False
    # What the family writes around generated text (markers, location tokens), removed when it is read.
    tags: ClassVar[re.Pattern | None] = None

    @property
    def frame(self) -> dict[str, int]:
        """The pixel frame the codec writes boxes in (Qwen2.5-VL: the processor's resize factor and
        pixel limits; empty for codecs that write normalised or original-image coordinates). Data
        written under one frame is wrong for a model with another."""
        return {k: getattr(self.codec, k) for k in ("factor", "min_pixels", "max_pixels") if hasattr(self.codec, k)}

    @property
    def frame_text(self) -> str:
        """`frame` as one string ("factor=28,min_pixels=3136,max_pixels=12544"; "" for none), as
        rc.jsonl records it (a flat string column loads in `datasets` and parquet alike)."""
        return ",".join(f"{k}={v}" for k, v in self.frame.items())

    def prompt(self, instruction: str) -> str:
        """Full model input text around one image placeholder."""
        raise NotImplementedError

    def reg_instruction(self, box: Box, image_size: ImageSize) -> str:
        raise NotImplementedError

    def rec_instruction(self, expression: str) -> str:
        raise NotImplementedError

    def caption_instruction(self) -> str:
        raise NotImplementedError

    def grounded_caption_instruction(self, context: str) -> str:
        """The caption instruction with a grounding written as text ahead of it (SVP's q(z | c, g),
        appendix F), in our own words; an empty context gives the plain caption instruction, so
        an image whose grounding found nothing is asked exactly what p(z | c) is asked."""
        if not context.strip():
            return self.caption_instruction()
        return f"Objects detected in the image, possibly incomplete or wrong:\n{context}\n{self.caption_instruction()}"

    def rec_answer(self, box: Box, image_size: ImageSize, expression: str = "") -> str:
        """The target text of a REC answer (what a locator is trained to write)."""
        return self.codec.encode(box, image_size)

    def decode(self, tokenizer, ids: list[int]) -> str:
        """Generated ids to text. Structural tokens (box markers, location tokens) are often
        'special' in released tokenizers, so only control tokens are dropped."""
        control = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        return tokenizer.decode([t for t in ids if t not in control], skip_special_tokens=False).strip()

    def read_expression(self, text: str) -> str:
        """Strip what a family adds around a generated referring expression; spacing collapsed."""
        return _strip(text, self.tags)

    def read_caption(self, text: str) -> str:
        return self.read_expression(text)

    def read_answer(self, text: str) -> str:
        """An answer to a question with the family's tags removed, its line breaks and spacing kept:
        the POPE release reads the answer as the model wrote it (stripped), split on single spaces,
        so "No\n\nThe image shows..." is no "No" there."""
        return (self.tags.sub(" ", text) if self.tags is not None else text).strip()

    def read_box(self, text: str, image_size: ImageSize) -> Box | None:
        """The first box of an answer, by the codec's rule for model-written boxes; None: unparseable."""
        return self.codec.parse_first(text, image_size)

    # Convenience: whole prompts.
    def reg_prompt(self, box: Box, image_size: ImageSize) -> str:
        return self.prompt(self.reg_instruction(box, image_size))

    def rec_prompt(self, expression: str) -> str:
        return self.prompt(self.rec_instruction(expression))

    def caption_prompt(self) -> str:
        return self.prompt(self.caption_instruction())

    def grounded_caption_prompt(self, context: str) -> str:
        return self.prompt(self.grounded_caption_instruction(context))


_CELL = re.compile(r"<cell_\d+>")


class TinyProfile(PromptProfile):
    """refloop-tiny: '<image> INSTRUCTION <sep>' then the answer and <eos>. The image comes first
    so image tokens see nothing but the image (see the model's docstring).

    REG names the box in minigpt-v2 integers followed by a <region> token (the model pools the
    box's features there); a REC answer is a pointer token for the grid cell of the box centre,
    then the box.
    """

    tags = _CELL

    def __init__(self, grid_size: int = 7) -> None:
        super().__init__(name="refloop-tiny", codec=get_codec("minigpt-v2"))
        self.grid_size = grid_size

    def prompt(self, instruction: str) -> str:
        return f"<image> {instruction} <sep>"

    def reg_instruction(self, box: Box, image_size: ImageSize) -> str:
        return f"describe {self.codec.encode(box, image_size)} <region>"

    def rec_instruction(self, expression: str) -> str:
        return f"locate {expression}"

    def caption_instruction(self) -> str:
        return "caption"

    def grounded_caption_instruction(self, context: str) -> str:
        """'<entries> caption': the word-level vocabulary has no room for a sentence of
        instructions, and the context's labels and box tokens are words it knows."""
        context = " ".join(context.split())
        return f"{context} {self.caption_instruction()}" if context else self.caption_instruction()

    def cell_of(self, box: Box, image_size: ImageSize) -> int:
        w, h = image_size
        cx, cy = box.center
        gx = min(max(int(cx / w * self.grid_size), 0), self.grid_size - 1)
        gy = min(max(int(cy / h * self.grid_size), 0), self.grid_size - 1)
        return gy * self.grid_size + gx

    def rec_answer(self, box: Box, image_size: ImageSize, expression: str = "") -> str:
        return f"<cell_{self.cell_of(box, image_size)}> {self.codec.encode(box, image_size)}"

    def decode(self, tokenizer, ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _strip(text: str, pattern: re.Pattern | None) -> str:
    if pattern is not None:
        text = pattern.sub(" ", text)
    return " ".join(text.split())


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


class ChatProfile(PromptProfile):
    """ChatML families (Qwen2/2.5/3-VL, InternVL): one user turn holding the image, then the
    assistant turn the model completes; the strings their chat templates render."""

    image: str = ""
    system: str | None = None

    def prompt(self, instruction: str) -> str:
        head = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system else ""
        return f"{head}<|im_start|>user\n{self.image}{instruction}<|im_end|>\n<|im_start|>assistant\n"

    def caption_instruction(self) -> str:
        return "Describe this image in one sentence."


_QWEN2_TAGS = re.compile(r"<\|(object_ref_start|object_ref_end|im_end|endoftext)\|>|<\|box_start\|>.*?(<\|box_end\|>|$)")


class Qwen2VLProfile(ChatProfile):
    """Qwen2-VL: boxes '<|box_start|>(x1,y1),(x2,y2)<|box_end|>' on 0..1000; grounded phrases
    inside '<|object_ref_start|>...<|object_ref_end|>' (model card / Qwen2-VL report)."""

    tags = _QWEN2_TAGS

    image = QWEN_IMAGE
    system = "You are a helpful assistant."

    def __init__(self) -> None:
        super().__init__(name="qwen2-vl", codec=get_codec("qwen2-vl"))

    def reg_instruction(self, box: Box, image_size: ImageSize) -> str:
        return f"Give a short phrase that identifies the object in {self.codec.encode(box, image_size)}."

    def rec_instruction(self, expression: str) -> str:
        return f"Find <|object_ref_start|>{expression}<|object_ref_end|> in the image and give its bounding box."

    def rec_answer(self, box: Box, image_size: ImageSize, expression: str = "") -> str:
        return f"<|object_ref_start|>{expression}<|object_ref_end|>{self.codec.encode(box, image_size)}"


_FENCE = re.compile(r"```(json)?|<\|im_end\|>")


class QwenJsonProfile(ChatProfile):
    """Qwen2.5-VL and Qwen3-VL: grounding answers are a JSON list of {"bbox_2d": [...], "label"}
    in a ```json fence. Qwen2.5-VL writes absolute pixels of the *resized* input (the codec
    recomputes the processor's smart_resize from its settings); Qwen3-VL writes 0..1000."""

    tags = _FENCE

    image = QWEN_IMAGE

    def __init__(self, name: str, codec: Codec, system: str | None) -> None:
        super().__init__(name=name, codec=codec)
        self.system = system

    def reg_instruction(self, box: Box, image_size: ImageSize) -> str:
        x1, y1, x2, y2 = self.codec.coordinates(box, image_size)
        return f"Give a short phrase that identifies the object at bbox_2d [{x1}, {y1}, {x2}, {y2}]."

    def rec_instruction(self, expression: str) -> str:
        return f"Locate {expression} in the image and output its bbox coordinates in JSON format."

    def rec_answer(self, box: Box, image_size: ImageSize, expression: str = "") -> str:
        x1, y1, x2, y2 = self.codec.coordinates(box, image_size)
        label = json.dumps(expression or "object")
        return f'```json\n[\n\t{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": {label}}}\n]\n```'


def qwen25_vl_profile(processor=None) -> QwenJsonProfile:
    """The pixel frame follows the processor's resize settings (defaults: the released ones)."""
    options = {}
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        size = getattr(image_processor, "size", None)
        min_pixels = getattr(size, "shortest_edge", None) or getattr(image_processor, "min_pixels", None)
        max_pixels = getattr(size, "longest_edge", None) or getattr(image_processor, "max_pixels", None)
        options = {"factor": image_processor.patch_size * image_processor.merge_size}
        options.update({k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v})
    return QwenJsonProfile("qwen2.5-vl", get_codec("qwen2.5-vl", **options), system="You are a helpful assistant.")


def qwen3_vl_profile(processor=None) -> QwenJsonProfile:
    return QwenJsonProfile("qwen3-vl", get_codec("qwen3-vl"), system=None)


_INTERNVL_TAGS = re.compile(r"</?ref>|<box>.*?(</box>|$)|<\|im_end\|>")


class InternVLProfile(ChatProfile):
    """InternVL (hf checkpoints): '<ref>phrase</ref><box>[[x1, y1, x2, y2]]</box>' on 0..1000,
    with the REC/REG prompts of InternVL's grounding evaluation."""

    tags = _INTERNVL_TAGS

    image = "<IMG_CONTEXT>\n"

    def __init__(self) -> None:
        super().__init__(name="internvl", codec=get_codec("internvl"))

    def reg_instruction(self, box: Box, image_size: ImageSize) -> str:
        return f"Please provide a short description for this region: {self.codec.encode(box, image_size)}"

    def rec_instruction(self, expression: str) -> str:
        return f"Please provide the bounding box coordinate of the region this sentence describes: <ref>{expression}</ref>"

    def rec_answer(self, box: Box, image_size: ImageSize, expression: str = "") -> str:
        return f"<ref>{expression}</ref>{self.codec.encode(box, image_size)}"


_LOC = re.compile(r"<loc_?\d+>|<seg\d+>")


class Florence2Profile(PromptProfile):
    """Florence-2 task tokens (the processor expands them into its prompts): REG is
    '<REGION_TO_DESCRIPTION>' + four '<loc_N>', REC '<CAPTION_TO_PHRASE_GROUNDING>' + phrase,
    answered 'phrase<loc_x1><loc_y1><loc_x2><loc_y2>'. Encoder-decoder."""

    tags = _LOC

    def __init__(self) -> None:
        super().__init__(name="florence-2", codec=get_codec("florence-2"))

    def prompt(self, instruction: str) -> str:
        return instruction

    def reg_instruction(self, box: Box, image_size: ImageSize) -> str:
        return f"<REGION_TO_DESCRIPTION>{self.codec.encode(box, image_size)}"

    def rec_instruction(self, expression: str) -> str:
        return f"<CAPTION_TO_PHRASE_GROUNDING>{expression}"

    def caption_instruction(self) -> str:
        return "<CAPTION>"

    def grounded_caption_instruction(self, context: str) -> str:
        """Florence-2's processor accepts a task token only as the whole prompt: no room for context."""
        if context.strip():
            raise RefloopError("Florence-2's caption task takes no text besides its task token: it cannot be given a grounding context")
        return self.caption_instruction()

    def rec_answer(self, box: Box, image_size: ImageSize, expression: str = "") -> str:
        return f"{expression}{self.codec.encode(box, image_size)}"


_KOSMOS_TAGS = re.compile(r"<object>.*?(</object>|$)|</?phrase>|<grounding>|</delimiter_of_multi_objects/>")


class Kosmos2Profile(PromptProfile):
    """Kosmos-2 (model card): '<grounding>' grounded generation; a box is
    '<object><patch_index_UL><patch_index_LR></object>' on a 32x32 grid. REC continues
    '<grounding><phrase> expr</phrase>' with the box; REG continues a phrase already tied to the
    box ('<phrase> It</phrase><object>...</object> is'), as the card's referring example does."""

    tags = _KOSMOS_TAGS

    def __init__(self) -> None:
        super().__init__(name="kosmos-2", codec=get_codec("kosmos-2"), unpadded_generation=True)

    def prompt(self, instruction: str) -> str:
        return instruction  # the processor puts '<s><image>...</image>' in front

    def reg_instruction(self, box: Box, image_size: ImageSize) -> str:
        return f"<grounding><phrase> It</phrase>{self.codec.encode(box, image_size)} is"

    def rec_instruction(self, expression: str) -> str:
        return f"<grounding><phrase> {expression}</phrase>"

    def caption_instruction(self) -> str:
        return "<grounding>An image of"

    def read_expression(self, text: str) -> str:
        return super().read_expression(text).rstrip(".").strip()


class PaliGemmaProfile(PromptProfile):
    """PaliGemma / PaliGemma 2 task prefixes: 'detect expr' answered '<locY1><locX1><locY2><locX2> expr'
    (1024 bins, y first), 'caption en'. The model card defines no region-description task; refloop
    asks 'describe <loc...>' (fine-tune before expecting sense). Answer tokens are the 'suffix'
    (token_type_ids 1: causal attention), the prompt the bidirectional prefix."""

    tags = _LOC

    def __init__(self) -> None:
        super().__init__(name="paligemma", codec=get_codec("paligemma"), completion_fill={"token_type_ids": 1})

    def prompt(self, instruction: str) -> str:
        return f"<image>{instruction}"  # the processor adds <bos> and the '\\n' that ends the prefix

    def reg_instruction(self, box: Box, image_size: ImageSize) -> str:
        return f"describe {self.codec.encode(box, image_size)}"

    def rec_instruction(self, expression: str) -> str:
        return f"detect {expression}"

    def caption_instruction(self) -> str:
        return "caption en"

    def rec_answer(self, box: Box, image_size: ImageSize, expression: str = "") -> str:
        return f"{self.codec.encode(box, image_size)} {expression}".rstrip()


# Profile name -> factory(processor). Recipes and --profile use these names.
PROFILES: dict[str, Callable[..., PromptProfile]] = {
    "refloop-tiny": lambda processor=None: TinyProfile(),
    "qwen2-vl": lambda processor=None: Qwen2VLProfile(),
    "qwen2.5-vl": qwen25_vl_profile,
    "qwen3-vl": qwen3_vl_profile,
    "florence-2": lambda processor=None: Florence2Profile(),
    "kosmos-2": lambda processor=None: Kosmos2Profile(),
    "paligemma": lambda processor=None: PaliGemmaProfile(),
    "internvl": lambda processor=None: InternVLProfile(),
}
# config.model_type -> profile name (PaliGemma 2 keeps model_type 'paligemma').
MODEL_TYPES = {
    "refloop-tiny": "refloop-tiny",
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen3_vl": "qwen3-vl",
    "qwen3_vl_moe": "qwen3-vl",
    "florence2": "florence-2",
    "kosmos-2": "kosmos-2",
    "paligemma": "paligemma",
    "internvl": "internvl",
}


def get_profile(name: str, processor=None) -> PromptProfile:
    try:
        factory = PROFILES[name]
    except KeyError:
        raise RefloopError(f"unknown prompt profile {name!r}; supported: {', '.join(PROFILES)}") from None
    return factory(processor=processor)


def profile_for_config(config, processor=None) -> PromptProfile:
    """The profile of a checkpoint, chosen from its config's model_type."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise RefloopError(
            f"no prompt profile for model_type {model_type!r}; supported model types: {', '.join(MODEL_TYPES)} "
            f"(or pass a profile by name: {', '.join(PROFILES)})"
        )
    return get_profile(MODEL_TYPES[model_type], processor)
