"""Tests of the vLLM backend: run only in the vLLM venv (`bash .ci/install-vllm`, then
`.venv-vllm/bin/python -m pytest -q tests/vllm_backend`); the main suite does not collect them (see
tests/conftest.py). One engine per model family, started once per module."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/families.py, tests/helpers.py

pytest.importorskip("vllm", reason="vLLM is not installed here (bash .ci/install-vllm)")
