"""torchvision without its C++ operators.

PyPI's torchvision wheels for Linux are CUDA builds: on a CPU-only torch their operator library
(`_C.so`, linked against libtorch_cuda) cannot load. torchvision is written to run without it
(`torchvision.extension._has_ops()` is then False and its operators raise a clear error when
called), except that its `_meta_registrations` module registers fake kernels for `torchvision::nms`
and `torchvision::qnms` unconditionally, and that fails because the operators were never
declared. So `import torchvision` fails, and with it every transformers module that imports it:
among them the Qwen2-VL image processor that vLLM's Qwen-VL models import.

`declare_missing_operators()` declares those two operators' schemas (no kernels) when the
extension cannot load, before torchvision is imported. torchvision's pure-PyTorch transforms
then work; calling `torchvision.ops.nms` still raises torchvision's own "Couldn't load custom C++
ops". Nothing happens when torchvision is absent or its extension loads. `refloop.models` calls
it on import. vLLM also imports model modules in fresh subprocesses, so the vLLM venv
(.ci/install-vllm) runs `install_import_hook()` from a .pth file: the declaration then happens in
any interpreter of that venv just before its first `import torchvision` (this module imports
nothing heavy until then).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # kept alive: the declarations live as long as this object


def declare_missing_operators() -> bool:
    """True when the schemas were declared here (torchvision present, its extension unloadable)."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    spec = _find_torchvision()
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    package = Path(next(iter(spec.submodule_search_locations)))
    extension = next((p for pattern in ("_C.so", "_C.*.so", "_C.pyd") for p in package.glob(pattern)), None)
    if extension is not None:
        try:
            torch.ops.load_library(str(extension))
            return False  # a build that matches this torch: nothing to do
        except (OSError, ImportError, RuntimeError):
            pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            library.define(schema)
    _library = library
    return True


def _find_torchvision():
    if _Hook.busy:
        return None
    _Hook.busy = True
    try:
        return importlib.util.find_spec("torchvision")
    finally:
        _Hook.busy = False


class _Hook:
    """A meta-path finder that declares the operators on the first `import torchvision`, then
    lets the normal import machinery find the package."""

    busy = False

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torchvision" and not cls.busy:
            sys.meta_path.remove(cls)
            declare_missing_operators()
        return None


def install_import_hook() -> None:
    if _Hook not in sys.meta_path and "torchvision" not in sys.modules:
        sys.meta_path.insert(0, _Hook)
