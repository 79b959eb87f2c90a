import json
import re
from pathlib import Path

import pytest

from refloop.boxes import Box
from refloop.data.formats import Relation, load_visual_genome, load_visual_genome_relationships
from refloop.data.loaders import load_coco
from refloop.data.rc import QUADRANTS, TASKS, TEMPLATES, attach_expressions, build_rc_data, load_rc_annotations, load_rc_data
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.errors import DataError, RefloopError
from refloop.models.profiles import get_profile
from refloop.world import get_style, sample_scene
from refloop.world.export import COCO_FILE, REFS_FILE, VG_IMAGES_FILE, VG_OBJECTS_FILE, VG_RELATIONSHIPS_FILE, export_visual_genome
from refloop.world.relations import box_predicates, scene_relations

SIZE = (100, 100)  # refloop-tiny writes 0..100: every box below comes back exactly
# A at the centre; B, C, D, E in its four quadrants. C's centre is level with B's (on B's centre line).
A = ObjectAnnotation(Box(40, 40, 60, 60), "circle", ann_id="A", expressions=("the middle circle",))
B = ObjectAnnotation(Box(5, 5, 35, 35), "circle", ann_id="B", expressions=("the big top circle",))
C = ObjectAnnotation(Box(70, 10, 90, 30), "square", ann_id="C", expressions=("the square",))
D = ObjectAnnotation(Box(10, 70, 24, 84), "circle", ann_id="D")
E = ObjectAnnotation(Box(65, 65, 95, 95), "triangle", ann_id="E", expressions=("the triangle",))
RELATIONS = [Relation(B, "left of", A), Relation(B, "above", A), Relation(B, "left of", C), Relation(A, "holding", C)]
PROFILES = ["refloop-tiny", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "florence-2", "kosmos-2", "paligemma", "internvl"]


def scene_record(tmp_path, objects=(A, B, C, D, E)) -> ImageRecord:
    return ImageRecord("scene", tmp_path / "scene.png", *SIZE, objects=tuple(objects))


def build(tmp_path, tasks=None, profile="refloop-tiny", seed=0, max_per_image=None, records=None, relations="default", name="rc.jsonl"):
    records = records or [scene_record(tmp_path)]
    relations = {"scene": RELATIONS} if relations == "default" else relations
    counts = build_rc_data(records, tmp_path / name, tasks, profile, seed, max_per_image, relations)
    samples = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
    return counts, samples


def boxes(text: str) -> list[Box]:
    return get_profile("refloop-tiny").codec.parse(text, SIZE)


def of_task(samples, task):
    return [s for s in samples if s["task"] == task]


# ---- answers on a hand-made scene -----------------------------------------------------------------
def test_counting_answers_count_the_category_of_the_box_or_name(tmp_path):
    _, samples = build(tmp_path, ["counting"])
    expected = {"circle": 3, "square": 1, "triangle": 1}
    by_box = {o.box: o.category for o in (A, B, C, D, E)}
    seen = set()
    for s in samples:
        question = s["messages"][0]["content"]
        found = boxes(question)
        category = by_box[found[0]] if found else next(c for c in expected if c in question)
        assert s["answer"] == str(expected[category])
        seen.add("box" if found else "name")
    assert seen == {"box", "name"} and len(samples) == 5 + 3


def test_spatial_answers_are_the_objects_in_the_quadrant_largest_first(tmp_path):
    _, samples = build(tmp_path, ["spatial"])
    answers = {}
    for s in samples:
        question = s["messages"][0]["content"]
        (anchor,) = boxes(question)
        position = next(q for q in QUADRANTS if q in question)
        answers[anchor, position] = s["answer"]
    assert len(answers) == 5 * 4
    assert [boxes(answers[A.box, q]) for q in QUADRANTS] == [[B.box], [C.box], [D.box], [E.box]]
    assert boxes(answers[B.box, "bottom right"]) == [E.box, A.box]  # 900 px before 400 px; C sits on B's centre line
    assert answers[B.box, "top right"] == "none" and answers[B.box, "top left"] == "none"
    assert answers[A.box, "top left"] == "circle {<5><5><35><35>}"


