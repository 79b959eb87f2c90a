import importlib.util
import os

import pytest
import torch

os.environ.setdefault("REFLOOP_NO_PROGRESS", "1")
torch.set_num_threads(2)

# The vLLM backend's tests run in the vLLM venv, as .ci/run's separate step; where vllm is not
# installed (the main venv) they are not collected at all.
_vllm = importlib.util.find_spec("vllm")
collect_ignore = [] if _vllm is not None and _vllm.origin is not None else ["vllm_backend"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """World exports go to a per-session temp cache, never the user's ~/.cache."""
    monkeypatch.setenv("REFLOOP_CACHE", str(tmp_path_factory.getbasetemp() / "refloop-cache"))
