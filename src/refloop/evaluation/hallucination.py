"""Caption hallucination and POPE runs (SVP Sec. 4, Tables 1-3, Figs. 4 and 11): the images and
their ground truth (`load_object_data`), and the resumable runs behind `refloop eval caption` and
`refloop eval pope`. The metrics themselves live in `object_metrics` (CHAIR, recall), `pope`
(questions and scores), `synonyms` and `chair_words` (how objects are read in text); their public
names stay importable from here.

Every run writes per-sample rows beside its totals as JSONL, so each number can be recomputed
from the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from refloop.data.jsonl import write_records
from refloop.data.loaders import LoadReport, OnError, load_caption_predictions, load_pope_questions, read_json
from refloop.data.paths import shown
from refloop.data.records import ImageRecord
from refloop.data.shards import ShardedRun, share
from refloop.errors import DataError, RefloopError
from refloop.evaluation.captions import caption_metrics
from refloop.evaluation.object_metrics import (  # noqa: F401  (public names, importable from here)
    PROTOCOLS,
    ObjectReader,
    caption_objects,
    caption_rows,
    chair,
    chair_from_rows,
    default_table,
    object_mentions,
    object_recall,
    recall_from_rows,
    undefined_metrics,
)
from refloop.evaluation.pope import (  # noqa: F401
    RULES,
    STRATEGIES,
    build_pope_questions,
    parse_yes_no,
    pope_metrics,
    reference_reading,
)
from refloop.evaluation.synonyms import SynonymTable, coco_table, dataset_table, plural, shapes_table, words  # noqa: F401
from refloop.models.base import VLM, GenerateOptions
from refloop.models.spec import ModelSpec
from refloop.parallel import is_main_process
from refloop.runs import content_digest, model_fingerprint, release_outputs, shared_run_directory, write_text_whole
from refloop.world import DOMAINS, EVAL_SEED

log = logging.getLogger(__name__)

# ---- data: images, their ground-truth objects and reference captions ----------------------------


@dataclass(frozen=True)
class ObjectData:
    """Images with their ground-truth objects (names of `table`) and reference captions, aligned."""

    records: list[ImageRecord]
    objects: list[frozenset[str]]
    references: list[list[str]]
    table: SynonymTable
    unmapped_categories: dict[str, int]  # annotation categories the table has no name for: boxes per category
    report: LoadReport


def load_object_data(
    data: str,
    images: str | Path | None = None,
    captions: str | Path | None = None,
    on_error: OnError = "fail",
    num_images: int = 500,
    seed: int | None = None,
    categories: str | None = None,
    verify_images: bool = True,
) -> ObjectData:
    """Images and ground truth for caption and POPE evaluation (`verify_images`: each image file
    checked against its annotation, as the commands that read pixels need; a dataset file only).

    A shapes-world domain: its evaluation split (`num_images` scenes, seed EVAL_SEED, or `seed`
    for another split of held-out scenes, e.g. a validation one) is exported
    and read back through the COCO loader (every image, every box); each image's objects are its
    annotations' colour attribute + shape category, its reference caption the grammar's, from the
    export's captions file. A COCO-style .json or referring .jsonl: its first `num_images`
    images, objects = categories named in COCO's table (`categories="dataset"`: in a table of the
    file's own category names, `dataset_table`; crowd annotations' categories included, as the
    CHAIR release counts them), reference captions from `captions` (a COCO captions JSON) when given.
    """
    from refloop.data.sources import first_images, load_data, world_split_dir
    from refloop.world.export import CAPTIONS_FILE, COCO_FILE

    if categories not in (None, "coco", "dataset"):
        raise RefloopError(f"categories {categories!r}: choose coco (COCO's 80, as CHAIR and POPE) or dataset (the file's own)")
    if data in DOMAINS:
        if categories is not None:
            raise RefloopError("--categories is for dataset files: a shapes-world domain is read with its colour-shape objects")
        if captions is not None:
            raise RefloopError("--captions is for dataset files: a shapes-world domain's references are its grammar captions")
        split = world_split_dir(data, num_images, EVAL_SEED if seed is None else seed)
        records, report = load_data(str(split / COCO_FILE), on_error=on_error)
        by_image = read_coco_captions(split / CAPTIONS_FILE)
        objects = []
        for rec in records:
            if any("colour" not in o.attributes for o in rec.objects) or rec.image_id not in by_image:
                raise RefloopError(f"{split / COCO_FILE}: image {rec.image_id} lacks the colours or caption of its scene; delete {split}")
            objects.append(frozenset(f"{o.attributes['colour']} {o.category}" for o in rec.objects))
        return ObjectData(records, objects, [by_image[rec.image_id] for rec in records], shapes_table(), {}, report)
    if seed is not None:
        raise RefloopError("seed picks a split of a shapes-world domain; a dataset file is its own split")
    records, report = load_data(data, images, on_error=on_error, verify_images=verify_images)
    if is_main_process() and Path(data).suffix in (".jsonl", ".parquet") and any(o.expressions for r in records for o in r.objects):
        log.warning(
            f"{data} is referring data: it lists the objects its expressions refer to, not every object in the image, so "
            "CHAIR reads a caption's unlisted object as hallucinated and POPE may ask an unlisted one with the answer no; "
            "give the images' detection file (COCO instances .json) for a complete ground truth"
        )
    # the file's categories, from every image loaded (not only the first num_images): CHAIR reads a
    # caption's object as hallucinated, and POPE draws absent ones, from the whole label set
    named = (c for r in records for c in [*(o.category for o in r.objects), *r.crowd_categories])
    table = coco_table() if categories in (None, "coco") else dataset_table(named)
    records = first_images(records, num_images, data, "are evaluated (--num-images; default 500)")
    unmapped: Counter = Counter()
    objects = []
    for rec in records:
        names = set()
        # a crowd annotation ("a crowd of people") names an object in the image as much as a box does
        for category in [obj.category for obj in rec.objects] + list(rec.crowd_categories):
            name = table.canonical(category)
            if name is None:
                unmapped[category] += 1
            else:
                names.add(name)
        objects.append(frozenset(names))
    by_image = read_coco_captions(Path(captions)) if captions is not None else {}
    references = [by_image.get(rec.image_id, []) for rec in records]
    if captions is not None and records:
        matched = sum(map(bool, references))
        if not matched:  # a captions file of other images: the text metrics would be skipped as if none was given
            ours, theirs = [shown(r.image_id) for r in records[:3]], [shown(k) for k in list(by_image)[:3]]
            raise RefloopError(
                f"--captions {captions}: none of the {len(records)} images has a caption there (the data's image ids: "
                f"{', '.join(ours)}...; the file's: {', '.join(theirs) or 'none'}); it must be the captions file of these images"
            )
        if matched < len(records):
            log.warning(f"--captions {captions}: {matched} of {len(records)} images have reference captions; text metrics are over those")
    return ObjectData(records, objects, references, table, dict(unmapped), report)


def pope_file_data(path: str | Path, images: str | Path | None = None, on_error: OnError = "fail") -> tuple[ObjectData, list[dict]]:
    """The images and questions of a POPE question file (`load_pope_questions`): the questions the
    published POPE tables are scored on, asked as written. No ground truth beyond their labels."""
    records, questions, report = load_pope_questions(path, images, on_error)
    if not questions and report.skipped:
        raise RefloopError(f"{path}: no POPE question left to ask{report.skipped_note()}")
    if not questions:
        raise RefloopError(f"{path}: no POPE questions (JSON Lines of question_id, image, text, label, as the POPE release's files)")
    empty = [frozenset()] * len(records)
    return ObjectData(records, empty, [[] for _ in records], coco_table(), {}, report), questions


def _read_predictions(
    source: Path, keys: tuple[str, str], data: str, num_images: int | None, on_error, state
) -> tuple[list[dict], int | None, int]:
    """`eval caption --predictions`: the captions file read (one process: scoring text shares
    nothing), its skipped entries said, and the scenes a shapes-world domain exports: those up to
    the file's largest image id unless --num-images says."""
    if state.num_processes > 1:
        raise RefloopError("--predictions scores a captions file in one process: run it without accelerate launch")
    given, read = load_caption_predictions(source, *keys, on_error=on_error)
    if read.skipped:
        log.warning(f"{source}: {read.skipped_note().removeprefix('; ')}")
    if not given:
        raise RefloopError(f"{source}: no caption to score{read.skipped_note()}")
    ids = [p["image_id"] for p in given]
    if data in DOMAINS and num_images is None and all(type(i) is int and i >= 0 for i in ids):
        num_images = max(ids) + 1
    return given, num_images, read.skipped


