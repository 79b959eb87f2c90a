import html
import inspect
import json
from pathlib import Path

import pytest
from helpers import run_cli, scene_images
from PIL import Image

from refloop.data.records import ImageRecord
from refloop.errors import RefloopError
from refloop.evaluation.hallucination import (
    STRATEGIES,
    build_pope_questions,
    caption_objects,
    chair,
    chair_from_rows,
    coco_table,
    evaluate_captions,
    evaluate_pope,
    load_object_data,
    object_mentions,
    object_recall,
    parse_yes_no,
    plural,
    pope_metrics,
    recall_from_rows,
    shapes_table,
)
from refloop.models import VLM, load_vlm
from refloop.models.hf import HFVLM
from refloop.world import EVAL_SEED, caption, get_style, sample_scene

COCO = coco_table()
SHAPES = shapes_table()


# ---- reading objects in captions ----------------------------------------------------------------


def test_chair_and_recall_on_hand_made_captions():
    captions = [
        "A man rides a motorbike past two hot dogs and a teddy bear.",  # teddy bear is absent
        "Two giraffes and three sheep near a traffic light.",
        "",
        "People at a bus stop; a woman wearing glasses holds a cell-phone and a dog.",  # the dog is absent
    ]
    gt = [
        {"person", "motorcycle", "hot dog", "dining table"},
        {"giraffe", "sheep", "traffic light"},
        {"dog"},
        {"person", "cell phone"},
    ]
    c = chair(captions, gt, COCO, protocol="refloop")
    # mentions 4 + 3 + 0 + 3, hallucinated 1 + 0 + 0 + 1; two of four captions hallucinate
    assert (c["mentions"], c["hallucinated_mentions"], c["hallucinating_captions"]) == (10, 2, 2)
    assert c["chair_i"] == pytest.approx(2 / 10)
    assert c["chair_s"] == pytest.approx(2 / 4)
    r = object_recall(captions, gt, COCO, protocol="refloop")
    # recalled 3 of 4, 3 of 3, 0 of 1, 2 of 2
    assert (r["recalled_objects"], r["gt_objects"]) == (8, 10)
    assert r["object_recall"] == pytest.approx(0.8)
    first, _, empty, last = c["samples"]
    assert first["words"] == ["man", "motorbike", "hot dogs", "teddy bear"]
    assert first["hallucinated"] == ["teddy bear"] and first["missed"] == ["dining table"]
    assert empty["mentioned"] == [] and empty["missed"] == ["dog"]
    assert last["mentioned"] == ["cell phone", "dog", "person"]  # "bus stop" and "glasses" name nothing
    assert chair_from_rows(c["samples"]) | {"protocol": "refloop", "samples": c["samples"]} == c
    assert recall_from_rows(r["samples"]) | {"protocol": "refloop", "samples": r["samples"]} == r


def test_longest_phrase_wins_over_the_object_inside_it():
    assert object_mentions("a hot dog beside a teddy bear", COCO) == {"hot dog", "teddy bear"}
    assert object_mentions("a dog beside a bear", COCO) == {"dog", "bear"}
    assert object_mentions("a microwave oven", COCO) == {"microwave"}
    assert object_mentions("hot-dogs and Teddy Bears!", COCO) == {"hot dog", "teddy bear"}


def test_orange_the_colour_is_not_the_fruit():
    assert object_mentions("an orange cat", COCO) == {"cat"}
    assert object_mentions("a bowl of oranges", COCO) == {"bowl", "orange"}


def test_every_coco_category_reads_itself_and_its_plural():
    assert len(COCO.objects) == 80
    for obj in COCO.objects:
        assert object_mentions(plural(obj), COCO) == {obj}, obj
        if obj != "orange":
            assert object_mentions(f"there is {obj} here", COCO) == {obj}, obj


def test_plural_rules():
    cases = {
        "person": "people",
        "hot dog": "hot dogs",
        "bus": "buses",
        "policeman": "policemen",
        "human": "humans",
        "puppy": "puppies",
        "toy": "toys",
        "knife": "knives",
        "sheep": "sheep",
        "red circle": "red circles",
    }
    assert {word: plural(word) for word in cases} == cases


def test_category_names_map_to_the_table():
    assert COCO.canonical("Person") == "person"
    assert COCO.canonical("cellphone") == "cell phone"
    assert COCO.canonical("dining table") == "dining table"
    assert COCO.canonical("lamp") is None


def test_grammar_captions_name_exactly_their_scenes_objects():
    style = get_style("wild")
    for index in range(30):
        scene = sample_scene(style, EVAL_SEED, index)
        pairs = {f"{o.colour} {o.shape}" for o in scene.objects}
        row = caption_objects(caption(scene), pairs, SHAPES)
        assert row["mentioned"] == sorted(pairs) and row["hallucinated"] == [] and row["missed"] == []
    assert object_mentions("a circle and a red object", SHAPES) == set()  # a bare shape or colour names no object
    assert SHAPES.question_for("red circle") == "is there a red circle ?"  # the grammar's existence question
    assert COCO.question_for("apple") == "Is there an apple in the image?"


# ---- POPE ---------------------------------------------------------------------------------------