def test_detection_lists_boxes_by_area_largest_first(tmp_path):
    _, samples = build(tmp_path, ["detection"])
    circles = [B.box, A.box, D.box]
    for s in samples:
        question = s["messages"][0]["content"]
        asked = boxes(question)
        if (asked and asked[0] in circles) or "circle" in question:
            assert boxes(s["answer"]) == circles
    assert sum(boxes(s["answer"]) == circles for s in samples) == 3 + 1


def test_relation_tasks_keep_the_direction_of_the_triplet(tmp_path):
    _, samples = build(tmp_path, ["relation-predicate", "relation-objects"])
    predicates = {tuple(boxes(s["messages"][0]["content"])): s["answer"] for s in of_task(samples, "relation-predicate")}
    assert predicates == {(B.box, A.box): "left of and above", (B.box, C.box): "left of", (A.box, C.box): "holding"}
    objects = {}
    for s in of_task(samples, "relation-objects"):
        question = s["messages"][0]["content"]
        (subject,) = boxes(question)
        (predicate,) = [p for p in ("left of", "above", "holding") if p in question]
        objects[subject, predicate] = s["answer"]
    assert set(objects) == {(B.box, "left of"), (B.box, "above"), (A.box, "holding")}
    assert boxes(objects[B.box, "left of"]) == [C.box, A.box]  # equal areas: the higher one first
    assert objects[A.box, "holding"] == "square {<70><10><90><30>}"


def test_grounding_pairs_an_expression_with_its_own_box(tmp_path):
    _, samples = build(tmp_path, ["visual-grounding", "grounding-caption"])
    expression_of = {o.box: o.expressions[0] for o in (A, B, C, E)}
    for s in of_task(samples, "visual-grounding"):
        (box,) = boxes(s["answer"])
        assert expression_of[box] in s["messages"][0]["content"]
        assert s["answer"] == get_profile("refloop-tiny").rec_answer(box, SIZE, expression_of[box])
    for s in of_task(samples, "grounding-caption"):
        (box,) = boxes(s["messages"][0]["content"])
        assert s["answer"] == expression_of[box]
    assert len(samples) == 8  # D has no expression


@pytest.mark.parametrize("name", PROFILES)
def test_native_prompts_are_the_family_own_rec_and_reg_prompts(tmp_path, name):
    profile = get_profile(name)
    records = [scene_record(tmp_path)]
    build_rc_data(records, tmp_path / "bank.jsonl", None, name, 0, None, {"scene": RELATIONS})
    build_rc_data(records, tmp_path / "native.jsonl", None, name, 0, None, {"scene": RELATIONS}, native=True)
    bank, native = ([json.loads(line) for line in (tmp_path / f).read_text().splitlines()] for f in ("bank.jsonl", "native.jsonl"))
    assert [s["answer"] for s in bank] == [s["answer"] for s in native]  # same queries, same answers
    expression_of = {o.box: o.expressions[0] for o in (A, B, C, E)}
    box_of = {e: b for b, e in expression_of.items()}
    for b, n in zip(bank, native):
        if n["task"] == "visual-grounding":
            (expression,) = [e for e in box_of if e in b["messages"][0]["content"]]
            assert n["prompt"] == profile.rec_prompt(expression)
        elif n["task"] == "grounding-caption":
            assert n["prompt"] == profile.reg_prompt(box_of[n["answer"]], SIZE)
        else:
            assert n == b  # tasks without a native prompt keep their bank


def test_max_per_image_caps_each_task_on_each_image(tmp_path):
    other = ImageRecord("other", tmp_path / "other.png", *SIZE, objects=(A, B))
    counts, samples = build(tmp_path, max_per_image=2, records=[scene_record(tmp_path), other])
    assert counts == {t: len(of_task(samples, t)) for t in TASKS}
    assert counts["spatial"] == 4 and counts["relation-objects"] == 2  # "other" has no relations


# ---- determinism and templates --------------------------------------------------------------------
def test_template_choice_is_deterministic_by_seed(tmp_path):
    build(tmp_path, seed=3, name="a.jsonl")
    build(tmp_path, seed=3, name="b.jsonl")
    build(tmp_path, seed=4, name="c.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_fewer_tasks_leave_the_samples_of_the_others_unchanged(tmp_path):
    _, everything = build(tmp_path, seed=7, name="all.jsonl")
    _, counting = build(tmp_path, ["counting"], seed=7, name="counting.jsonl")
    assert counting == of_task(everything, "counting")


def _bank_patterns(bank: str) -> list[re.Pattern]:
    return [re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)) + "$") for t in TEMPLATES[bank]]