def _fewer_why(found: ObjectData, task: str, metrics: dict, asked: int) -> str:
    """Why an evaluation read fewer images than --num-images asked: the data's own count, records
    or images skipped under the failure policy, (POPE) images without an object to ask about, or
    (--predictions) the images the captions file names."""
    why = []
    if len(found.records) < asked:
        why.append(f"the data holds {len(found.records)} images")
    if found.report.skipped:
        why.append(f"{found.report.skipped} records skipped (--on-error skip)")
    if metrics.get("skipped_images"):
        why.append(f"{metrics['skipped_images']} images did not decode (--on-error skip)")
    if metrics.get("predictions_file"):
        why.append(f"the captions file has captions of {metrics['num']} of them")
    if task == "pope" and any(found.objects):
        without = sum(not o for o in found.objects)
        if without:
            why.append(f"{without} of them name no object of the {found.table.name} category table, so POPE asks them nothing")
    return "; ".join(why) or "see the metrics' skipped counts"


def read_coco_captions(path: Path) -> dict[object, list[str]]:
    """image_id -> captions of a COCO captions file ({"annotations": [{"image_id", "caption"}, ...]})."""
    data = read_json(path)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise DataError(path, None, "expected a COCO captions file: an object with an 'annotations' list")
    out: dict[object, list[str]] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or isinstance(ann.get("image_id"), (bool, type(None))):
            raise DataError(path, f"annotation {i}", "expected an object with an image_id and a string caption")
        out.setdefault(ann["image_id"], []).append(ann["caption"])
    return out


