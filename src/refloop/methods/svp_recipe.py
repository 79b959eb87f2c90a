"""`refloop svp`: a YAML recipe around SVP (paper 004): the seed images, the grounder, the visual
queries of SVP (CVQ), the loop of `refloop.methods.svp`, the export (per-iteration PEFT adapters,
the final merged checkpoint), results.json and a per-iteration report."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

from accelerate import PartialState
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from refloop.data.records import ImageRecord, InstructionExample, ObjectAnnotation
from refloop.data.shards import share
from refloop.data.sources import load_detections
from refloop.data.vocabulary import Vocabulary
from refloop.errors import RefloopError
from refloop.evaluation.synonyms import SynonymTable
from refloop.grounding import Grounder
from refloop.limits import Seed
from refloop.methods.bootstrap_recipe import shapes_area
from refloop.methods.pink import BootstrapConfig
from refloop.methods.recipe import RecipeRun, run_recipe
from refloop.methods.svp import SVP, SVPConfig
from refloop.models.spec import ModelSpec
from refloop.training.trackers import TrackingSpec

log = logging.getLogger(__name__)


class GrounderSpec(BaseModel):
    """The feedback model g: the shapes-world scene oracle, an open-set detector through
    transformers, Florence-2's phrase grounding, or any VLM's REC."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["oracle", "grounding-dino", "owlv2", "florence-2", "vlm"] = Field("oracle", description="which grounder")
    model: str | None = Field(None, description="checkpoint of the detector / Florence-2 / VLM (kind != oracle)")
    miss_rate: float = Field(0.1, ge=0, le=1, description="oracle: share of true objects it misses")
    false_positive_rate: float = Field(0.1, ge=0, le=1, description="oracle: false detections per requested phrase")
    jitter: float = Field(0.05, ge=0, le=1, description="oracle: box corner noise as a fraction of the box size")
    threshold: float | None = Field(None, ge=0, le=1, description="detectors: box score threshold (default: the wrapper's)")
    text_threshold: float | None = Field(None, ge=0, le=1, description="GroundingDINO: phrase token threshold")
    seed: Seed = Field(0, description="oracle: seed of its misses, false detections and jitter")

    def check_data(self, shapes: bool, phrases: str) -> None:
        """Before anything loads: the scene oracle knows the objects of shapes-world scenes only,
        so it cannot ground a caption's phrases on other images."""
        if self.kind == "oracle" and phrases != "categories" and not shapes:
            raise RefloopError(
                "the scene oracle grounds shapes-world images only: use a shapes-world domain as the data or another grounder "
                "(grounding-dino, owlv2, florence-2 or vlm)"
            )

    def check_caption(self, data: str, isvp: bool, phrases: str) -> None:
        """`refloop caption`'s options, before anything loads: what is grounded, and with iSVP
        whether this grounder can ground `data`'s images."""
        from refloop.world import DOMAINS

        if phrases not in ("caption", "categories", "both"):
            raise RefloopError(f"--phrases {phrases!r}: choose caption, categories or both")
        if isvp:
            self.check_data(data in DOMAINS, phrases)

    def build(self, vlm, device: str, dtype: str) -> Grounder:
        from refloop.grounding import Florence2Grounder, HFGroundingDINO, HFOwlV2, SceneOracle, VLMGrounder
        from refloop.models.hf import check_local_or_hub

        if self.kind == "oracle":
            return SceneOracle(self.miss_rate, self.false_positive_rate, self.jitter, self.seed)
        if self.kind == "vlm":
            other = vlm if self.model is None else _load(self.model, device, dtype)
            return VLMGrounder(other)
        if self.model is None:
            raise RefloopError(
                f"grounder kind {self.kind!r} needs its checkpoint: --grounder-model on the command line, grounder.model "
                "in a recipe (a checkpoint directory or hub id)"
            )
        check_local_or_hub(self.model, "grounder model")
        options = {k: v for k, v in (("threshold", self.threshold), ("text_threshold", self.text_threshold)) if v is not None}
        if self.kind == "grounding-dino":
            return HFGroundingDINO.from_pretrained(self.model, device=device, dtype=dtype, **options)
        if self.kind == "owlv2":
            options.pop("text_threshold", None)
            return HFOwlV2.from_pretrained(self.model, device=device, dtype=dtype, **options)
        return Florence2Grounder(_load(self.model, device, dtype))


