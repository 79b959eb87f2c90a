"""Write a shapes-world split as real dataset files: PNG images, COCO-style detection JSON
(boxes and categories only) and RefCOCO-style referring JSONL (one line per referable object)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from refloop.errors import RefloopError
from refloop.world.domains import get_style
from refloop.world.grammar import referring_expressions
from refloop.world.render import render
from refloop.world.scene import SHAPES, sample_scene

COCO_FILE = "instances.json"
REFS_FILE = "refs.jsonl"
DONE_FILE = "export.json"


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


MAX_SCENES = 200_000  # about 4 GB of PNGs; more is almost surely a typo in --num-boxes


def export_split(domain: str, out_dir: str | Path, num_images: int, seed: int) -> Path:
    """Export scenes 0..num_images-1 of (domain, seed); reuses a finished identical export."""
    if not 1 <= num_images <= MAX_SCENES:
        raise RefloopError(f"a shapes-world split holds 1 to {MAX_SCENES} scenes, not {num_images} (each is a PNG on disk)")
    out = Path(out_dir)
    manifest = {"domain": domain, "seed": seed, "num_images": num_images, "format": 1}
    done = out / DONE_FILE
    if done.exists() and json.loads(done.read_text()) == manifest:
        return out
    style = get_style(domain)
    (out / "images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]
    cat_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    images, annotations, refs = [], [], []
    for index in range(num_images):
        scene = sample_scene(style, seed, index)
        file_name = f"images/{scene.image_id}.png"
        render(scene).save(out / file_name)
        images.append({"id": index, "file_name": file_name, "width": scene.width, "height": scene.height})
        for obj in scene.objects:
            ann_id = len(annotations) + 1
            attributes = {"colour": obj.colour, "size": obj.size}
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": index,
                    "category_id": cat_id[obj.shape],
                    "bbox": obj.box.as_xywh(),
                    "area": obj.box.area,
                    "iscrowd": 0,
                    "attributes": attributes,
                }
            )
            sentences = referring_expressions(scene, obj)
            if sentences:
                refs.append(
                    {
                        "ref_id": ann_id,
                        "image_id": index,
                        "file_name": file_name,
                        "width": scene.width,
                        "height": scene.height,
                        "bbox": obj.box.as_xywh(),
                        "category": obj.shape,
                        "sentences": sentences,
                    }
                )
    coco = {
        "info": {"description": f"refloop shapes world, domain {domain}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    _atomic_text(out / COCO_FILE, json.dumps(coco))
    _atomic_text(out / REFS_FILE, "".join(json.dumps(r) + "\n" for r in refs))
    _atomic_text(done, json.dumps(manifest))
    return out