# ---- evaluation runs ----------------------------------------------------------------------------


def _fingerprint(task: str, model: dict, found: ObjectData, **options) -> dict:
    """The model (`model_fingerprint`, or the captions file scored), the data and a digest of the
    ground truth (objects, references: another captions file or table is another run)."""
    sources = sorted({str(r.source) for r in found.records})
    truth = json.dumps(
        [[str(r.image_id), sorted(o), refs] for r, o, refs in zip(found.records, found.objects, found.references, strict=True)]
    )
    digest = hashlib.sha256(truth.encode()).hexdigest()[:16]
    return {"task": task, "model": model, "data": sources, "table": found.table.name, "ground_truth": digest} | options


class _LastImage:
    """Consecutive questions share an image: decode it once."""

    def __init__(self) -> None:
        self.key: object = None
        self.image: Image.Image | None = None

    def __call__(self, rec: ImageRecord) -> Image.Image:
        if self.key != rec.path or self.image is None:
            self.image, self.key = rec.load_image(), rec.path
        return self.image


def default_protocol(found: ObjectData) -> str:
    """CHAIR's protocol when none is asked: the original release's for dataset files read with
    COCO's table (what published tables compare to), refloop's for a shapes-world domain and a
    file read with its own categories (no published table; the shapes README numbers were
    measured so)."""
    return "original" if found.table.name == "coco" else "refloop"