def _load(model: str, device: str, dtype: str):
    from refloop.models import load_vlm

    return load_vlm(model, device=device, dtype=dtype)


QUERY_TASKS = {"rec": "visual-grounding", "reg": "grounding-caption"}  # the RC tasks of REC and REG, in the model's native prompts
CVQ_TASKS = ("rec", "reg", "yes-no")  # SVP (CVQ)'s query tasks


class SVPRecipe(ModelSpec, TrackingSpec):
    """The model fields come from `ModelSpec`, the tracker fields from `TrackingSpec`."""

    train_data: str = Field("wild", description="seed images: a shapes-world domain (training seed) or a detection .json / .jsonl")
    images: str | None = Field(None, description="image root of train_data's relative paths")
    num_images: int = Field(200, ge=1, description="C: seed images (paper: 1000 COCO images)")
    grounder: GrounderSpec = Field(default_factory=GrounderSpec, description="the feedback model")
    cvq_data: str | None = Field(
        None, description="SVP (CVQ): referring data whose REC / REG pairs and yes/no questions are mixed in (svp.cvq_ratio per caption)"
    )
    cvq_images: int = Field(200, ge=1, description="images of cvq_data used")
    cvq_source: Literal["history", "seed-images"] = Field(
        "history",
        description="SVP (CVQ)'s visual queries: cvq_data (the training history, as the paper), or the seed images' own "
        "self-consistent pairs on the grounder's boxes (label-free; beyond the papers, see seed_image_queries)",
    )
    cvq_bootstrap: BootstrapConfig = Field(
        default_factory=BootstrapConfig, description="cvq_source seed-images: Pink's filter settings for the seed images' pairs"
    )
    cvq_tasks: tuple[Literal["rec", "reg", "yes-no"], ...] = Field(
        CVQ_TASKS,
        min_length=1,
        description="SVP (CVQ)'s query tasks (paper: every task of the history); yes-no in the shapes world or from the seed images",
    )
    svp: SVPConfig = Field(default_factory=SVPConfig, description="the method's settings")

    @field_validator("cvq_tasks")
    @classmethod
    def _each_task_once(cls, tasks):
        if len(set(tasks)) < len(tasks):
            raise ValueError(f"names a task twice: {list(tasks)}")
        return tasks

    @model_validator(mode="before")
    @classmethod
    def _shapes_area(cls, data):
        """Pink's area filter scaled to shapes-world scenes when the seed images are one (as `refloop bootstrap`)."""
        return shapes_area(data, "train_data", "cvq_bootstrap", default_data="wild")


def query_examples(
    records: Sequence[ImageRecord],
    profile,
    image_root: Path | None = None,
    yes_no: tuple[Sequence[frozenset[str]], Sequence[str] | None, SynonymTable] | None = None,
    tasks: Sequence[str] = CVQ_TASKS,
) -> list[InstructionExample]:
    """SVP (CVQ)'s visual queries on `records`: those of `tasks` ("rec", "reg", "yes-no"). REC and
    REG of the objects' expressions in the model's native prompts (at most 2 per image and task)
    and, with `yes_no` (each image's objects, the universe absent objects are drawn from or None
    for theirs, the question wording), one balanced yes/no existence pair per image. Built in a
    temporary folder of this process, so every process of `accelerate launch` builds the same list
    without sharing a file."""
    import tempfile

    from refloop.data.rc import build_rc_data, load_rc_data
    from refloop.evaluation.pope import build_pope_questions

    out: list[InstructionExample] = []
    rc_tasks = [QUERY_TASKS[t] for t in tasks if t in QUERY_TASKS]
    if rc_tasks and any(o.expressions for r in records for o in r.objects):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "queries.jsonl"
            build_rc_data(records, path, rc_tasks, profile, seed=0, max_per_image=2, native=True)
            out = load_rc_data(path, image_root=image_root)
    if yes_no is not None and "yes-no" in tasks:
        objects, universe, table = yes_no
        questions = build_pope_questions(records, objects, "random", per_image=1, seed=0, categories=universe, table=table)
        out += [InstructionExample(q["image"], profile.prompt(q["question"]), q["label"], example_id=q["id"]) for q in questions]
    return out