def test_every_instruction_comes_from_the_task_bank_and_the_banks_are_used(tmp_path):
    records, relations, _ = load_rc_annotations("crowded", num_images=4)
    build_rc_data(records, tmp_path / "rc.jsonl", None, "refloop-tiny", 0, None, relations)
    used: dict[str, set[int]] = {}
    for line in (tmp_path / "rc.jsonl").read_text().splitlines():
        s = json.loads(line)
        banks = [b for b in TEMPLATES if b == s["task"] or b.startswith(s["task"] + "-")]  # counting-object, counting-name, ...
        hits = [(b, i) for b in banks for i, p in enumerate(_bank_patterns(b)) if p.match(s["messages"][0]["content"])]
        assert hits, s["messages"][0]["content"]
        used.setdefault(hits[0][0], set()).add(hits[0][1])
    assert {b: len(v) for b, v in used.items()} == {b: len(t) for b, t in TEMPLATES.items()}


# ---- coordinates parse back with each family's codec ----------------------------------------------
@pytest.mark.parametrize("name", PROFILES)
def test_every_coordinate_parses_back_with_the_profile_codec(tmp_path, name):
    """The random streams do not depend on the profile, so sample i asks the same as refloop-tiny's
    sample i, whose boxes come back exactly on a 100 px image: each family's must match them."""
    profile = get_profile(name)
    _, reference = build(tmp_path, name="tiny.jsonl")
    _, samples = build(tmp_path, profile=name)
    assert [s["id"] for s in samples] == [s["id"] for s in reference] and {s["task"] for s in samples} == set(TASKS)
    for s, ref in zip(samples, reference):
        assert s["prompt"] == profile.prompt(s["messages"][0]["content"]) and s["answer"] == s["messages"][1]["content"]
        for text, ref_text in ((s["prompt"], ref["prompt"]), (s["answer"], ref["answer"])):
            parsed, written = profile.codec.parse(text, SIZE), boxes(ref_text)
            assert len(parsed) == len(written), (s["id"], text)
            assert all(a.iou(b) >= 0.6 for a, b in zip(parsed, written)), (s["id"], text)


# ---- missing annotations --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, objects, relations, field",
    [
        ("visual-grounding", (D,), None, "expressions"),
        ("grounding-caption", (D,), None, "expressions"),
        ("relation-predicate", (A, B), None, "relationships"),
        ("relation-objects", (A, B), {"elsewhere": RELATIONS}, "relationships"),
        ("spatial", (ObjectAnnotation(Box(1, 1, 9, 9), "", expressions=("x",)),), None, "category"),
        ("counting", (ObjectAnnotation(Box(1, 1, 9, 9), "", expressions=("x",)),), None, "category"),
        ("detection", (ObjectAnnotation(Box(1, 1, 9, 9), "", expressions=("x",)),), None, "category"),
    ],
)
def test_a_task_without_its_annotations_stops_naming_task_and_field(tmp_path, task, objects, relations, field):
    with pytest.raises(RefloopError, match=rf"task '{task}' needs .*no '{field}'"):
        build(tmp_path, [task], records=[scene_record(tmp_path, objects)], relations=relations)
    assert not (tmp_path / "rc.jsonl").exists()


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(RefloopError, match="unknown RC task.*'pointing'.*known: visual-grounding"):
        build(tmp_path, ["counting", "pointing"])