def evaluate_captions(
    vlm: VLM,
    found: ObjectData,
    out: Path,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    progress: Callable[[int], None] | None = None,
    java: bool | None = None,
    overwrite: bool = False,
    on_error: str = "fail",
    protocol: str | None = None,
) -> dict:
    """One greedy caption per image (`vlm.caption`): CHAIR_i, CHAIR_s and object recall under both
    CHAIR protocols (`protocol`, default `default_protocol`, at the top level of the metrics and
    of each row), and BLEU-1..4/METEOR/ROUGE-L/CIDEr against the reference captions of the images
    that have them, corpus-level and per caption. Writes caption_samples.jsonl (resumable; the
    scores of every row are rewritten once all captions exist) and caption_metrics.json; an image
    that does not decode stops the run, or with on_error="skip" is skipped and counted."""
    protocol = _chosen_protocol(found, protocol)
    fingerprint = _fingerprint("caption", model_fingerprint(vlm), found, num_images=len(found.records), max_new_tokens=max_new_tokens)
    with shared_run_directory(out, fingerprint, overwrite) as state:
        return _evaluate_captions(vlm, found, Path(out), batch_size, max_new_tokens, progress, java, on_error, protocol, state)


def score_caption_file(
    found: ObjectData,
    predictions: list[dict],
    source: str | Path,
    out: Path,
    java: bool | None = None,
    overwrite: bool = False,
    protocol: str | None = None,
    on_error: str = "fail",
    check_images: bool = True,
    skipped_entries: int = 0,
) -> dict:
    """`evaluate_captions` on captions a file gives (`load_caption_predictions`: another model's
    outputs, `refloop caption --isvp`'s, a chair.py caption file) instead of generating them: each
    matched to the data's image of its id. Unlike chair.py, which scores an id it has no
    annotations for against an empty ground truth, a caption whose id is not among the data's
    images stops the run (`on_error="skip"`: skipped and counted), and with `check_images` (a
    shapes-world domain, whose splits share ids) so does one whose entry names another image file
    than the data's image of that id. The data's images without a caption are not scored.
    `skipped_entries`: entries the file's reader skipped, counted with the unmatched ones."""
    protocol = _chosen_protocol(found, protocol)
    items = {
        str(rec.image_id): (str(rec.image_id), rec, gt, refs)
        for rec, gt, refs in zip(found.records, found.objects, found.references, strict=True)
    }
    by_name = {rec.path.name: rec.image_id for rec in found.records}
    captions, problems = {}, []
    for p in predictions:
        key, named = str(p["image_id"]), p.get("image")
        if key not in items and key in by_name:  # keyed by file name
            problems.append(f"{shown(p['image_id'])} is the file name of image {shown(by_name[key])}: captions are keyed by image id")
        elif key not in items:
            problems.append(f"image {shown(p['image_id'])} is not among the data's {len(items)} images")
        elif check_images and named is not None and not _same_image(Path(named), items[key][1].path):
            problems.append(f"image {shown(p['image_id'])} was captioned from {named}, the data's image of that id is {items[key][1].path}")
        else:
            captions[key] = p["caption"]
    if problems and (on_error != "skip" or not captions):
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RefloopError(
            f"{source}: {len(problems)} of {len(predictions)} captions cannot be scored against the data: {'; '.join(problems[:3])}{more}. "
            "They must be captions of the data's images, keyed by its image ids (a shapes-world domain: its evaluation scenes, as "
            "`refloop caption --data DOMAIN` writes them; a file's images beyond --num-images are not read)"
        )
    if problems:
        log.warning(f"{source}: {len(problems)} captions skipped under --on-error skip: {'; '.join(problems[:3])}")
    fingerprint = _fingerprint(
        "caption", {"captions_sha256": content_digest(Path(source))}, found, num_images=len(found.records), predictions=len(captions)
    )
    with shared_run_directory(out, fingerprint, overwrite) as state:
        done = [it for key, it in items.items() if key in captions]
        skipped = len(problems) + skipped_entries
        empty = sum(not captions[key].strip() for key, *_ in done)
        extra = {"predictions_file": str(source)} | ({"skipped_predictions": skipped} if skipped else {})
        extra |= {"empty_captions": empty} if empty else {}
        if len(done) < len(items):
            log.info(f"{source}: captions of {len(done)} of the data's {len(items)} images; the metrics are over those")
        return _score_captions(found, done, captions, Path(out), java, protocol, 0, state, extra)