def visual_queries(recipe: SVPRecipe, profile) -> list[InstructionExample]:
    """SVP (CVQ): the model's own task prompts on `cvq_data` (the training history): REC and REG
    and, in the shapes world, yes/no existence questions in the grammar's wording."""
    if recipe.cvq_data is None:
        return []
    from refloop.evaluation.hallucination import shapes_table
    from refloop.grounding.oracle import scene_objects

    found = load_detections(recipe.cvq_data, recipe.images, num_images=recipe.cvq_images, limit="cvq_images")
    if not any(o.expressions for r in found.records for o in r.objects):
        raise RefloopError(f"cvq_data {recipe.cvq_data!r}: no referring expressions, so no REC / REG queries (use referring data)")
    yes_no = None
    if found.vocabulary is not None:  # the shapes world: its POPE questions too
        objects = [frozenset(f"{o.colour} {o.shape}" for o in scene_objects(r)) for r in found.records]
        yes_no = (objects, None, shapes_table())
    return query_examples(found.records, profile, found.image_root, yes_no, recipe.cvq_tasks)


def seed_image_queries(
    vlm,
    grounder: Grounder,
    records: Sequence[ImageRecord],
    work: Path,
    cfg: BootstrapConfig,
    vocabulary: Vocabulary | None = None,
    questions: SynonymTable | None = None,
    on_error: str = "fail",
    labels: Sequence[str] = (),
    tasks: Sequence[str] = CVQ_TASKS,
) -> tuple[list[InstructionExample], dict]:
    """SVP (CVQ)'s visual queries made from the seed images themselves, without labels: the
    grounder's boxes for the dataset's categories (the detector SVP already runs: `labels`, the
    dataset's label set; default: a closed `vocabulary`'s categories, else every category named in
    `records`), each described and located
    again by `vlm` and kept when IoU >= lambda (Pink Sec. 3.3, `methods.pink`); the kept pairs
    become REC and REG queries in the model's native prompts and, with a `questions` wording,
    balanced yes/no existence questions whose labels are the grounder's detections (so its false
    detections give wrong "yes" labels, its misses wrong "no" ones).

    Beyond both papers: SVP's CVQ draws visual queries from the model's training history, whose
    images for a real LVLM are the seed images' kind (COCO); where the history does not cover the
    seed images' kind, these queries keep the model answering other tasks on it. `tasks`: which
    queries ("rec", "reg", "yes-no"; `query_examples`). Returns the
    examples and the counts (boxes grounded, pairs kept, queries). Resumes the bootstrapping in
    `work`; under `accelerate launch` every process grounds every image (cheap next to the
    describe-then-locate pass, which is sharded)."""
    from refloop.data.bootstrapped import bootstrapped_records
    from refloop.data.shards import readable
    from refloop.methods.pink import bootstrap
    from refloop.methods.svp import label_set

    # a detector run over the dataset's label set, never told which labels an image has
    every = list(labels or label_set(records, vocabulary))
    if vocabulary is not None and vocabulary.categories:
        universe = list(vocabulary.categories)
    else:
        universe = sorted({o.category for r in records for o in r.objects if o.category})
    grounded, skipped = [], []
    for start in range(0, len(records), cfg.batch_size):
        batch, images = readable(records[start : start + cfg.batch_size], lambda r: r.load_image(), on_error, skipped)
        for record, found in zip(batch, grounder.ground(images, [every] * len(batch), records=batch), strict=True):
            objects = tuple(
                ObjectAnnotation(b, label, ann_id=k) for k, (b, label) in enumerate(zip(found.boxes, found.labels, strict=True))
            )
            grounded.append(replace(record, objects=objects))
    stats = bootstrap(vlm, grounded, work / "bootstrap", cfg, grammar=False, on_error=on_error, write_report=False)
    # every box of the merged run (so every process asks the same questions); the kept ones carry their expression
    bootstrapped = bootstrapped_records(work / "bootstrap", grounded)
    detected = [frozenset(o.category for o in r.objects) for r in bootstrapped]
    kept = [replace(r, objects=pairs) for r in bootstrapped if (pairs := tuple(o for o in r.objects if o.expressions))]
    yes_no = (detected, universe, questions) if questions is not None and universe and "yes-no" in tasks else None
    out = query_examples(kept, vlm.profile, yes_no=None, tasks=tasks)
    asked = query_examples(grounded, vlm.profile, yes_no=yes_no, tasks=("yes-no",)) if yes_no else []
    tasks = Counter(e.example_id.rsplit("/", 2)[1] for e in out)
    summary = {
        "images": len(grounded),
        "unreadable_images": len(skipped),
        "boxes_grounded": sum(len(r.objects) for r in grounded),
        "pairs_kept": sum(len(r.objects) for r in kept),
        "queries": dict(tasks) | ({"yes-no": len(asked)} if yes_no else {}),
    }
    if stats is not None:  # the main process: Pink's keep rate (kept / boxes past A.2's filters)
        summary["keep_rate"] = stats.get("keep_rate")
    if not out and not asked and PartialState().is_main_process:
        log.warning(f"SVP (CVQ) from the seed images: no pair was kept and no question asked ({summary}); SVP trains on captions alone")
    return out + asked, summary


