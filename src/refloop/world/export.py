"""Write a shapes-world split as real dataset files: PNG images, COCO-style detection JSON (every
object's box and category, and its colour and size as COCO `attributes`), COCO-style captions
(the grammar's caption of each scene), RefCOCO-style referring JSONL (one line per referable
object) and, on request, Visual Genome-style objects and relationships. Everything a method or
metric needs to know of a scene is in these files: nothing downstream regenerates scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from refloop.errors import RefloopError
from refloop.runs import replaced_whole, write_text_whole
from refloop.world.augment import degrade_image
from refloop.world.domains import get_style
from refloop.world.grammar import caption, referring_expressions
from refloop.world.relations import scene_relations
from refloop.world.render import render
from refloop.world.scene import SHAPES, ShapeObject, sample_scene

COCO_FILE = "instances.json"
CAPTIONS_FILE = "captions.json"
REFS_FILE = "refs.jsonl"
DONE_FILE = "export.json"
VG_IMAGES_FILE = "image_data.json"
VG_OBJECTS_FILE = "objects.json"
VG_RELATIONSHIPS_FILE = "relationships.json"
VG_DONE_FILE = "export_visual_genome.json"


# Every file of an export is written under a fresh name of its own and renamed into place
# (`replaced_whole`): processes that export one split at once (each rank of `accelerate launch` on
# a fresh cache) write the same bytes, and a reader never meets a half-written image or annotation file.
def _atomic_png(image, path: Path) -> None:
    with replaced_whole(path) as tmp:
        image.save(tmp, format="PNG")


MAX_SCENES = 200_000  # about 4 GB of PNGs; more is almost surely a typo in --num-boxes


def export_split(domain: str, out_dir: str | Path, num_images: int, seed: int, degrade_prob: float = 0.0) -> Path:
    """Export scenes 0..num_images-1 of (domain, seed); reuses a finished identical export.
    `degrade_prob`: the probability that a scene's image is drawn degraded (`degrade_image`: busy
    background, shifted shades, jitter, low contrast, blur, noise, occluders; seeded by the scene),
    a training augmentation: the annotations are the scene's either way."""
    if not 1 <= num_images <= MAX_SCENES:
        raise RefloopError(f"a shapes-world split holds 1 to {MAX_SCENES} scenes, not {num_images} (each is a PNG on disk)")
    out = Path(out_dir)
    manifest = {"domain": domain, "seed": seed, "num_images": num_images, "format": 2}  # 2: with captions.json
    if degrade_prob > 0:
        manifest["degrade_prob"] = degrade_prob
    done = out / DONE_FILE
    if done.exists() and json.loads(done.read_text()) == manifest:
        return out
    style = get_style(domain)
    (out / "images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]
    cat_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    images, annotations, refs, captions = [], [], [], []
    for index in range(num_images):
        scene = sample_scene(style, seed, index)
        file_name = f"images/{scene.image_id}.png"
        image = render(scene)
        if degrade_prob > 0:
            rng = np.random.default_rng([seed, index, 97])  # the scene's own draw: any export of it degrades it alike
            if rng.random() < degrade_prob:
                image = degrade_image(scene, image, rng)
        _atomic_png(image, out / file_name)
        images.append({"id": index, "file_name": file_name, "width": scene.width, "height": scene.height})
        captions.append({"id": index + 1, "image_id": index, "caption": caption(scene)})
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
    write_text_whole(out / COCO_FILE, json.dumps(coco))
    write_text_whole(out / CAPTIONS_FILE, json.dumps({"info": coco["info"], "images": images, "annotations": captions}))
    write_text_whole(out / REFS_FILE, "".join(json.dumps(r) + "\n" for r in refs))
    write_text_whole(done, json.dumps(manifest))
    return out


def _vg_object(ann_id: int, obj: ShapeObject) -> dict:
    x, y, w, h = obj.box.as_xywh()
    return {"object_id": ann_id, "x": x, "y": y, "w": w, "h": h, "names": [obj.shape], "synsets": []}


def export_visual_genome(domain: str, out_dir: str | Path, num_images: int, seed: int) -> Path:
    """The split of `export_split` (written first, or reused) plus its objects and relations in
    Visual Genome's layout: image_data.json, objects.json and relationships.json (every ordered
    object pair's predicates from `scene_relations`).

    Ids are those of instances.json: VG image_id = COCO image id, object_id = annotation id. VG
    keeps images as {image_id}.jpg; these are the split's PNGs, named by each entry's `url`
    (relative to `out_dir`), so join pixels through instances.json and read relations from here.
    """
    out = export_split(domain, out_dir, num_images, seed)
    manifest = {"domain": domain, "seed": seed, "num_images": num_images, "format": 1}
    done = out / VG_DONE_FILE
    if done.exists() and json.loads(done.read_text()) == manifest:
        return out
    style = get_style(domain)
    image_data, objects, relationships = [], [], []
    ann_id = relationship_id = 0  # annotation ids run over the split in scene order, as in export_split
    for index in range(num_images):
        scene = sample_scene(style, seed, index)
        entries = [_vg_object(ann_id + k + 1, obj) for k, obj in enumerate(scene.objects)]
        ann_id += len(entries)
        image_data.append(
            {
                "image_id": index,
                "width": scene.width,
                "height": scene.height,
                "url": f"images/{scene.image_id}.png",
                "coco_id": index,
                "flickr_id": None,
            }
        )
        objects.append({"image_id": index, "objects": entries})
        triplets = [
            {"relationship_id": relationship_id + n + 1, "predicate": predicate, "synsets": [], "subject": entries[i], "object": entries[j]}
            for n, (i, predicate, j) in enumerate(scene_relations(scene))
        ]
        relationship_id += len(triplets)
        relationships.append({"image_id": index, "relationships": triplets})
    write_text_whole(out / VG_IMAGES_FILE, json.dumps(image_data))
    write_text_whole(out / VG_OBJECTS_FILE, json.dumps(objects))
    write_text_whole(out / VG_RELATIONSHIPS_FILE, json.dumps(relationships))
    write_text_whole(done, json.dumps(manifest))
    return out
