"""Prompt profiles: how one model family is asked for REG, REC and captions, and how its
answers are read. Training and inference build text from the same profile, so they cannot drift."""

from __future__ import annotations

import re
from dataclasses import dataclass

from refloop.boxes import Box
from refloop.codecs import Codec, ImageSize, get_codec


@dataclass
class PromptProfile:
    """A model family's conventions. Subclasses override what differs."""

    name: str
    codec: Codec

    def prompt(self, instruction: str) -> str:
        """Full model input text around one image placeholder."""
        raise NotImplementedError

    def reg_instruction(self, box: Box, image_size: ImageSize) -> str:
        raise NotImplementedError

    def rec_instruction(self, expression: str) -> str:
        raise NotImplementedError

    def caption_instruction(self) -> str:
        raise NotImplementedError

    def rec_answer(self, box: Box, image_size: ImageSize) -> str:
        """The target text of a REC answer (what a locator is trained to write)."""
        return self.codec.encode(box, image_size)

    def read_expression(self, text: str) -> str:
        """Strip what a family adds around a generated referring expression."""
        return " ".join(text.split())

    def read_box(self, text: str, image_size: ImageSize) -> Box | None:
        return self.codec.parse_first(text, image_size)

    # Convenience: whole prompts.
    def reg_prompt(self, box: Box, image_size: ImageSize) -> str:
        return self.prompt(self.reg_instruction(box, image_size))

    def rec_prompt(self, expression: str) -> str:
        return self.prompt(self.rec_instruction(expression))

    def caption_prompt(self) -> str:
        return self.prompt(self.caption_instruction())


_CELL = re.compile(r"<cell_\d+>")


class TinyProfile(PromptProfile):
    """refloop-tiny: '<image> INSTRUCTION <sep>' then the answer and <eos>. The image comes first
    so image tokens see nothing but the image (see the model's docstring).

    REG names the box in minigpt-v2 integers followed by a <region> token (the model pools the
    box's features there); a REC answer is a pointer token for the grid cell of the box centre,
    then the box.
    """

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

    def cell_of(self, box: Box, image_size: ImageSize) -> int:
        w, h = image_size
        cx, cy = box.center
        gx = min(max(int(cx / w * self.grid_size), 0), self.grid_size - 1)
        gy = min(max(int(cy / h * self.grid_size), 0), self.grid_size - 1)
        return gy * self.grid_size + gx

    def rec_answer(self, box: Box, image_size: ImageSize) -> str:
        return f"<cell_{self.cell_of(box, image_size)}> {self.codec.encode(box, image_size)}"

    def read_expression(self, text: str) -> str:
        return " ".join(_CELL.sub(" ", text).split())


_PROFILES = {"refloop-tiny": TinyProfile}


def profile_for_config(config) -> PromptProfile:
    """The profile of a checkpoint, chosen from its config's model_type."""
    model_type = getattr(config, "model_type", None)
    if model_type in _PROFILES:
        return _PROFILES[model_type]()
    raise ValueError(f"no prompt profile for model_type {model_type!r}; supported: {', '.join(sorted(_PROFILES))}")