def test_parse_yes_no_takes_the_first_yes_or_no_word():
    cases = {
        "yes": "yes",
        "Yes.": "yes",
        "YES, there is a dog": "yes",
        "No, there isn't.": "no",
        "There is no dog, yes.": "no",
        "Nothing like that": None,
        "yesterday": None,
        "I know": None,
        "not sure": None,
        "": None,
        None: None,
    }
    assert {text: parse_yes_no(text) for text in cases} == cases


def test_pope_metrics_on_hand_made_predictions():
    predictions = ["yes", "Yes, there is one.", "no", "No.", "I think so", "yes", "There is no cat.", None]
    labels = ["yes", "yes", "yes", "no", "yes", "no", "no", "no"]
    m = pope_metrics(predictions, labels, rule="refloop")
    # read as yes, yes, no, no, (none -> no), yes, no, (none -> no)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 2, 1, 3)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(4 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2)
    assert m["yes_ratio"] == pytest.approx(3 / 8)
    assert m["unparsed"] == 2 and m["num"] == 8
    assert [r["prediction"] for r in m["samples"]] == ["yes", "yes", "no", "no", "no", "yes", "no", "no"]
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["maybe"])


def _records(n: int) -> list[ImageRecord]:
    return [ImageRecord(image_id=i, path=Path(f"{i}.png"), width=10, height=10) for i in range(n)]


