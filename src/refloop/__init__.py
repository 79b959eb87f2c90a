"""refloop: make vision-language models self-consistent about the objects they talk about."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("refloop")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