def check_cvq(recipe: SVPRecipe) -> None:
    """SVP (CVQ)'s settings before any work: queries asked for need a source, and the seed images'
    queries take their boxes from the grounder."""
    if recipe.svp.cvq_ratio <= 0:
        return
    if recipe.cvq_source == "seed-images" and not recipe.svp.grounding:
        raise RefloopError("cvq_source seed-images takes its boxes from the grounder: it needs svp.grounding true")
    if recipe.cvq_source == "history" and recipe.cvq_data is None:
        raise RefloopError(
            "svp.cvq_ratio > 0 mixes in visual queries: name their source, cvq_data (the training history's referring data) "
            "or cvq_source: seed-images"
        )


def cvq_examples(
    recipe: SVPRecipe, vlm, grounder: Grounder | None, records, vocabulary, work: Path, labels: tuple[str, ...] = ()
) -> tuple[list, dict | None]:
    """SVP (CVQ)'s visual queries as the recipe asks (none at cvq_ratio 0): from the training
    history (`visual_queries`) or from the seed images (`seed_image_queries`, with their counts)."""
    check_cvq(recipe)
    if recipe.svp.cvq_ratio <= 0:
        return [], None
    if recipe.cvq_source == "history":
        return visual_queries(recipe, vlm.profile), None
    from refloop.evaluation.hallucination import shapes_table
    from refloop.world import DOMAINS

    table = shapes_table() if recipe.train_data in DOMAINS else None  # the shapes world's question wording
    queries, counts = seed_image_queries(
        vlm, grounder, records, work, recipe.cvq_bootstrap, vocabulary, table, labels=labels, tasks=recipe.cvq_tasks
    )
    if PartialState().is_main_process:
        log.info(f"SVP (CVQ) from the seed images: {counts}")
    return queries, counts


def load_seed_images(recipe: SVPRecipe) -> tuple[list[ImageRecord], Vocabulary | None, tuple[str, ...]]:
    """The seed images, their closed vocabulary (if any) and the label set a detector is asked for."""
    from refloop.methods.svp import label_set

    found = load_detections(recipe.train_data, recipe.images, num_images=recipe.num_images, limit="num_images")
    if not found.records:
        raise RefloopError(f"train_data {recipe.train_data!r}: no images")
    return found.records, found.vocabulary, label_set(found.records, found.vocabulary, found.categories)


def run_svp(recipe: SVPRecipe, out: Path, progress: Callable[[str, int, int], None] | None = None, overwrite: bool = False) -> dict:
    """Run (or resume) SVP in `out`; a run with another recipe (other than its thread count) is
    refused unless `overwrite`."""
    if recipe.generation_backend != "hf":
        raise RefloopError("generation_backend vllm serves sctune recipes and the inference commands; svp recipes generate with hf")

    def body(run: RecipeRun) -> dict:
        return _run_svp(recipe, run, progress)

    def card(results: dict) -> dict:
        final = results["iterations"][-1] if results["iterations"] else {}
        return {k: v for k, v in results.items() if k != "iterations"} | {"final_iteration": final}

    def prepare() -> None:
        check_cvq(recipe)
        if recipe.svp.grounding:
            from refloop.world import DOMAINS

            recipe.grounder.check_data(recipe.train_data in DOMAINS, recipe.svp.phrases)
        recipe.load_profile()

    # runs from before cvq_source existed took their queries from the history, and from before cvq_tasks every task: still the same run
    unchanged = frozenset({"cvq_source", "cvq_bootstrap"}) if recipe.cvq_source == "history" else frozenset()
    if tuple(recipe.cvq_tasks) == CVQ_TASKS:
        unchanged |= {"cvq_tasks"}
    # On a dataset file (open vocabulary) the categories were once asked per image: such runs are another run's.
    from refloop.world import DOMAINS

    asks = (recipe.svp.grounding and recipe.svp.phrases != "caption") or recipe.cvq_source == "seed-images"
    open_labels = asks and recipe.train_data not in DOMAINS
    more = {"categories_asked": "the dataset's label set"} if open_labels else None
    return run_recipe("svp", recipe, out, body, overwrite, unchanged=unchanged, card_metrics=card, prepare=prepare, fingerprint=more)


