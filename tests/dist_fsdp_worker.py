"""Run by `accelerate launch` in tests/test_fsdp.py: SC-Tune, then the adapters (gathered whole)
saved by the main process. argv: OUT TUNE MODEL [STOP_AT]; MODEL is `random` (a tiny random
refloop-tiny: rewards are 0) or `packaged` (refloop-tiny itself: real rewards, so PPO moves)."""

import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from helpers import scene_box_items, tiny_random_model  # noqa: E402

from refloop.methods.sctune import SCTune, SCTuneConfig  # noqa: E402
from refloop.models import load_vlm  # noqa: E402
from refloop.models.hf import HFVLM  # noqa: E402
from refloop.models.profiles import TinyProfile  # noqa: E402
from refloop.parallel import end_process_group  # noqa: E402
from refloop.training.adapters import LoraSettings  # noqa: E402

out, tune, which = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
stop_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
torch.set_num_threads(1)
state = PartialState(cpu=True)
if which == "packaged":
    vlm = load_vlm("refloop-tiny", device="cpu", batch_size=8)
else:
    model, processor = tiny_random_model()
    vlm = HFVLM(model, processor, TinyProfile(), batch_size=8)
cfg = SCTuneConfig(
    phases=2,
    tune=tune,
    describer_steps=2,
    locator_steps=2,
    batch_size=4,
    describer_lr=1e-2,
    locator_lr=1e-2,
    max_new_tokens=6,
    baseline="group",
    group_size=2,
    top_p=1.0,
    lora=LoraSettings(r=4, alpha=8),
    checkpoint_every=2,
)
tuner = SCTune.from_base(vlm, cfg, scene_box_items(4))


def stop(row: dict) -> None:
    if stop_at is not None and row["step"] == stop_at:
        raise SystemExit(3)


tuner.run(out / "train", progress=stop)
tensors = {f"{role}/{k}": v.contiguous() for role in ("describer", "locator") for k, v in tuner.adapters.adapter_state(role).items()}
if state.is_main_process:
    save_file(tensors, str(out / "adapters.safetensors"))
print("world", state.num_processes, "sharded", tuner.adapters.sharded)
end_process_group()  # before the interpreter ends: gloo threads left to exit can abort it
