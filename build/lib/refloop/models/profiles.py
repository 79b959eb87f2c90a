"""Prompt profiles live beside the codecs (`refloop.codecs.profiles`: pure text, no model); this
module keeps the old import path working."""

from refloop.codecs.profiles import *  # noqa: F403
