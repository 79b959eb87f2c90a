"""Small generated models and scenes shared by the tests."""

from __future__ import annotations

from pathlib import Path

from refloop.models.tiny.pretrain import PretrainConfig, build_model


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
    from refloop.methods.sctune import BoxItem

    scenes, images = scene_images(n)
    return [BoxItem("", o.box, image=img) for s, img in zip(scenes, images) for o in s.objects]
