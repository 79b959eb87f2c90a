"""The metrics against hand-computed cases of the reference behaviour (issue 21): CHAIR as the
original chair.py counts it and as refloop does, POPE under the release's rule and refloop's, REC
accuracy on an IoU tie, per-caption text scores."""

import json
import shutil

import pytest
from helpers import ScriptedVLM
from test_consistency import make_records

from refloop.boxes import Box
from refloop.cycle import PINK_CONSISTENCY, REC_ACCURACY, SC_TUNE_CONSISTENCY
from refloop.evaluation import caption_metrics, chair, object_recall, pope_metrics, rec_accuracy
from refloop.evaluation.chair_words import chair_words, read_words, singularize, tokenize
from refloop.evaluation.consistency import ConsistencyConfig, evaluate_consistency, sample_boxes
from refloop.evaluation.pope import reference_reading

# ---- CHAIR -------------------------------------------------------------------------------------

CAPTIONS = [
    "Three zebras graze. A zebra drinks while another zebra watches a baby elephant.",
    "A baseball player and a tennis player on a table tennis court.",
    "Two buses and a bus stop near teddy bears, hot dogs and a motor bike.",
    "A man at his computer beside a trolley; the toilet seat is up.",
    "Adult giraffes and their babies.",
    "A woman holding an umbrella.",
]
ANNOTATED = [{"elephant"}, {"person"}, {"bus", "motorcycle"}, {"person", "toilet"}, {"giraffe"}, {"person", "umbrella"}]
REFERENCES = [[], [], [], ["A man working on a laptop near a tram."], [], []]


def test_chair_original_counts_every_mention_with_its_rules_and_quirks():
    c = chair(CAPTIONS, ANNOTATED, references=REFERENCES)  # COCO, protocol="original" by default
    rows = c["samples"]
    # 1: three zebra mentions, none present: 3 hallucinated mentions; "baby elephant" is an elephant, no person
    assert rows[0]["mentioned"] == ["zebra", "zebra", "zebra", "elephant"]
    assert rows[0]["hallucinated"] == ["zebra", "zebra", "zebra"]
    # 2: both players are persons; "table tennis" reads as a dining table (the release's quirk)
    assert rows[1]["mentioned"] == ["person", "person", "dining table"] and rows[1]["hallucinated"] == ["dining table"]
    # 3: "buses" is a bus, the singular "bus" is not read ("bu"); "motor bike" is not in the release's list
    assert rows[2]["words"] == ["bus", "teddy bear", "hot dog"] and rows[2]["missed"] == ["motorcycle"]
    # 4: computer -> laptop, trolley -> bus, toilet seat -> toilet; the reference caption's laptop joins the ground truth
    assert rows[3]["mentioned"] == ["person", "laptop", "bus", "toilet"] and rows[3]["hallucinated"] == ["bus"]
    assert rows[3]["gt_objects"] == ["laptop", "person", "toilet"]
    # 5: "adult giraffes" is a giraffe, "babies" a person
    assert rows[4]["mentioned"] == ["giraffe", "person"] and rows[4]["hallucinated"] == ["person"]
    assert rows[5]["hallucinated"] == [] and rows[5]["chair_s"] == 0
    # mentions 4 + 3 + 3 + 4 + 2 + 2 = 18, hallucinated 3 + 1 + 2 + 1 + 1 + 0 = 8, 5 of 6 captions
    assert (c["mentions"], c["hallucinated_mentions"], c["hallucinating_captions"]) == (18, 8, 5)
    assert c["chair_i"] == pytest.approx(8 / 18) and c["chair_s"] == pytest.approx(5 / 6)
    assert rows[0]["chair_i"] == pytest.approx(3 / 4) and rows[2]["recall"] == pytest.approx(1 / 2)
    # recall over the extended ground truth: 1 + 1 + 1 (of 2) + 3 + 1 + 2 = 9 of 10
    r = object_recall(CAPTIONS, ANNOTATED, references=REFERENCES)
    assert (r["recalled_objects"], r["gt_objects"], r["object_recall"]) == (9, 10, pytest.approx(0.9))
    # without reference captions the laptop is hallucinated too
    assert chair(CAPTIONS, ANNOTATED)["hallucinated_mentions"] == 9


