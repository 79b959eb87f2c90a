"""Small generated models and scenes shared by the tests."""

from __future__ import annotations

from pathlib import Path

from refloop.methods.pretrain import PretrainConfig, build_model


def tiny_random_model(hidden: int = 32, layers: int = 2, seed: int = 0):
    cfg = PretrainConfig(hidden_size=hidden, num_layers=layers, num_heads=2, seed=seed)
    model, processor = build_model(cfg)
    model.eval()
    return model, processor


def save_tiny_random(path: Path, **kw) -> Path:
    model, processor = tiny_random_model(**kw)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def scene_images(n: int, domain: str = "in-domain"):
    from refloop.world import get_style, render, sample_scene

    scenes = [sample_scene(get_style(domain), 5, i) for i in range(n)]
    return scenes, [render(s) for s in scenes]


def scene_box_items(n: int = 4):
    """SC-Tune training items: every object box of n in-domain scenes, images in memory."""
    from refloop.data.records import BoxItem

    scenes, images = scene_images(n)
    return [BoxItem("", o.box, image=img) for s, img in zip(scenes, images) for o in s.objects]


class ScriptedProfile:
    """REG prompts that name the box's left edge; expressions read back unchanged."""

    def reg_prompt(self, box, size) -> str:
        return f"box {box.x1:.0f}"

    def read_expression(self, text: str) -> str:
        return text


class ScriptedVLM:
    """A VLM double: describes every box as `box <x1>` (sample j of K adds ` #j` for j > 0) and
    locates a scripted box for each description (None: the answer does not parse)."""

    name = "scripted"
    profile = ScriptedProfile()

    def __init__(self, answers: dict) -> None:
        self.answers = answers

    def generate(self, images, prompts, options=None):
        from refloop.models.base import Completion

        k = options.num_return_sequences if options else 1
        return [[Completion(p if j == 0 else f"{p} #{j}", ()) for j in range(k)] for p in prompts]

    def describe(self, images, boxes, options=None):
        return [c.text for g in self.generate(images, [self.profile.reg_prompt(b, None) for b in boxes], options) for c in g]

    def locate(self, images, expressions, options=None):
        from refloop.models.base import Located

        return [Located(self.answers.get(e), "text") for e in expressions]


def run_cli(args: list[str], capsys=None) -> tuple[int, str, str]:
    """`refloop ARGS` in this process through the real entry point (its error handler included):
    (exit code, stdout, stderr with whitespace folded; without `capsys`, empty). Torch's thread
    count is restored afterwards (`--threads` would change it for every later test)."""
    import sys

    import torch

    from refloop import cli

    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["refloop", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, " ".join(err.split())


def assert_refused(result, *fragments: str) -> None:
    """A `run_cli` result of the failure policy: exit 2, one `error:` line holding each fragment, no traceback."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