def _run_svp(recipe: SVPRecipe, run: RecipeRun, progress) -> dict:
    out = run.out
    vlm = recipe.load_vlm(batch_size=recipe.svp.sft.generation_batch_size)
    with PartialState().main_process_first():  # a shapes-world domain is exported once, by the main process
        records, vocabulary, labels = load_seed_images(recipe)
    if recipe.svp.grounding and recipe.svp.phrases != "categories" and vocabulary is None and recipe.grounder.kind == "oracle":
        raise RefloopError("the scene oracle grounds shapes-world images only: use a shapes-world train_data or another grounder.kind")
    grounder = recipe.grounder.build(vlm, recipe.device, recipe.dtype) if recipe.svp.grounding else None
    queries, counts = cvq_examples(recipe, vlm, grounder, records, vocabulary, out / "cvq", labels)
    started = time.perf_counter()
    method = SVP(vlm, grounder, recipe.svp, vocabulary=vocabulary, tracking=run.tracking, labels=labels)
    iterations = method.run(records, out, queries, progress)
    results = {
        "train_data": recipe.train_data,
        "images": len(records),
        "grounder": recipe.grounder.kind if recipe.svp.grounding else None,
        "score": recipe.svp.score,
        "iterations": iterations,
        "seed_image_queries": counts,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if run.main_process:
        from refloop.report.svp import write_svp_report

        run.export(
            method.vlm.processor,
            merged=method.vlm.model,
            folded=f"the `{recipe.svp.sft.adapter}` adapter"
            + (f"s of iterations 1 to {len(iterations)}, in turn," if len(iterations) > 1 else ""),
        )
        write_svp_report(out, results, records)
    return results


def run_captions(
    spec: ModelSpec,
    grounding: GrounderSpec,
    data: str,
    out: Path,
    images: str | Path | None = None,
    num_images: int = 100,
    isvp: bool = False,
    phrases: str = "caption",
    batch_size: int = 64,
    on_error: str = "fail",
    overwrite: bool = False,
    progress: bool = False,
    max_new_tokens: int = 64,
) -> int | None:
    """`refloop caption`: greedy captions of `data`'s images (a shapes-world domain's evaluation
    scenes, the ones `eval caption` scores, exported once by the main process), with `isvp` SVP's
    inference-time variant through `grounding`. The main process returns the images skipped as
    unreadable; the others None. `progress`: show a progress bar."""

    from refloop.methods.svp import caption_images, label_set
    from refloop.progress import progress_bar
    from refloop.runs import records_digest
    from refloop.world import EVAL_SEED

    state = spec.process_state()
    with state.main_process_first():
        found = load_detections(data, images, on_error, num_images, EVAL_SEED, limit="--num-images")
    vlm = spec.load_vlm(batch_size, generation=True)
    ground = grounding.build(vlm, spec.device, spec.dtype) if isvp else None
    records = {"name": data, "image_root": str(found.image_root), "records": records_digest(found.records)}
    fingerprint = {"data": records, "isvp": isvp}
    if isvp:  # plain captioning reads neither: they must not block resuming it
        fingerprint |= {"grounder": grounding.model_dump(), "phrases": phrases}
        if phrases != "caption" and found.vocabulary is None:  # asked per image before: those rows are another run's
            fingerprint["categories_asked"] = list(label_set(found.records, None, found.categories))
    with progress_bar("caption" + (" (iSVP)" if isvp else ""), share(len(found.records), batch_size), enabled=progress) as advance:
        labels = label_set(found.records, found.vocabulary, found.categories)
        skipped = caption_images(
            vlm,
            found.records,
            out,
            ground,
            phrases,
            found.vocabulary,
            batch_size,
            fingerprint,
            advance,
            overwrite,
            on_error,
            labels,
            max_new_tokens,
        )
    return skipped if state.is_main_process else None
