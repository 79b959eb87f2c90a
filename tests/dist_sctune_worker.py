"""Run by `accelerate launch` in test_sctune_distributed: two processes tune, each saves its adapters."""

import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from helpers import scene_box_items, tiny_random_model  # noqa: E402

from refloop.methods.sctune import SCTune, SCTuneConfig  # noqa: E402
from refloop.models.hf import HFVLM  # noqa: E402
from refloop.models.profiles import TinyProfile  # noqa: E402
from refloop.parallel import end_process_group  # noqa: E402
from refloop.training.adapters import LoraSettings  # noqa: E402

out = Path(sys.argv[1])
torch.set_num_threads(1)
state = PartialState(cpu=True)
model, processor = tiny_random_model()
vlm = HFVLM(model, processor, TinyProfile(), batch_size=8)
train = scene_box_items(4)
cfg = SCTuneConfig(
    phases=2,
    describer_steps=2,
    locator_steps=2,
    batch_size=4,
    describer_lr=1e-2,
    locator_lr=1e-2,
    max_new_tokens=4,
    lora=LoraSettings(r=4, alpha=8),
    checkpoint_every=2,
)
tuner = SCTune.from_base(vlm, cfg, train)
tuner.run(out / "train")
tensors = {f"{role}/{k}": v.contiguous() for role in ("describer", "locator") for k, v in tuner.adapters.adapter_state(role).items()}
save_file(tensors, str(out / f"rank{state.process_index}.safetensors"))
print("world", state.num_processes)
end_process_group()  # before the interpreter ends: gloo threads left to exit can abort it