# ---- the file: loader, failure policy, datasets ---------------------------------------------------
def test_rc_file_loads_as_instruction_examples(tmp_path):
    _, samples = build(tmp_path)
    examples = load_rc_data(tmp_path / "rc.jsonl", profile="refloop-tiny")
    assert [(e.example_id, e.image_path, e.prompt, e.answer) for e in examples] == [
        (s["id"], str(tmp_path / "scene.png"), s["prompt"], s["answer"]) for s in samples
    ]
    assert examples[0].prompt.startswith("<image> ") and examples[0].prompt.endswith(" <sep>")


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"id": "x", "image": "i.png", "answer": "3"}', "field 'prompt' must be a non-empty string"),
        ('{"id": "x", "image": "i.png", "prompt": "p", "answer": 3}', "field 'answer' must be a non-empty string"),
        ('{"id": "scene/counting/0", "image": "i.png", "prompt": "p", "answer": "3"}', "already used on line 1"),
    ],
)
def test_malformed_rc_line_is_named_by_file_and_line(tmp_path, line, problem):
    build(tmp_path, ["counting"])
    path = tmp_path / "rc.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + [line] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=rf"rc.jsonl, record line 3: .*{problem}"):
        load_rc_data(path)


def test_rc_file_of_another_profile_is_refused(tmp_path):
    build(tmp_path, ["counting"], profile="qwen2-vl")
    with pytest.raises(DataError, match=r"record line 1: written for profile 'qwen2-vl', not 'refloop-tiny'"):
        load_rc_data(tmp_path / "rc.jsonl", profile="refloop-tiny")


def test_rc_file_has_one_schema_for_every_line(tmp_path):
    """What `datasets.load_dataset("json")` needs: every line the same keys, each key one type."""
    _, samples = build(tmp_path, profile="qwen2.5-vl")
    schema = {k: type(v) for k, v in samples[0].items()}
    assert schema == {
        "id": str,
        "task": str,
        "image": str,
        "file_name": str,
        "messages": list,
        "prompt": str,
        "answer": str,
        "profile": str,
        "frame": str,
    }
    for s in samples:
        assert {k: type(v) for k, v in s.items()} == schema
        assert [(m["role"], type(m["content"])) for m in s["messages"]] == [("user", str), ("assistant", str)]


def test_rc_file_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    _, samples = build(tmp_path)
    loaded = datasets.load_dataset("json", data_files=str(tmp_path / "rc.jsonl"), split="train")
    assert len(loaded) == len(samples) and loaded[0]["messages"] == samples[0]["messages"]


# ---- shapes world: relations and the Visual Genome export -----------------------------------------
def test_box_predicates_read_subject_then_object():
    left, right_small = Box(0, 40, 20, 60), Box(50, 45, 60, 55)
    assert box_predicates(left, right_small) == ["left of", "larger than"]
    assert box_predicates(right_small, left) == ["right of", "smaller than"]
    assert box_predicates(Box(0, 0, 10, 10), Box(5, 20, 15, 30)) == ["above"]  # x-ranges overlap: neither left nor right
    assert box_predicates(Box(0, 0, 10, 10), Box(0, 0, 14, 10)) == []  # 1.4x the area is not "larger"


def test_scene_relations_are_complete_and_each_has_its_inverse():
    inverse = {"left of": "right of", "above": "below", "larger than": "smaller than"}
    inverse |= {v: k for k, v in inverse.items()}
    scene = sample_scene(get_style("crowded"), 0, 3)
    triplets = set(scene_relations(scene))
    assert {(j, inverse[p], i) for i, p, j in triplets} == triplets
    n = len(scene.objects)
    assert {(i, j) for i, _, j in triplets} == {(i, j) for i in range(n) for j in range(n) if i != j}  # objects never overlap


def test_visual_genome_export_reads_back_with_the_visual_genome_loaders(tmp_path):
    out = export_visual_genome("in-domain", tmp_path, 3, seed=5)
    coco, _ = load_coco(out / COCO_FILE, out)
    vg, _ = load_visual_genome(out / VG_IMAGES_FILE, out, out / VG_OBJECTS_FILE)
    assert [[(o.ann_id, o.box, o.category) for o in r.objects] for r in vg] == [
        [(o.ann_id, o.box, o.category) for o in r.objects] for r in coco
    ]
    relations, report = load_visual_genome_relationships(out / VG_RELATIONSHIPS_FILE, {r.image_id: r.size for r in coco})
    for index, record in enumerate(coco):
        scene = sample_scene(get_style("in-domain"), 5, index)
        expected = [(scene.objects[i].box, p, scene.objects[j].box) for i, p, j in scene_relations(scene)]
        assert [(r.subject.box, r.predicate, r.object.box) for r in relations[record.image_id]] == expected
    assert report.kept == sum(map(len, relations.values())) and report.skipped == 0
    stamp = (out / VG_RELATIONSHIPS_FILE).stat().st_mtime_ns
    export_visual_genome("in-domain", tmp_path, 3, seed=5)
    assert (out / VG_RELATIONSHIPS_FILE).stat().st_mtime_ns == stamp  # a finished identical export is reused