def _same_image(named: Path, ours: Path) -> bool:
    """Whether a caption's image file is the data's image: the same path, or where both files
    exist the same bytes (an export written twice); where the named file is gone (captions written
    on another machine), the same file name (a shapes-world export's names carry its scene seed)."""
    if named == ours or not named.exists() or not ours.exists():
        return named.name == ours.name
    if named.samefile(ours):
        return True
    if named.stat().st_size != ours.stat().st_size:
        return False
    return named.read_bytes() == ours.read_bytes()


def _chosen_protocol(found: ObjectData, protocol: str | None) -> str:
    protocol = protocol or default_protocol(found)
    if protocol not in PROTOCOLS:
        raise RefloopError(f"unknown CHAIR protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return protocol


def _caption_tables(found: ObjectData) -> dict[str, ObjectReader]:
    """The reader of each protocol: a shapes-world domain has one table; COCO is read by each protocol's own."""
    return {p: default_table(p) if found.table.name == "coco" else found.table for p in PROTOCOLS}


def _evaluate_captions(vlm, found: ObjectData, out: Path, batch_size, max_new_tokens, progress, java, on_error, protocol, state) -> dict:
    """Captions sharded under `accelerate launch` (see `ShardedRun`); the main process scores and
    rewrites the merged rows."""
    items = [(str(rec.image_id), rec, gt, refs) for rec, gt, refs in zip(found.records, found.objects, found.references, strict=True)]
    options = GenerateOptions(max_new_tokens=max_new_tokens)
    path = out / "caption_samples.jsonl"
    run = ShardedRun(path, items, lambda it: it[0], batch_size, state=state)
    for batch in run.batches(lambda it: it[1].load_image(), on_error, progress):
        texts = vlm.caption(batch.images, options)
        run.write(
            {"id": key, "image": str(rec.path), "caption": text, "references": refs, "annotated_objects": sorted(gt)}
            for (key, rec, gt, refs), text in zip(batch.items, texts, strict=True)
        )
    skipped = run.finish()
    captions = {r["id"]: r["caption"] for r in run.rows()}
    return _score_captions(found, [it for it in items if it[0] in captions], captions, out, java, protocol, skipped, state)


def _score_captions(found: ObjectData, done: list, captions: dict, out: Path, java, protocol, skipped, state, extra=None) -> dict:
    """CHAIR, recall and text metrics of `captions` (id -> caption) on the `done` items (id,
    record, objects, references), `extra` added to the metrics; the main process writes
    caption_samples.jsonl and caption_metrics.json."""
    path = out / "caption_samples.jsonl"
    tables = _caption_tables(found)
    per_protocol = {
        p: caption_rows(
            [captions[key] for key, *_ in done],
            [gt for _, _, gt, _ in done],
            tables[p],
            p,
            [refs for *_, refs in done] if p == "original" else None,
        )
        for p in PROTOCOLS
    }
    metrics: dict = {}
    for p in (protocol, *(q for q in PROTOCOLS if q != protocol)):
        scores = chair_from_rows(per_protocol[p]) | recall_from_rows(per_protocol[p])
        if p == protocol:
            metrics |= scores | {"chair_protocol": protocol}
        metrics.setdefault("chair_by_protocol", {})[p] = scores
    metrics |= {"num": len(done), "table": found.table.name} | (extra or {})
    undefined = undefined_metrics(metrics, found.table.name)
    if undefined:
        metrics["undefined"] = undefined
        if metrics.get("object_recall") is None and metrics.get("chair_i") is None:  # nothing CHAIR can read here
            log.warning(
                f"CHAIR_i and object recall are null (CHAIR_s is 0: no caption holds a hallucinated mention, as chair.py "
                f"counts it): no annotation or caption names an object of the {found.table.name} "
                "category table (coco reads COCO's 80 objects and their synonyms, --categories dataset the data's own category "
                "names; reasons under 'undefined')"
            )
    scored = [it for it in done if it[3]]
    text_scores: dict = {}
    if scored:
        text = caption_metrics({key: captions[key] for key, *_ in scored}, {key: refs for key, *_, refs in scored}, java=java)
        text_scores = text.pop("samples")
        metrics |= {k: v for k, v in text.items() if k != "num"} | {"num_with_references": len(scored)}
    else:
        metrics["text_metrics"] = "skipped: no reference captions (pass --captions with a COCO captions file)"
    rows = []
    for i, (key, rec, gt, refs) in enumerate(done):
        chosen = per_protocol[protocol][i]
        rows.append(
            {"id": key, "image": str(rec.path), "references": refs, "annotated_objects": sorted(gt), "chair_protocol": protocol}
            | chosen
            | {"protocols": {p: {k: v for k, v in per_protocol[p][i].items() if k != "caption"} for p in PROTOCOLS}}
            | text_scores.get(key, {})
        )
    if found.unmapped_categories:
        metrics["unmapped_categories"] = found.unmapped_categories
    if skipped:
        metrics["skipped_images"] = skipped
    if state.is_main_process:
        write_records(path, rows)
        write_text_whole(out / "caption_metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def pope_questions(found: ObjectData, strategy: str = "random", per_image: int = 3, seed: int = 0) -> list[dict]:
    """`build_pope_questions` on loaded data, negatives from all of the table's objects; no
    question at all is a RefloopError saying which table the categories were read with and what to do."""
    questions = build_pope_questions(found.records, found.objects, strategy, per_image, seed, found.table.objects, found.table)
    if questions:
        return questions
    with_objects = sum(bool(o) for o in found.objects)
    why = f"{with_objects} of {len(found.records)} images have an object named in the {found.table.name} category table"
    if found.unmapped_categories:
        names = sorted(found.unmapped_categories, key=lambda c: -found.unmapped_categories[c])
        why += f"; categories not in that table: {', '.join(names[:8])}" + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
    raise RefloopError(
        f"no POPE questions: {why}. POPE asks about objects the table names (COCO's 80 categories, or a shapes-world domain's "
        "colour-shape objects): use annotations with those category names, or --categories dataset to ask about the data's own"
    )


def evaluate_pope(
    vlm: VLM,
    found: ObjectData,
    out: Path,
    strategy: str = "random",
    per_image: int = 3,
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    on_error: str = "fail",
    rule: str = "reference",
    questions: list[dict] | None = None,
    generated: bool = False,
    question_file: str | None = None,
) -> dict:
    """POPE: balanced yes/no questions from the ground truth (`pope_questions`, unless given:
    e.g. a question file of the POPE release, `pope_file_data`), asked through `vlm.answer` in the
    table's wording (given questions: as written). The metrics of `rule` (default: the POPE
    release's reading) are at the top level, both rules' under "by_rule". Writes
    pope_samples.jsonl (resumable) and pope_metrics.json; undecodable images as in
    `evaluate_captions`. Given questions enter the run's fingerprint (another set is another run)
    unless `generated` says they are `pope_questions(found, strategy, per_image, seed)`;
    `question_file` (where given ones were read) is recorded in the metrics."""
    if rule not in RULES:
        raise RefloopError(f"unknown POPE rule {rule!r}; choose one of {', '.join(RULES)}")
    options = {"strategy": strategy, "per_image": per_image, "seed": seed}
    if questions is None:
        questions = pope_questions(found, strategy, per_image, seed)
    elif not generated:
        options = {"questions": hashlib.sha256(json.dumps(questions, sort_keys=True, default=str).encode()).hexdigest()[:16]}
    fingerprint = _fingerprint("pope", model_fingerprint(vlm), found, num_images=len(found.records), **options)
    with shared_run_directory(out, fingerprint, overwrite) as state:
        drawn = {"strategy": strategy, "per_image": per_image, "seed": seed} if question_file is None else {"questions": question_file}
        return _evaluate_pope(vlm, found, questions, Path(out), drawn, batch_size, progress, on_error, rule, state)


def _evaluate_pope(vlm, found: ObjectData, questions, out: Path, drawn: dict, batch_size, progress, on_error, rule, state) -> dict:
    """Sharded under `accelerate launch` (see `ShardedRun`)."""
    record_of = {rec.image_id: rec for rec in found.records}
    load = _LastImage()
    run = ShardedRun(out / "pope_samples.jsonl", questions, lambda q: q["id"], batch_size, state=state)
    for batch in run.batches(lambda q: load(record_of[q["image_id"]]), on_error, progress):
        answers = vlm.answer(batch.images, [q["question"] for q in batch.items])
        run.write(
            q | {"answer": a, "parsed": parse_yes_no(a), "reference_reading": reference_reading(a)}
            for q, a in zip(batch.items, answers, strict=True)
        )
    skipped = run.finish()
    rows = run.rows()
    answers, labels = [r["answer"] for r in rows], [r["label"] for r in rows]
    scores = pope_metrics(answers, labels, rule)
    del scores["samples"]
    by_rule = {}
    for name in RULES:
        each = pope_metrics(answers, labels, name)
        by_rule[name] = {k: each[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed", "tp", "fp", "tn", "fn")}
    metrics = scores | {"by_rule": by_rule} | drawn
    metrics["images"] = len({r["image_id"] for r in rows})
    metrics["table"] = found.table.name
    if skipped:
        metrics["skipped_questions"] = skipped
    unparsed = by_rule["refloop"]["unparsed"]
    if rows and unparsed * 2 > len(rows) and state.is_main_process:
        # the release's rule reads an answer without "no" as yes, so a model that answers nothing scores F1 0.667
        log.warning(
            f"POPE: {unparsed} of {len(rows)} answers say neither yes nor no (the reference rule reads them as yes: "
            f"F1 {by_rule['reference']['f1']:.3f} there, {by_rule['refloop']['f1']:.3f} under refloop's); look at pope_samples.jsonl"
        )
    if state.is_main_process:
        write_text_whole(out / "pope_metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def run_object_eval(
    task: str,
    spec: ModelSpec,
    data: str,
    out: Path,
    images: str | Path | None = None,
    captions: str | Path | None = None,
    num_images: int | None = None,
    strategy: str = "random",
    per_image: int = 3,
    seed: int = 0,
    protocol: str | None = None,
    rule: str = "reference",
    categories: str | None = None,
    batch_size: int = 64,
    on_error: OnError = "fail",
    overwrite: bool = False,
    progress: bool = False,
    question_file: str | Path | None = None,
    report: bool = True,
    predictions: str | Path | None = None,
    prediction_keys: tuple[str, str] = ("image_id", "caption"),
    max_new_tokens: int = 64,
) -> tuple[dict, LoadReport] | None:
    """`refloop eval caption` / `eval pope`: the images and their objects loaded (a shapes-world
    domain exported once, by the main process), POPE's questions drawn before any weights load
    (or read from `question_file`, a question file of the POPE release, instead of `data`), the
    run, and with `report` report.html. `eval caption --predictions`: the captions of that file
    (`load_caption_predictions` with `prediction_keys`, image id and caption) are scored, no model
    loads, and a data file's images are all read unless `num_images` is given. The main process
    returns the metrics and the data's load report; the others None. `progress`: show a progress bar."""
    from refloop.progress import progress_bar
    from refloop.report.hallucination import REPORT_FILES, write_caption_report, write_pope_report

    state = spec.process_state()
    questions = given = None
    if predictions is not None:  # the file is read first: its own problems stop the run before the data loads
        given, num_images, unread = _read_predictions(Path(predictions), prediction_keys, data, num_images, on_error, state)
    with state.main_process_first():
        if question_file is not None:
            found, questions = pope_file_data(question_file, images, on_error)
        else:
            # a captions file's images are not read, only their annotations (chair.py needs no pixels)
            limit = num_images if predictions is not None and data not in DOMAINS else num_images or 500
            found = load_object_data(
                data, images, captions, on_error=on_error, num_images=limit, categories=categories, verify_images=predictions is None
            )
    if not found.records:
        raise RefloopError(f"{question_file or data}: no images to evaluate{found.report.skipped_note()}")
    pope = {"strategy": strategy, "per_image": per_image, "seed": seed}
    if task == "pope" and question_file is None:
        questions = pope_questions(found, **pope)
    common = {"overwrite": overwrite, "on_error": on_error}
    if given is not None:
        checks = {"check_images": data in DOMAINS, "skipped_entries": unread}
        metrics = score_caption_file(found, given, predictions, out, protocol=protocol, **checks, **common)
        name = f"captions of {Path(predictions).name}"
        if report and not found.records[0].path.exists():  # annotations only were read: the pictures may be elsewhere
            log.warning(f"{found.records[0].path}: no such image, so report.html shows the captions without their images (--images DIR)")
    else:
        vlm = spec.load_vlm(batch_size, generation=True)
        name, common = vlm.name, common | {"batch_size": batch_size}
        if task == "caption":
            with progress_bar(f"caption {data}", share(len(found.records), batch_size), enabled=progress) as advance:
                metrics = evaluate_captions(vlm, found, out, progress=advance, protocol=protocol, max_new_tokens=max_new_tokens, **common)
        else:
            title = f"pope {Path(question_file).name}" if question_file is not None else f"pope {strategy} {data}"
            with progress_bar(title, share(len(questions), batch_size), enabled=progress) as advance:
                asked = {"questions": questions, "generated": question_file is None, "question_file": question_file and str(question_file)}
                metrics = evaluate_pope(vlm, found, out, progress=advance, rule=rule, **asked, **pope, **common)
    if not state.is_main_process:
        return None
    if task == "caption" and captions is None and found.table.name == "coco" and metrics.get("chair_protocol") == "original":
        log.warning(
            "chair.py adds the objects an image's reference captions name to its ground truth: without --captions (COCO's "
            "captions_*.json) more mentions count as hallucinated than in the tables it publishes"
        )
    if found.report.skipped:  # the metrics file people keep says its numbers are of a subset
        metrics["skipped_records"] = found.report.skipped
        write_text_whole(Path(out) / f"{task}_metrics.json", json.dumps(metrics, indent=2) + "\n")
    evaluated = metrics.get("images", metrics.get("num"))
    if num_images is not None and isinstance(evaluated, int) and evaluated < num_images:  # asked for, not the default
        log.warning(
            f"{data}: {evaluated} images evaluated, not {num_images} (--num-images): {_fewer_why(found, task, metrics, num_images)}"
        )
    if report:
        write = write_caption_report if task == "caption" else write_pope_report
        write(Path(out), metrics, name, str(question_file or data), {str(r.path): r.load_image for r in found.records})
    else:  # an earlier run's report would stand beside other results
        release_outputs(Path(out), *(Path(out) / name for name in REPORT_FILES))
    return metrics, found.report