def _shapes_ground_truth(n: int) -> list[frozenset[str]]:
    style = get_style("wild")
    return [frozenset(f"{o.colour} {o.shape}" for o in sample_scene(style, EVAL_SEED, i).objects) for i in range(n)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pope_questions_are_balanced_true_and_fixed_by_seed(strategy):
    gt = _shapes_ground_truth(40)
    records = _records(40)
    questions = build_pope_questions(records, gt, strategy, per_image=3, seed=7, categories=SHAPES.objects, table=SHAPES)
    assert questions == build_pope_questions(records, gt, strategy, per_image=3, seed=7, categories=SHAPES.objects, table=SHAPES)
    for i, objects in enumerate(gt):
        mine = [q for q in questions if q["image_id"] == i]
        yes = [q["object"] for q in mine if q["label"] == "yes"]
        no = [q["object"] for q in mine if q["label"] == "no"]
        assert len(yes) == len(no) == min(3, len(objects), 12 - len(objects))
        assert set(yes) <= objects and not set(no) & objects
        assert len(set(yes)) == len(yes) and len(set(no)) == len(no)
    assert all(q["question"] == f"is there a {q['object']} ?" for q in questions)
    other = build_pope_questions(records, gt, strategy, per_image=3, seed=8, categories=SHAPES.objects)
    assert [q["object"] for q in other] != [q["object"] for q in questions]  # the seed draws the present objects (and random's absent ones)


def test_popular_and_adversarial_negatives_follow_the_dataset():
    gt = [{"a", "b"}, {"a", "b"}, {"d"}, {"d"}, {"d"}, {"a"}, set()]
    records = _records(len(gt))

    def negatives(strategy: str) -> dict:
        questions = build_pope_questions(records, gt, strategy, per_image=1, categories=["a", "b", "c", "d"])
        return {q["image_id"]: q["object"] for q in questions if q["label"] == "no"}

    # frequency: a 3, d 3, b 2, c 0; only a and b appear together (twice)
    assert negatives("popular") == {0: "d", 1: "d", 2: "a", 3: "a", 4: "a", 5: "d"}
    assert negatives("adversarial") == {0: "d", 1: "d", 2: "a", 3: "a", 4: "a", 5: "b"}  # image 5 holds a: b co-occurs
    assert 6 not in negatives("random")  # no object, no question
    with pytest.raises(RefloopError, match="unknown POPE strategy"):
        build_pope_questions(records, gt, "hardest")


# ---- runs on a small COCO-style file with a scripted model ----------------------------------------


def _coco_files(tmp_path: Path) -> tuple[Path, Path]:
    for name in ("1.png", "2.png"):
        Image.new("RGB", (20, 10)).save(tmp_path / name)
    instances = {
        "images": [{"id": 1, "file_name": "1.png", "width": 20, "height": 10}, {"id": 2, "file_name": "2.png", "width": 20, "height": 10}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [8, 1, 5, 5]},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5]},
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [8, 1, 5, 5]},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "lamp"}],
    }
    captions = {"annotations": [{"image_id": 1, "caption": "a man and his dog"}, {"image_id": 2, "caption": "a woman under a lamp"}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    return tmp_path / "instances.json", tmp_path / "captions.json"


class ScriptedCaptioner:
    name = "scripted"

    def __init__(self, captions: list[str], answer: str = "yes") -> None:
        self.captions, self.reply = list(captions), answer

    def caption(self, images, options=None):
        return [self.captions.pop(0) for _ in images]

    def answer(self, images, questions, options=None):
        return [self.reply for _ in questions]


def test_object_data_from_a_coco_file_maps_categories_and_reads_captions(tmp_path, caplog):
    instances, captions = _coco_files(tmp_path)
    found = load_object_data(str(instances), captions=captions)
    assert found.objects == [frozenset({"person", "dog"}), frozenset({"person"})]
    assert found.references == [["a man and his dog"], ["a woman under a lamp"]]
    assert found.unmapped_categories == {"lamp": 1}
    vlm = ScriptedCaptioner(["a man with a cat", "a woman"])
    m = evaluate_captions(vlm, found, tmp_path / "cap", java=False)
    assert (m["chair_i"], m["chair_s"], m["object_recall"]) == (pytest.approx(1 / 3), 0.5, pytest.approx(2 / 3))
    assert m["num_with_references"] == 2 and m["unmapped_categories"] == {"lamp": 1}
    rows = [json.loads(line) for line in (tmp_path / "cap" / "caption_samples.jsonl").read_text().splitlines()]
    assert [r["hallucinated"] for r in rows] == [["cat"], []]
    assert m["chair_protocol"] == "original" and set(m["chair_by_protocol"]) == {"original", "refloop"}
    assert m["tokenizer"].startswith("fallback") and {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"} <= set(m)
    for r in rows:  # every caption carries its own scores
        assert {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "chair_i", "chair_s", "recall"} <= set(r)
        assert set(r["protocols"]) == {"original", "refloop"}
    assert rows[0]["chair_s"] == 1 and rows[0]["recall"] == pytest.approx(1 / 2)
    m = evaluate_pope(ScriptedCaptioner([], answer="Yes."), found, tmp_path / "pope", per_image=3)
    # image 1: 2 yes + 2 no, image 2: 1 yes + 1 no; always "yes": recall 1, precision 1/2
    assert (m["num"], m["recall"], m["precision"], m["yes_ratio"], m["unparsed"]) == (6, 1.0, 0.5, 1.0, 0)
    assert m["rule"] == "reference" and m["by_rule"]["refloop"]["f1"] == m["by_rule"]["reference"]["f1"] == m["f1"]
    m = evaluate_pope(ScriptedCaptioner([], answer="I can't tell."), found, tmp_path / "pope-unsure", per_image=3)
    # neither yes nor no: YES under the release's rule, no (and unparsed) under refloop's
    assert (m["yes_ratio"], m["by_rule"]["refloop"]["yes_ratio"], m["unparsed"]) == (1.0, 0.0, 6)
    assert "6 of 6 answers say neither yes nor no" in caplog.text  # a headline F1 of 0.667 for no answer at all is said
    assert m["by_rule"]["reference"]["unparsed"] == m["by_rule"]["refloop"]["unparsed"] == 6  # as the README says: both rules


def test_crowd_annotations_are_objects_of_their_image_for_chair_and_pope(tmp_path):
    """chair.py's ground truth takes every annotation's category, `iscrowd` ones included: a crowd
    of people is no hallucination, and POPE never asks it with the answer no (a review's finding)."""
    instances, _ = _coco_files(tmp_path)
    data = json.loads(instances.read_text())
    data["annotations"].append({"id": 5, "image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 10], "iscrowd": 1})
    instances.write_text(json.dumps(data))
    found = load_object_data(str(instances))
    assert found.objects == [frozenset({"person", "dog"}), frozenset({"person", "dog"})]
    assert [len(r.objects) for r in found.records] == [2, 2]  # still no box of it
    assert found.records[1].crowd_categories == ("dog",)
    m = evaluate_captions(ScriptedCaptioner(["a man", "dogs and a woman"]), found, tmp_path / "cap", java=False)
    assert m["chair_i"] == 0.0
    m = evaluate_pope(ScriptedCaptioner([], answer="No."), found, tmp_path / "pope", per_image=3)
    rows = [json.loads(line) for line in (tmp_path / "pope" / "pope_samples.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["label"] == "no" and "dog" in r["question"]]


def test_a_captions_file_of_other_images_is_refused_and_a_partial_one_said(tmp_path, caplog):
    instances, captions = _coco_files(tmp_path)
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps({"annotations": [{"image_id": 101, "caption": "a man"}, {"image_id": 102, "caption": "a lamp"}]}))
    with pytest.raises(RefloopError, match=r"none of the 2 images has a caption there .*1, 2.*101, 102"):
        load_object_data(str(instances), captions=shifted)
    shifted.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a man"}, {"image_id": 102, "caption": "a lamp"}]}))
    assert load_object_data(str(instances), captions=shifted).references == [["a man"], []]
    assert "1 of 2 images have reference captions" in caplog.text


def test_the_datasets_own_categories_read_captions_and_ask_pope(tmp_path):
    """--categories dataset: the file's category names and plurals, no synonyms (Objects365-style
    labels CHAIR's COCO table does not know); the default stays COCO's table."""
    from refloop.evaluation.hallucination import default_protocol, pope_questions

    instances, captions = _coco_files(tmp_path)
    found = load_object_data(str(instances), captions=captions, categories="dataset")
    assert found.table.name == "dataset" and found.table.objects == ("dog", "lamp", "person")
    assert found.objects == [frozenset({"person", "dog"}), frozenset({"person", "lamp"})] and found.unmapped_categories == {}
    assert default_protocol(found) == "refloop"
    m = evaluate_captions(ScriptedCaptioner(["two dogs and a lamp", "a person"]), found, tmp_path / "cap", java=False)
    assert (m["chair_i"], m["object_recall"], m["table"]) == (pytest.approx(1 / 3), pytest.approx(2 / 4), "dataset")
    questions = pope_questions(found, per_image=1)
    assert {q["question"] for q in questions} >= {"Is there a lamp in the image?"} and len(questions) == 4
    with pytest.raises(RefloopError, match="categories 'o365'"):
        load_object_data(str(instances), categories="o365")
    with pytest.raises(RefloopError, match="--categories is for dataset files"):
        load_object_data("wild", categories="dataset", num_images=2)
    with pytest.raises(RefloopError, match="--categories is for dataset files"):  # given explicitly: refused, not ignored
        load_object_data("wild", categories="coco", num_images=2)
    # the table is the file's whole label set, not only the first num_images images' ("lamp" is in image 2 only)
    assert load_object_data(str(instances), categories="dataset", num_images=1).table.objects == ("dog", "lamp", "person")


def test_a_dataset_table_reads_a_name_beside_its_plural_as_two_objects():
    from refloop.evaluation.synonyms import dataset_table

    table = dataset_table(["glass", "glasses", "Bus", "person"])
    assert table.objects == ("bus", "glass", "glasses", "person")
    assert [obj for _, obj in table.matches("two buses, a glass and my glasses")] == ["bus", "glass", "glasses"]


# ---- the commands with refloop-tiny on a shapes-world domain ---------------------------------------


def test_answer_asks_the_question_inside_the_family_prompt():
    expected = inspect.signature(VLM.answer).parameters.values()
    assert [(p.name, p.default) for p in inspect.signature(HFVLM.answer).parameters.values()] == [(p.name, p.default) for p in expected]
    vlm = load_vlm(device="cpu", batch_size=4)
    _, images = scene_images(2)
    questions = ["is there a red circle ?", "is there a blue square ?"]
    answers = vlm.answer(images, questions)
    groups = vlm.generate(images, [vlm.profile.prompt(q) for q in questions])
    assert answers == [vlm.profile.read_caption(group[0].text) for group in groups]
    assert set(answers) <= {"yes", "no"}  # refloop-tiny's existence answers


def test_eval_caption_command_on_shapes_world(tmp_path, capsys):
    out = tmp_path / "caption"
    code, _, err = run_cli(["eval", "caption", "--data", "in-domain", "--num-images", "4", "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "caption_metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "caption_samples.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["num"] == 4
    assert {k: metrics[k] for k in ("chair_i", "chair_s", "object_recall")} == {
        "chair_i": chair_from_rows(rows)["chair_i"],
        "chair_s": chair_from_rows(rows)["chair_s"],
        "object_recall": recall_from_rows(rows)["object_recall"],
    }
    scenes = [sample_scene(get_style("in-domain"), EVAL_SEED, i) for i in range(4)]
    assert [r["references"] for r in rows] == [[caption(s)] for s in scenes]
    assert metrics["CIDEr"] > 0 and metrics["object_recall"] > 0.5  # refloop-tiny captions its own domain well
    page = (out / "report.html").read_text()
    assert (out / "objects.png").exists() and page.count("data:image/png;base64,") >= 4  # each image shown once or twice
    assert html.escape(rows[0]["caption"]) in page
    code, _, err = run_cli(["eval", "caption", "--data", "in-domain", "--out", str(out), "--strategy", "popular"], capsys)
    assert code == 2 and "No such option: --strategy" in err  # a POPE option: `eval caption` does not have it


def test_eval_pope_command_on_shapes_world_resumes_and_refuses_another_run(tmp_path, capsys):
    out = tmp_path / "pope"
    args = ["eval", "pope", "--data", "in-domain", "--num-images", "4", "--strategy", "popular", "--out", str(out), "--device", "cpu"]
    code, _, err = run_cli([*args, "--no-report"], capsys)
    assert code == 0, err
    assert not (out / "report.html").exists() and not (out / "objects.png").exists()
    metrics = json.loads((out / "pope_metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "pope_samples.jsonl").read_text().splitlines()]
    assert sum(r["label"] == "yes" for r in rows) == sum(r["label"] == "no" for r in rows) == metrics["num"] / 2
    assert all(r["question"].startswith("is there a ") for r in rows)
    recomputed = pope_metrics([r["answer"] for r in rows], [r["label"] for r in rows])  # the reference rule, the default
    assert {k: metrics[k] for k in ("accuracy", "f1", "yes_ratio", "unparsed")} == {
        k: recomputed[k] for k in ("accuracy", "f1", "yes_ratio", "unparsed")
    }
    assert metrics["accuracy"] > 0.75  # refloop-tiny was trained on these questions in this domain
    code, _, err = run_cli(args, capsys)  # the same run again: every question is done, nothing is asked twice
    assert code == 0, err
    assert json.loads((out / "pope_metrics.json").read_text()) == metrics
    assert len((out / "pope_samples.jsonl").read_text().splitlines()) == len(rows)
    code, _, err = run_cli([*args[:6], "--strategy", "random", "--out", str(out)], capsys)
    assert code == 2 and "holds outputs of another run" in err


def test_eval_pope_asks_a_release_question_file_as_written(tmp_path, capsys):
    """`--questions`: the POPE release's JSON Lines (question_id, image, text, label), the sets
    published tables are scored on. Written from a --data run's own questions, it asks the same
    questions and gets the same answers and metrics; the drawing options and a missing source are refused."""
    drawn = tmp_path / "drawn"
    code, _, err = run_cli(["eval", "pope", "--data", "in-domain", "--num-images", "4", "--out", str(drawn), "--device", "cpu"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (drawn / "pope_samples.jsonl").read_text().splitlines()]
    images = Path(rows[0]["image"]).parent
    release = [{"question_id": k, "image": Path(r["image"]).name, "text": r["question"], "label": r["label"]} for k, r in enumerate(rows)]
    (tmp_path / "coco_pope_random.json").write_text("".join(json.dumps(q) + "\n" for q in release))
    out = tmp_path / "asked"
    args = ["eval", "pope", "--questions", str(tmp_path / "coco_pope_random.json"), "--images", str(images), "--out", str(out)]
    code, _, err = run_cli([*args, "--device", "cpu"], capsys)
    assert code == 0, err
    asked = [json.loads(line) for line in (out / "pope_samples.jsonl").read_text().splitlines()]
    assert [(a["question"], a["label"], a["answer"]) for a in asked] == [(r["question"], r["label"], r["answer"]) for r in rows]
    metrics, expected = (json.loads((d / "pope_metrics.json").read_text()) for d in (out, drawn))
    assert {k: metrics[k] for k in ("num", "accuracy", "f1", "yes_ratio", "by_rule")} == {
        k: expected[k] for k in ("num", "accuracy", "f1", "yes_ratio", "by_rule")
    }
    assert metrics["questions"].endswith("coco_pope_random.json") and "strategy" not in metrics
    assert (out / "report.html").exists() and not (out / "objects.png").exists()  # a release's questions name no object field
    code, _, err = run_cli([*args, "--strategy", "popular", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--strategy" in err and "asked as written" in err
    code, _, err = run_cli(["eval", "pope", "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "--questions" in err
    (tmp_path / "other.json").write_text("".join(json.dumps(q | {"label": "no"}) + "\n" for q in release))
    code, _, err = run_cli([*args[:3], str(tmp_path / "other.json"), *args[4:], "--device", "cpu"], capsys)
    assert code == 2 and "holds outputs of another run" in err  # other questions are another run


def test_object_data_of_a_domain_takes_another_split_by_seed(tmp_path):
    """A shapes-world domain's caption/POPE data is its evaluation split; `seed` picks other
    held-out scenes (a validation split) with the same ground truth layout; a file refuses it."""
    default = load_object_data("wild", num_images=3)
    assert load_object_data("wild", num_images=3, seed=EVAL_SEED).objects == default.objects
    other = load_object_data("wild", num_images=3, seed=7)
    assert len(other.records) == 3 and all(other.references) and all(other.objects)
    assert [r.load_image().tobytes() for r in other.records] != [r.load_image().tobytes() for r in default.records]
    instances, _ = _coco_files(tmp_path)
    with pytest.raises(RefloopError, match="seed picks a split"):
        load_object_data(str(instances), seed=7)


def test_eval_caption_on_categories_chair_cannot_read_warns_once(tmp_path, capsys):

    images = [{"id": i, "file_name": f"{i}.png", "width": 48, "height": 48} for i in range(2)]
    for im in images:
        Image.new("RGB", (48, 48), "white").save(tmp_path / im["file_name"])
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20]} for i in range(2)]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "blorb"}]}))
    code, _, err = run_cli(["eval", "caption", "--data", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert code == 0, err
    assert err.count("warning: CHAIR_i and object recall are null") == 1


def test_num_images_beyond_the_data_is_said(tmp_path, capsys, caplog):
    from helpers import run_cli, save_tiny_random

    assert run_cli(["export-world", "--domain", "wild", "--num-images", "3", "--out", str(tmp_path / "w")], capsys)[0] == 0
    data, model = str(tmp_path / "w" / "instances.json"), str(save_tiny_random(tmp_path / "m"))
    args = ["eval", "caption", "--data", data, "--model", model, "--categories", "dataset", "--out", str(tmp_path / "c")]
    code, _, err = run_cli([*args, "--num-images", "10"], capsys)
    assert code == 0, err
    assert "3 images evaluated, not 10 (--num-images): the data holds 3 images" in caplog.text
    # fewer than the file holds: said too (`caption` cut a file to its default 100 silently)
    code, _, err = run_cli([*args[:-1], str(tmp_path / "c2"), "--num-images", "2"], capsys)
    assert code == 0 and "its first 2 of 3 images are evaluated" in caplog.text
    code, _, err = run_cli(["caption", "--data", data, "--model", model, "--num-images", "2", "--out", str(tmp_path / "c3")], capsys)
    assert code == 0 and "its first 2 of 3 images are used" in caplog.text


def test_pope_says_which_images_it_had_nothing_to_ask(tmp_path, capsys, caplog):
    """POPE asks only about images that name an object: fewer images than --num-images says so
    (the warning said "no more had what the task reads")."""
    from helpers import run_cli, save_tiny_random

    images = [{"id": i, "file_name": f"{i}.png", "width": 48, "height": 48} for i in range(3)]
    for im in images:
        Image.new("RGB", (48, 48), "white").save(tmp_path / im["file_name"])
    anns = [{"id": i, "image_id": i, "category_id": 1 + i, "bbox": [4, 4, 20, 20]} for i in range(2)]  # image 2: none
    cats = [{"id": 1, "name": "blorb"}, {"id": 2, "name": "snark"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    model = str(save_tiny_random(tmp_path / "m"))
    args = ["eval", "pope", "--data", str(path), "--model", model, "--categories", "dataset", "--num-images", "5"]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err
    assert "2 images evaluated, not 5 (--num-images): the data holds 3 images; 1 of them name no object" in caplog.text


def test_referring_data_as_caption_or_pope_ground_truth_is_said_to_be_incomplete(tmp_path, caplog):
    """A referring file lists the objects its expressions refer to: an unlisted object in the image
    would count as hallucinated (CHAIR) or be asked with the answer no (POPE; a first-contact
    helper found 14 of 57 "no" questions about objects in the image)."""
    Image.new("RGB", (20, 10)).save(tmp_path / "1.png")
    line = {"image_id": 1, "file_name": "1.png", "bbox": [1, 1, 5, 5], "sentences": ["the dog"], "category": "dog"}
    (tmp_path / "refs.jsonl").write_text(json.dumps(line) + "\n")
    found = load_object_data(str(tmp_path / "refs.jsonl"))
    assert found.objects == [frozenset({"dog"})]
    assert "is referring data" in caplog.text and "detection file" in caplog.text


def test_a_pope_file_whose_images_are_all_missing_says_what_was_skipped(tmp_path, capsys):
    lines = [{"question_id": k, "image": f"gone{k}.jpg", "text": "Is there a dog in the image?", "label": "yes"} for k in (1, 2)]
    (tmp_path / "coco_pope_random.json").write_text("".join(json.dumps(q) + "\n" for q in lines))
    args = ["eval", "pope", "--questions", str(tmp_path / "coco_pope_random.json"), "--on-error", "skip", "--out", str(tmp_path / "o")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "no POPE question left to ask; 2 records were skipped" in err and "image file not found: 2" in err


def test_reports_rank_the_wrong_objects_and_show_the_images_that_still_exist(tmp_path):
    from refloop.report.hallucination import write_caption_report, write_pope_report

    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")

    def caption_row(i, image, caption, hallucinated, recalled, missed):
        recall = len(recalled) / max(len(recalled) + len(missed), 1)
        return {"id": str(i), "image": image, "caption": caption, "hallucinated": hallucinated, "recalled": recalled, "missed": missed,
                "recall": recall}  # fmt: skip

    rows = [
        caption_row(0, str(tmp_path / "0.png"), "a cat & a dog", ["dog"], ["cat"], []),
        caption_row(1, str(tmp_path / "1.png"), "a cat", [], ["cat"], ["bed"]),
        caption_row(2, str(tmp_path / "gone.png"), "a dog and a bird", ["dog", "bird"], [], ["cup"]),  # moved since the run
    ]
    (tmp_path / "caption_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_caption_report(tmp_path, {"chair_i": 0.6, "object_recall": 0.5, "chair_protocol": "original"}, "m", "d").read_text()
    assert "a cat &amp; a dog" in page and "CHAIR_i (mentions naming an absent object)</td><td>60.0%" in page
    assert page.count("data:image/png;base64,") == 2  # the gone image is left out, not an error
    assert page.index("a cat &amp; a dog") < page.index("naming no absent object") < page.index("<b>a cat</b>")
    assert (tmp_path / "objects.png").exists()

    questions = [
        {"image": str(tmp_path / "0.png"), "object": "dog", "question": "is there a dog?", "answer": "Yes", "label": "no"},
        {"image": str(tmp_path / "1.png"), "object": "cat", "question": "is there a cat?", "answer": "", "label": "yes"},
        {"image": str(tmp_path / "1.png"), "object": "bed", "question": "is there a bed?", "answer": "no", "label": "no"},
    ]
    for q in questions:
        q["reference_reading"] = "no" if q["answer"].lower().startswith("no") else "yes"  # the release reads "" as yes
        q["parsed"] = q["answer"].lower() or None
    (tmp_path / "pope_samples.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    page = write_pope_report(tmp_path, {"rule": "refloop", "tp": 0, "fn": 1, "fp": 1, "tn": 1}, "m", "d").read_text()
    assert "Absent objects answered yes (1)" in page and "Present objects not answered yes (1)" in page  # "" is no yes here
    page = write_pope_report(tmp_path, {"rule": "reference"}, "m", "d").read_text()
    assert "Absent objects answered yes (1)" in page and "Present objects not answered yes (0)" in page


def test_the_rec_report_counts_and_labels_by_the_rule_of_its_metrics(tmp_path):
    """A Python-API REC run scored by SC-Tune's IoU > 0.5: the report's "right" row says that rule
    and counts an IoU of exactly 0.5 as wrong, as the accuracy does."""
    from refloop.report.referring import write_rec_report

    Image.new("RGB", (32, 32), "red").save(tmp_path / "0.png")
    rows = [
        {"id": str(i), "image": str(tmp_path / "0.png"), "expression": "the red one", "box": [0, 0, 10, 10],
         "predicted_box": [0, 0, 10, 10], "answer": "", "iou": iou}
        for i, iou in enumerate((0.5, 0.9))
    ]  # fmt: skip
    (tmp_path / "rec_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    strict = {"num": 2, "rec_accuracy": 0.5, "iou_threshold": 0.5, "iou_rule": "IoU > 0.5"}
    page = write_rec_report(tmp_path, strict).read_text()
    assert "right (IoU &gt; 0.5)</td><td>1</td>" in page
    page = write_rec_report(tmp_path, strict | {"rec_accuracy": 1.0, "iou_rule": "IoU >= 0.5"}).read_text()
    assert "right (IoU &ge; 0.5)</td><td>2</td>" in page


def _coco_with_captions(tmp_path):
    """Three white images: a dog on 0, a cat on 1, nothing annotated on 2."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 48, "height": 48} for i in range(3)]
    for im in images:
        Image.new("RGB", (48, 48), "white").save(tmp_path / im["file_name"])
    anns = [
        {"id": 1, "image_id": 0, "category_id": 18, "bbox": [4, 4, 20, 20]},
        {"id": 2, "image_id": 1, "category_id": 17, "bbox": [4, 4, 20, 20]},
    ]
    cats = [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_eval_caption_scores_a_captions_file_as_chair_py_reads_it(tmp_path, capsys):
    """--predictions scores given captions (a CHAIR fork's JSONL, chair.py's JSON array, other
    keys), no model loads: every mention counted as chair.py counts it."""
    data = _coco_with_captions(tmp_path)
    lines = [{"image_id": 0, "caption": "A dog and a cat on a bench."}, {"image_id": 1, "caption": "A cat."}]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "scored"
    code, _, err = run_cli(
        ["eval", "caption", "--data", str(data), "--predictions", str(tmp_path / "caps.jsonl"), "--out", str(out)], capsys
    )
    assert code == 0, err
    metrics = json.loads((out / "caption_metrics.json").read_text())
    # mentions: dog, cat, bench | cat; absent: cat and bench on image 0
    assert metrics["num"] == 2 and metrics["chair_protocol"] == "original"
    assert metrics["mentions"] == 4 and metrics["hallucinated_mentions"] == 2 and metrics["chair_s"] == 0.5
    assert metrics["object_recall"] == 1.0 and metrics["predictions_file"] == str(tmp_path / "caps.jsonl")
    assert (out / "report.html").exists()
    # the same captions as a JSON array under other keys: the same numbers
    (tmp_path / "caps.json").write_text(json.dumps([{"id": x["image_id"], "text": x["caption"]} for x in lines]))
    args = ["--predictions", str(tmp_path / "caps.json"), "--image-id-key", "id", "--caption-key", "text"]
    code, _, err = run_cli(["eval", "caption", "--data", str(data), *args, "--out", str(tmp_path / "s2")], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "s2" / "caption_metrics.json").read_text())
    assert {k: again[k] for k in ("chair_i", "chair_s", "object_recall")} == {
        k: metrics[k] for k in ("chair_i", "chair_s", "object_recall")
    }


def test_eval_caption_predictions_refuses_captions_of_other_images(tmp_path, capsys):
    """A shapes-world domain's splits share image ids: a caption of a training scene (its entry
    names the file, gone or not) is refused against the evaluation scene of that id."""
    data = _coco_with_captions(tmp_path)
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 0, "image": "/gone/wild-seed0-n3/images/wild-0-000000.png", "caption": "a dog"}) + "\n")
    code, _, err = run_cli(["eval", "caption", "--data", "wild", "--predictions", str(caps), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "was captioned from" in err and "the data's image of that id is" in err, err
    caps.write_text(json.dumps({"image_id": 7, "caption": "a dog"}) + "\n" + json.dumps({"image_id": 0, "caption": "a dog"}) + "\n")
    code, _, err = run_cli(["eval", "caption", "--data", str(data), "--predictions", str(caps), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "1 of 2 captions cannot be scored" in err and "image 7 is not among the data's 3 images" in err
    args = ["eval", "caption", "--data", str(data), "--predictions", str(caps), "--on-error", "skip", "--out", str(tmp_path / "o2")]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o2" / "caption_metrics.json").read_text())["skipped_predictions"] == 1
    caps.write_text(json.dumps({"image_id": 0, "caption": "a dog"}) + "\n" + json.dumps({"image_id": 0, "caption": "a cat"}) + "\n")
    code, _, err = run_cli(["eval", "caption", "--data", str(data), "--predictions", str(caps), "--out", str(tmp_path / "o3")], capsys)
    assert code == 2 and "image 0 already has a caption (line 1)" in err


def test_eval_caption_predictions_options_go_together(tmp_path, capsys):
    data = _coco_with_captions(tmp_path)
    code, _, err = run_cli(["eval", "caption", "--data", str(data), "--caption-key", "text", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--caption-key applies to --predictions only" in err
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 0, "caption": "a dog"}) + "\n")
    args = ["eval", "caption", "--data", str(data), "--predictions", str(caps), "--batch-size", "4", "--out", str(tmp_path / "o")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--batch-size: --predictions scores the file's captions" in err
    assert not (tmp_path / "o").exists()


def test_refloop_caption_of_a_domain_scores_as_eval_caption_does(tmp_path, capsys):
    """`refloop caption --data wild` captions the evaluation scenes `eval caption` scores (it
    captioned the training scenes, whose ids are the same: scoring them silently read other
    images' ground truth): its captions scored with --predictions give eval caption's own rows."""
    common = ["--data", "wild", "--num-images", "3", "--out"]  # the embedded model: its captions end before either length cap
    assert run_cli(["caption", *common, str(tmp_path / "cap")], capsys)[0] == 0
    assert run_cli(["eval", "caption", *common, str(tmp_path / "gen")], capsys)[0] == 0
    scored = ["eval", "caption", *common, str(tmp_path / "given"), "--predictions", str(tmp_path / "cap" / "captions.jsonl")]
    code, _, err = run_cli(scored, capsys)
    assert code == 0, err
    rows = [(tmp_path / d / "caption_samples.jsonl").read_text() for d in ("gen", "given")]
    assert rows[0] == rows[1]
    generated, given = (json.loads((tmp_path / d / "caption_metrics.json").read_text()) for d in ("gen", "given"))
    assert given.pop("predictions_file") and given == generated


def test_eval_caption_predictions_needs_no_pixels_and_says_what_it_skipped(tmp_path, capsys, caplog):
    """Scoring a captions file reads annotations only, as chair.py does (the images of the whole
    annotation file need not be on disk); a null caption is no empty caption; under skip, every
    caption of an image captioned twice goes and the file's skipped entries are said."""
    data = _coco_with_captions(tmp_path)
    (tmp_path / "2.png").unlink()
    caps = tmp_path / "caps.jsonl"
    lines = [{"image_id": 0, "caption": "a dog"}, {"image_id": 1, "caption": None}, {"image_id": 2, "caption": "a cat"}]
    caps.write_text("".join(json.dumps(x) + "\n" for x in [*lines, {"image_id": 2, "caption": "a dog"}]))
    args = ["eval", "caption", "--data", str(data), "--predictions", str(caps), "--out"]
    code, _, err = run_cli([*args, str(tmp_path / "o")], capsys)
    assert code == 2 and "line 2" in err and "field 'caption' is null" in err
    code, _, err = run_cli([*args, str(tmp_path / "o2"), "--on-error", "skip"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "o2" / "caption_metrics.json").read_text())
    assert metrics["num"] == 1 and "skipped_records" not in metrics  # image 0 only: 1 is null, 2 has two captions
    assert "3 records were skipped" in caplog.text


def test_eval_caption_predictions_of_a_domain_export_the_scenes_the_file_names(tmp_path, capsys):
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"image_id": i, "caption": "a red circle"}) + "\n" for i in (0, 6)))
    code, _, err = run_cli(["eval", "caption", "--data", "wild", "--predictions", str(caps), "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "caption_metrics.json").read_text())
    assert metrics["num"] == 2 and metrics["table"] == "shapes"  # 7 scenes exported, not the default 500


def test_eval_caption_predictions_first_contact_mistakes_are_named(tmp_path, capsys):
    """A new user's captions files: keyed by file name, LLaVA's answer keys, JSON Lines saved as
    .json, duplicates skipped (counted in the metrics), images elsewhere (the report still shows
    the captions)."""
    data = _coco_with_captions(tmp_path)
    args = ["eval", "caption", "--data", str(data), "--predictions"]
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": "0.png", "caption": "a dog"}) + "\n")
    code, _, err = run_cli([*args, str(caps), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "'0.png' is the file name of image 0: captions are keyed by image id" in err
    caps.write_text(json.dumps({"question_id": 0, "text": "a dog"}) + "\n")
    code, _, err = run_cli([*args, str(caps), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "missing field 'image_id' (its fields: 'question_id', 'text'; --image-id-key names the field to read)" in err
    as_json = tmp_path / "caps.json"  # JSON Lines under a .json name
    as_json.write_text(json.dumps({"image_id": 0, "caption": "a dog"}) + "\n" + json.dumps({"image_id": 1, "caption": "a cat"}) + "\n")
    code, _, err = run_cli([*args, str(as_json), "--out", str(tmp_path / "c")], capsys)
    assert code == 0, err
    caps.write_text(
        "".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in [(0, "a dog and a dog"), (0, "a cat"), (1, "a dog")])
    )
    for image in ("0.png", "1.png", "2.png"):
        (tmp_path / image).unlink()
    code, _, err = run_cli([*args, str(caps), "--on-error", "skip", "--out", str(tmp_path / "d")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "d" / "caption_metrics.json").read_text())
    assert metrics["num"] == 1 and metrics["skipped_predictions"] == 2  # both captions of image 0
    assert "report.html shows the captions without their images" in err
    page = (tmp_path / "d" / "report.html").read_text()
    assert "(image not found:" in page and "a dog" in page and "captions of the file skipped" in page


def test_the_caption_report_counts_captions_not_mentions(tmp_path):
    from refloop.report.hallucination import write_caption_report

    rows = [{"id": "0", "image": "x.png", "caption": "a dog. another dog.", "hallucinated": ["dog", "dog"], "missed": [], "recall": 1.0}]
    rows += [{"id": "1", "image": "y.png", "caption": "a cat", "hallucinated": [], "missed": ["dog"], "recall": 0.0}]
    (tmp_path / "caption_samples.jsonl").write_text("".join(json.dumps(r | {"recalled": [], "gt_objects": []}) + "\n" for r in rows))
    import refloop.report.hallucination as report

    counted = {}
    original = report.ranked_bars
    report.ranked_bars = lambda series, *a, **k: counted.update(series) or original(series, *a, **k)
    try:
        write_caption_report(tmp_path, {"chair_protocol": "original", "table": "coco"})
    finally:
        report.ranked_bars = original
    assert counted["named but absent"] == {"dog": 1} and counted["present but not named"] == {"dog": 1}


def test_the_readme_snippet_scoring_a_captions_file_runs(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = next(b.split("```")[0] for b in readme.split("```python\n") if "score_caption_file(" in b.split("```")[0])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"image_id": i, "caption": "a red circle"}) + "\n" for i in range(20)))
    exec("from pathlib import Path\n" + snippet, {})
    chair_i, chair_s, recall = map(float, capsys.readouterr().out.split())
    assert 0 <= chair_i <= 1 and 0 <= chair_s <= 1 and 0 < recall < 1 and (tmp_path / "chair-out" / "caption_metrics.json").exists()