def _relationships(tmp_path, triplets) -> object:
    path = tmp_path / "relationships.json"
    path.write_text(json.dumps([{"image_id": 7, "relationships": triplets}]))
    return path


GOOD_END = {"object_id": 1, "x": 5, "y": 5, "w": 20, "h": 30, "names": ["man"]}


def test_relationships_reader_takes_both_name_fields_and_normalises_predicates(tmp_path):
    path = _relationships(tmp_path, [{"predicate": " Sitting  ON", "subject": dict(GOOD_END, names=None, name="cat"), "object": GOOD_END}])
    relations, _ = load_visual_genome_relationships(path, {7: (200, 100)})
    assert relations == {
        7: [Relation(ObjectAnnotation(Box(5, 5, 25, 35), "cat", 1), "sitting on", ObjectAnnotation(Box(5, 5, 25, 35), "man", 1))]
    }


@pytest.mark.parametrize(
    "triplet, record, problem",
    [
        ({"subject": GOOD_END, "object": GOOD_END}, r"\[0\].relationships\[0\]", "missing field 'predicate'"),
        ({"predicate": "on", "subject": dict(GOOD_END, w=0), "object": GOOD_END}, r"\[0\].relationships\[0\].subject", "invalid bbox"),
        (
            {"predicate": "on", "subject": GOOD_END, "object": dict(GOOD_END, names="man")},
            r"\[0\].relationships\[0\].object",
            "must be a list",
        ),
        ({"predicate": " ", "subject": GOOD_END, "object": GOOD_END}, r"\[0\].relationships\[0\]", "empty predicate"),
    ],
)
def test_bad_relationship_is_named_and_skippable(tmp_path, triplet, record, problem):
    path = _relationships(tmp_path, [triplet, {"predicate": "on", "subject": GOOD_END, "object": GOOD_END}])
    with pytest.raises(DataError, match=rf"relationships.json, record {record}: .*{problem}"):
        load_visual_genome_relationships(path, {7: (200, 100)})
    relations, report = load_visual_genome_relationships(path, {7: (200, 100)}, on_error="skip")
    assert report.skipped == 1 and len(relations[7]) == 1


def test_relationships_of_an_image_not_loaded_are_refused(tmp_path):
    path = _relationships(tmp_path, [])
    with pytest.raises(DataError, match=r"record \[0\]: image_id 7 is not among the loaded images"):
        load_visual_genome_relationships(path, {8: (200, 100)})


# ---- sources --------------------------------------------------------------------------------------
def test_every_task_runs_on_a_shapes_world_domain(tmp_path):
    records, relations, reports = load_rc_annotations("in-domain", num_images=3)
    counts = build_rc_data(records, tmp_path / "rc.jsonl", None, "refloop-tiny", 0, 2, relations)
    assert set(counts) == set(TASKS) and all(n > 0 for n in counts.values())
    assert all(o.category for r in records for o in r.objects) and any(o.expressions for r in records for o in r.objects)
    assert [Path(r.source).name for r in reports] == [COCO_FILE, REFS_FILE, VG_RELATIONSHIPS_FILE] and not any(r.skipped for r in reports)


def test_attach_expressions_adds_expressions_to_matching_boxes_only(tmp_path):
    detections = [scene_record(tmp_path, [ObjectAnnotation(o.box, o.category, o.ann_id) for o in (A, B, C)])]
    pairs = [
        ImageRecord("pairs", tmp_path / "scene.png", *SIZE, objects=(ObjectAnnotation(Box(40, 40, 60, 61), "", 9, ("the middle one",)),))
    ]
    (record,) = attach_expressions(detections, pairs)
    assert [o.expressions for o in record.objects] == [("the middle one",), (), ()]
    assert [o.category for o in record.objects] == ["circle", "circle", "square"]