@pytest.mark.parametrize(
    "caption, objects",
    [
        # the release's pair list holds "train track": no train is named (a review found refloop read one)
        ("A dog walks along the train tracks.", ["dog"]),
        ("A train on the train tracks.", ["train"]),
        # NLTK's tokenizer splits off curly quotes and long dashes (chat models write them)
        ("The dog\u2019s bowl is on the table.", ["dog", "bowl", "dining table"]),
        ("A cat\u2014and a dog\u2014on the bed.", ["cat", "dog", "bed"]),
        ("A \u201cteddy bear\u201d on a bed.", ["teddy bear", "bed"]),
    ],
)
def test_chair_original_reads_what_the_release_reads(caption, objects):
    assert [obj for _, obj in chair_words().matches(caption)] == objects


def test_chair_refloop_counts_each_object_once_and_fixes_baby_animals_and_players():
    c = chair(CAPTIONS, ANNOTATED, protocol="refloop")
    rows = c["samples"]
    assert rows[0]["mentioned"] == ["elephant", "zebra"] and rows[0]["hallucinated"] == ["zebra"]  # no person in "baby elephant"
    assert rows[1]["mentioned"] == ["person"]  # "baseball player" is a person; "table tennis" names nothing
    assert rows[2]["mentioned"] == ["bus", "hot dog", "motorcycle", "teddy bear"]  # "bus stop" names nothing
    assert rows[3]["mentioned"] == ["person", "toilet"]
    assert rows[4]["mentioned"] == ["giraffe", "person"]  # "adult giraffes" is a giraffe, "babies" persons
    # mentions 2 + 1 + 4 + 2 + 2 + 2 = 13, hallucinated 1 + 0 + 2 + 0 + 1 + 0 = 4
    assert (c["mentions"], c["hallucinated_mentions"], c["hallucinating_captions"]) == (13, 4, 3)
    assert object_recall(CAPTIONS, ANNOTATED, protocol="refloop")["object_recall"] == 1.0
    with pytest.raises(ValueError, match="unknown CHAIR protocol"):
        chair(CAPTIONS, ANNOTATED, protocol="newest")


def test_the_original_reading_step_by_step():
    assert tokenize("The dog's bowl, a hot-dog stand; isn't it 3.5 m? Yes.") == [
        "the", "dog", "'s", "bowl", ",", "a", "hot-dog", "stand", ";", "is", "n't", "it", "3.5", "m", "?", "yes", ".",
    ]  # fmt: skip
    cases = {
        "bus": "bu", "buses": "bus", "ties": "ty", "glass": "glas", "glasses": "glass", "tennis": "tenni",
        "people": "person", "women": "woman", "children": "child", "knives": "knife", "mice": "mouse", "oxen": "ox",
        "sheep": "sheep", "scissors": "scissors", "luggage": "luggage", "ponies": "pony", "giraffes": "giraffe",
        "doggies": "doggies", "skis": "ski", "calves": "calf",
    }  # fmt: skip
    assert {w: singularize(w) for w in cases} == cases
    assert read_words("two wine glasses and a passenger train") == ["two", "wine glass", "and", "a", "train"]
    assert read_words("a toilet and a seat") == ["a", "toilet", "and", "a"]  # a caption with a toilet has no seat


# ---- POPE --------------------------------------------------------------------------------------

ANSWERS = ["Yes", "No.", "NO", "No!", "I don't know", "There is a cat", "", "not sure", "Yes, but not red", None]
LABELS = ["yes", "no", "no", "no", "yes", "no", "yes", "yes", "yes", "no"]


def test_pope_reference_rule_reads_as_the_release():
    assert [reference_reading(a) for a in ANSWERS] == ["yes", "no", "yes", "yes", "yes", "yes", "yes", "no", "no", "yes"]
    assert reference_reading("Yes. There is no dog.") == "yes"  # only the first sentence is read
    assert reference_reading("Not sure") == "yes" and reference_reading("no\n") == "yes"  # exact words split on spaces
    m = pope_metrics(ANSWERS, LABELS)  # rule="reference" by default
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 4, 1, 2)
    assert m["accuracy"] == pytest.approx(4 / 10) and m["precision"] == pytest.approx(3 / 7)
    assert m["recall"] == pytest.approx(3 / 5) and m["f1"] == pytest.approx(0.5) and m["yes_ratio"] == pytest.approx(7 / 10)
    assert m["unparsed"] == 5 and m["rule"] == "reference"


def test_pope_refloop_rule_reads_the_first_yes_or_no_word():
    m = pope_metrics(ANSWERS, LABELS, rule="refloop")
    assert [r["prediction"] for r in m["samples"]] == ["yes", "no", "no", "no", "no", "no", "no", "no", "yes", "no"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 0, 5, 3)
    assert m["accuracy"] == pytest.approx(7 / 10) and m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 5)
    assert m["f1"] == pytest.approx(4 / 7) and m["yes_ratio"] == pytest.approx(2 / 10) and m["unparsed"] == 5
    with pytest.raises(ValueError, match="unknown POPE rule"):
        pope_metrics(ANSWERS, LABELS, rule="lmms-eval")


