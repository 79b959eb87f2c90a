"""Coordinate codecs: `get_codec(name)` for each supported model family's box text."""

from __future__ import annotations

from collections.abc import Callable

from refloop.codecs.base import Codec, ImageSize
from refloop.codecs.formats import (
    InternVLCodec,
    JsonBBoxCodec,
    Kosmos2Codec,
    MiniGPTv2Codec,
    PinkCodec,
    florence2,
    paligemma,
    qwen2_vl,
    qwen_vl,
    smart_resize,
)

_FACTORIES: dict[str, Callable[..., Codec]] = {
    "qwen-vl": qwen_vl,
    "qwen2-vl": qwen2_vl,
    "qwen2.5-vl": lambda **kw: JsonBBoxCodec("qwen2.5-vl", relative_scale=None, **kw),
    "qwen3-vl": lambda **kw: JsonBBoxCodec("qwen3-vl", relative_scale=1000, **kw),
    "florence-2": florence2,
    "kosmos-2": Kosmos2Codec,
    "paligemma": paligemma,
    "minigpt-v2": MiniGPTv2Codec,
    "internvl": InternVLCodec,
    "pink": PinkCodec,
}
CODECS: tuple[str, ...] = tuple(_FACTORIES)


def get_codec(name: str, **options) -> Codec:
    """The codec of a model family. `options` reach codecs that need them (e.g. Qwen2.5-VL's
    resize factor and pixel budget, which decide the pixel frame its boxes are written in)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; supported: {', '.join(CODECS)}") from None
    return factory(**options)


__all__ = ["CODECS", "Codec", "ImageSize", "get_codec", "smart_resize"]
