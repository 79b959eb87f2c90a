import hashlib
from pathlib import Path

import pytest

from refloop.world import DOMAINS, IN_DOMAIN, STYLES, caption, get_style, referring_expressions, render, sample_scene
from refloop.world.grammar import SPATIAL_MARGIN, SPATIAL_WORDS


def _digest(img) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


@pytest.mark.parametrize("domain", DOMAINS)
def test_scenes_and_images_are_deterministic_by_seed(domain):
    style = get_style(domain)
    a, b = sample_scene(style, 3, 17), sample_scene(style, 3, 17)
    assert a == b
    assert _digest(render(a)) == _digest(render(b))
    assert sample_scene(style, 4, 17) != a


def resolve(scene, expression: str):
    """An independent reading of an expression: the objects it can denote."""
    words = expression.split()
    assert words[0] == "the"
    words = words[1:]
    spatial = words.pop(0) if words[0] in SPATIAL_WORDS else None
    noun = words[-1]
    attrs = words[:-1]
    group = [o for o in scene.objects if (noun == "object" or o.shape == noun) and all(a in (o.size, o.colour) for a in attrs)]
    if spatial is None:
        return group
    key = {
        "left": lambda o: o.box.center[0],
        "right": lambda o: -o.box.center[0],
        "top": lambda o: o.box.center[1],
        "bottom": lambda o: -o.box.center[1],
    }[spatial]
    ranked = sorted(group, key=key)
    if len(ranked) > 1 and key(ranked[1]) - key(ranked[0]) < SPATIAL_MARGIN:
        return ranked[:2]  # not clearly extreme: ambiguous
    return ranked[:1]


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_expression_denotes_exactly_its_target(domain):
    style = get_style(domain)
    checked = 0
    for index in range(150):
        scene = sample_scene(style, 0, index)
        for obj in scene.objects:
            for expr in referring_expressions(scene, obj):
                assert resolve(scene, expr) == [obj], (scene.image_id, expr)
                checked += 1
    assert checked > 500


def test_in_domain_targets_often_need_disambiguation():
    style = get_style(IN_DOMAIN)
    shared_shape = spatial = total = 0
    for index in range(300):
        scene = sample_scene(style, 0, index)
        for obj in scene.objects:
            exprs = referring_expressions(scene, obj)
            if not exprs:
                continue
            total += 1
            shared_shape += sum(o.shape == obj.shape for o in scene.objects) > 1
            spatial += exprs[0].split()[1] in SPATIAL_WORDS
    assert shared_shape / total > 0.5
    assert spatial / total > 0.15


def test_out_of_domain_styles_really_differ():
    def stats(domain):
        style = get_style(domain)
        scenes = [sample_scene(style, 0, i) for i in range(200)]
        counts = [len(s.objects) for s in scenes]
        sides = [o.box.width for s in scenes for o in s.objects]
        pairs = {(o.colour, o.shape) for s in scenes for o in s.objects}
        return sum(counts) / len(counts), sum(sides) / len(sides), pairs

    n_in, side_in, pairs_in = stats("in-domain")
    n_crowded, side_crowded, _ = stats("crowded")
    _, _, pairs_wild = stats("wild")
    assert n_crowded > n_in + 2.5
    assert side_crowded < side_in - 3
    assert pairs_wild - pairs_in == set(STYLES["in-domain"].held_out)
    assert STYLES["wild"].background != STYLES["in-domain"].background


def test_caption_counts_objects():
    scene = sample_scene(get_style("crowded"), 0, 5)
    text = caption(scene)
    from refloop.world.grammar import NUMBER_WORDS

    total = 0
    for part in text.replace(" and ", " , ").split(" , "):
        total += NUMBER_WORDS.index(part.split()[0])
    assert total == len(scene.objects)


def test_domains_list_names_in_domain_first():
    assert DOMAINS[0] == "in-domain" and len(DOMAINS) >= 3


def _export_and_read(out: str) -> list[str]:
    from PIL import Image

    from refloop.world.export import export_split

    path = export_split("crowded", out, 12, 5)
    for png in sorted((path / "images").glob("*.png")):
        Image.open(png).load()  # a half-written image would not decode
    return sorted(p.name for p in path.iterdir() if not p.name.endswith(".tmp"))  # another process may be mid-write


def test_processes_exporting_one_split_at_once_never_expose_half_written_files(tmp_path):
    """Every rank of a launch on a fresh cache exports the same split: files are renamed into
    place, so each process reads whole files and the split ends as one export."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(3) as pool:
        listings = pool.map(_export_and_read, [str(tmp_path)] * 3)
    assert listings[0] == listings[1] == listings[2] == ["captions.json", "export.json", "images", "instances.json", "refs.jsonl"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_render_can_take_one_factor_of_a_style_away():
    scene = sample_scene(get_style("wild"), 7, 3)
    assert render(scene, "texture", True).tobytes() == render(scene).tobytes()  # the style's own factors
    plain, bare = render(scene, background="plain"), render(scene, outline=False)
    assert plain.tobytes() != render(scene).tobytes() and bare.tobytes() != render(scene).tobytes()
    # a plain background is the in-domain one: the corner pixel is light grey, as in-domain scenes
    assert min(plain.getpixel((0, 0))) >= 225


def test_a_degraded_export_keeps_the_annotations_and_degrades_the_same_images_every_time(tmp_path):
    """SC-Tune's `train_degrade_prob`: the training scenes drawn degraded (an augmentation), their
    boxes unchanged; the same scenes degrade alike in every export, and a plain export is not reused."""
    import numpy as np
    from PIL import Image

    from refloop.data.items import detection_items
    from refloop.world.export import export_split

    plain = export_split("crowded", tmp_path / "plain", 8, 0)
    degraded = [export_split("crowded", tmp_path / name, 8, 0, degrade_prob=0.5) for name in ("a", "b")]
    assert (plain / "instances.json").read_text() == (degraded[0] / "instances.json").read_text()

    def pixels(root):
        return [np.asarray(Image.open(p)) for p in sorted((root / "images").glob("*.png"))]

    changed = [not np.array_equal(x, y) for x, y in zip(pixels(plain), pixels(degraded[0]), strict=True)]
    assert 0 < sum(changed) < 8
    assert all(np.array_equal(x, y) for x, y in zip(pixels(degraded[0]), pixels(degraded[1]), strict=True))
    first_changed = changed.index(True)
    before = pixels(plain)[first_changed]
    export_split("crowded", tmp_path / "plain", 8, 0, degrade_prob=0.5)  # another export: the plain one is not reused
    assert not np.array_equal(pixels(plain)[first_changed], before)
    items, _ = detection_items("crowded", train_images=8, min_area_fraction=0.005, degrade_prob=0.5)
    plain_items, _ = detection_items("crowded", train_images=8, min_area_fraction=0.005)
    assert [(i.box, i.category) for i in items] == [(i.box, i.category) for i in plain_items]
    assert {Path(i.image_path).parent.parent.name for i in items} == {"crowded-seed0-n8-degrade0.5"}