# ---- REC accuracy on a tie ------------------------------------------------------------------------


def test_iou_exactly_half_is_right_for_rec_and_pink_but_not_sc_tune_pr():
    iou = Box(0, 0, 10, 10).iou(Box(0, 0, 10, 5))
    assert iou == 0.5
    assert rec_accuracy([iou]) == 1.0 and rec_accuracy([iou], SC_TUNE_CONSISTENCY) == 0.0
    assert (REC_ACCURACY.rule, SC_TUNE_CONSISTENCY.rule, PINK_CONSISTENCY.rule) == ("IoU >= 0.5", "IoU > 0.5", "IoU >= 0.5")
    assert rec_accuracy([]) == 0.0


def test_consistency_run_counts_a_tie_for_rec_accuracy_only(tmp_path):
    records = make_records(tmp_path, 2)  # boxes (0,0,10,10) and (1,0,11,10), expressions "ref 0", "ref 1"
    answers = {"box 0": Box(0, 0, 10, 5), "box 1": Box(1, 0, 11, 10), "ref 0": Box(0, 0, 5, 10), "ref 1": Box(1, 0, 11, 10)}
    m = evaluate_consistency(ScriptedVLM(answers), sample_boxes(records, 2), tmp_path / "out", ConsistencyConfig())
    assert m["consistency_rate"] == pytest.approx(1 / 2)  # box 0 at IoU 0.5 is not consistent (Pr@0.5: IoU > 0.5)
    assert m["rec_accuracy"] == 1.0  # "ref 0" at IoU 0.5 is a right REC answer (IoU >= 0.5)


# ---- caption metrics ------------------------------------------------------------------------------


def test_caption_metrics_per_caption_and_the_fallback_named():
    preds, refs = {"a": "the red circle", "b": "a blue square"}, {"a": ["the red square"], "b": ["a blue square"]}
    m = caption_metrics(preds, refs, java=False)
    assert [round(m[f"BLEU-{n}"], 6) for n in (1, 2)] == [round(5 / 6, 6), round(((5 / 6) * (3 / 4)) ** 0.5, 6)]
    assert set(m["samples"]) == {"a", "b"}
    assert m["samples"]["b"]["BLEU-3"] == pytest.approx(1.0)  # an exact 3-word match
    assert m["samples"]["b"]["BLEU-4"] < 0.05  # no 4-gram: pycocoevalcap's tiny smoothing count, not 1
    assert m["samples"]["a"]["BLEU-1"] == pytest.approx(2 / 3, abs=1e-6) and m["samples"]["b"]["BLEU-1"] == pytest.approx(1.0)
    assert m["samples"]["b"]["ROUGE-L"] == pytest.approx(1.0) and m["samples"]["a"]["METEOR"] is None
    assert m["tokenizer"].startswith("fallback") and "not PTB" in m["tokenizer"]
    expected = "java=False was passed" if shutil.which("java") else "java not found"
    assert m["meteor_backend"] == f"unavailable: {expected}" and m["tokenizer"].endswith(expected)


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need Java")
def test_caption_metrics_with_java_score_each_caption(capfd):
    preds, refs = {"a": "the red circle", "b": "a blue square"}, {"a": ["the red square"], "b": ["a blue square"]}
    m = caption_metrics(preds, refs)
    assert "PTBTokenizer" not in capfd.readouterr().err  # the Java tokenizer's chatter is held back
    assert m["tokenizer"] == "ptb (java)"
    assert m["samples"]["b"]["METEOR"] > m["samples"]["a"]["METEOR"] > 0
    assert json.dumps(m)  # every number is a plain float


def test_child_stderr_is_held_and_replayed_only_when_the_block_fails(capfd):
    import subprocess
    import sys

    from refloop.evaluation.captions import child_stderr_held

    speak = [sys.executable, "-c", "import sys; sys.stderr.write('child says hi')"]
    with child_stderr_held():
        subprocess.run(speak, check=True)
    assert "child says hi" not in capfd.readouterr().err
    with pytest.raises(RuntimeError), child_stderr_held():
        subprocess.run(speak, check=True)
        raise RuntimeError("the tokenizer failed")
    assert "child says hi" in capfd.readouterr().err
