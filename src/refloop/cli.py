"""The `refloop` command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from refloop.errors import RefloopError


class _Group(typer.core.TyperGroup):
    """Typer's group, with the `-h/--help` option shown without a value placeholder.

    Typer prints `<bool>` after every flag, --help included; refloop's own flags pass `metavar=""`
    (`_flag`), and this does the same for the help option typer makes itself, on the group and on
    every command the group hands out.
    """

    def get_help_option(self, ctx):
        return _no_placeholder(super().get_help_option(ctx))

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None and not isinstance(command, _Group):
            _no_placeholder(command.get_help_option(ctx))
        return command


def _no_placeholder(option):
    if option is not None:
        option.metavar = ""
    return option


app = typer.Typer(
    cls=_Group,
    help="refloop: make vision-language models self-consistent about the objects they talk about.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",  # a docstring's single line breaks joined, `code` shown as code
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)


def _flag(default: bool, *decls: str, help: str):
    """A boolean flag, shown without a value placeholder (typer would print `<bool>` after it)."""
    return typer.Option(default, *decls, metavar="", help=help)


def _print_version(value: bool) -> None:
    if value:
        from refloop import __version__

        console.print(f"refloop {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, metavar="", help="Print refloop's version and exit."
    ),
) -> None:
    """refloop: make vision-language models self-consistent about the objects they talk about."""


class OnErrorChoice(str, Enum):
    fail = "fail"
    skip = "skip"


EvalReportOpt = _flag(True, "--report/--no-report", help="Write report.html: what the answers get wrong, with examples on their images.")
ModelOpt = typer.Option(None, "--model", help="Model directory or hub id (default: the embedded refloop-tiny).")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bf16 on capable GPUs, else fp32), fp32, bf16 or fp16.")
BatchOpt = typer.Option(64, "--batch-size", min=1, help="Images per generation batch.")
RefDataOpt = typer.Option(
    ..., "--data", help="Shapes-world domain, referring .jsonl, .parquet dataset, or with --refs a COCO instances .json."
)
RefsOpt = typer.Option(None, "--refs", help="RefCOCO/+/g refs file (.json export or the original .p, read safely).")
SplitOpt = typer.Option(None, "--split", help="RefCOCO split to keep (train, val, test, testA, testB; default: every split).")
ImagesOpt = typer.Option(None, "--images", help="Image root.")


log = logging.getLogger(__name__)


def _recipe_option(names: str, extra: str = ""):
    """`--config`: a YAML file, or a recipe shipped in src/refloop/recipes/ by name."""
    return typer.Option(None, "--config", help=f"YAML recipe file, or a packaged recipe by name ({names}){extra}.")


OverwriteOpt = _flag(
    False, "--overwrite", help="Replace the outputs of a different earlier run in --out (refused by default; the same run resumes)."
)
OnErrorOpt = typer.Option(OnErrorChoice.fail, "--on-error", help="fail: stop at the first bad record; skip: skip and count.")
ReportToOpt = typer.Option(
    None,
    "--report-to",
    help="Tracker of the training metrics and recipe: none, tensorboard (RUN/train/tensorboard; SVP: RUN/iteration-N/train/tensorboard), "
    "wandb or trackio "
    "(the recipe's report_to; same as --set report_to=...).",
)


def _with_report_to(overrides: list[str], report_to: str | None) -> list[str]:
    return [*overrides, f"report_to={report_to}"] if report_to is not None else overrides


ProfileOpt = typer.Option(
    None,
    "--profile",
    help="Prompt profile (refloop-tiny, qwen2-vl, qwen2.5-vl, qwen3-vl, florence-2, kosmos-2, paligemma, internvl); "
    "default: chosen from the checkpoint's model_type.",
)
RemoteOpt = _flag(False, "--trust-remote-code", help="Allow a checkpoint's own modelling code (only for checkpoints you trust).")


class BackendChoice(str, Enum):
    hf = "hf"
    vllm = "vllm"


BackendOpt = typer.Option(
    BackendChoice.hf,
    "--backend",
    help="What generates: hf (transformers) or vllm (continuous batching, prefix caching; README 'Generation backends').",
)
ThreadsOpt = typer.Option(
    None,
    "--threads",
    min=1,
    help="Torch CPU threads (default: $REFLOOP_THREADS, else torch's choice: every core; on a shared CPU fewer can be faster).",
)


def _check_out(
    out: Path, *inputs: object, kind: str = "dir", option: str = "--out", overwrite: bool = False, written_by_us: Callable | None = None
) -> None:
    """The one rule for output paths (`refloop.runs.check_output`), before any data or weights load."""
    from refloop.runs import check_output

    check_output(out, kind=kind, inputs=inputs, option=option, overwrite=overwrite, written_by_us=written_by_us)


def _recipe_inputs(recipe) -> dict:
    """The fields of a recipe that may name files or directories it reads (data, images, models)."""
    names = ("report_to", "tracker_project", "device", "dtype", "profile", "threads")
    return {k: v for k, v in recipe.model_dump(mode="json").items() if k not in names}


def _model_spec(
    model: str | None,
    device: str,
    dtype: str,
    profile: str | None,
    trust_remote_code: bool,
    backend: BackendChoice = BackendChoice.hf,
    threads: int | None = None,
):
    """The command's model options, validated (device and whether this machine has it, dtype,
    threads) before any data or weights load."""
    from refloop.models.spec import ModelSpec

    if backend == BackendChoice.vllm:  # refused before any data loads when vLLM is missing
        from refloop.models.vllm import check_install

        check_install()
    if threads is None:
        threads = _env_threads()
    fields = {"model": model, "device": device, "dtype": dtype, "profile": profile, "trust_remote_code": trust_remote_code}
    spec = _options(ModelSpec, "model", **fields, threads=threads, generation_backend=backend.value)
    spec.check_device("--device ")
    return spec


def _env_threads(strict: bool = True) -> int | None:
    """REFLOOP_THREADS (None when unset), often set for another machine: more threads than this
    one's cores are its cores. A value that is no thread count is named (`strict`) or passed over."""
    from refloop.limits import cpu_cores

    value = os.environ.get("REFLOOP_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        if not strict:
            return None
        raise RefloopError(f"REFLOOP_THREADS={value!r}: expected a whole number of threads >= 1")
    if int(value) > cpu_cores() and strict:
        log.info(f"REFLOOP_THREADS={value}: this machine has {cpu_cores()} CPU cores; using {cpu_cores()} threads")
    return min(int(value), cpu_cores())


def _options(config: type, what: str, options: dict[str, str] | None = None, /, **fields):
    """A config model built from command options; an invalid value is one message naming the
    option (`options` maps a field to its option where the names differ)."""
    from pydantic import ValidationError

    try:
        return config(**fields)
    except ValidationError as exc:
        named = options or {}
        problems = "; ".join(f"{named.get(str(e['loc'][0]), '--' + str(e['loc'][0]).replace('_', '-'))}: {e['msg']}" for e in exc.errors())
        raise RefloopError(f"invalid {what} options: {problems}") from None


def _check_seeds(**seeds: int | None) -> None:
    """Seeds of options no config model validates: within every seeded generator's range."""
    from refloop.limits import MAX_SEED, check_range

    for name, value in seeds.items():
        check_range(value, 0, MAX_SEED, f"--{name.replace('_', '-')}")


@app.command()
def consistency(
    data: str = typer.Option(
        ..., "--data", help="Shapes-world domain (in-domain, crowded, wild), a COCO-style .json, a referring .jsonl or a .parquet dataset."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory: samples.jsonl, metrics.json, report.html, PNGs."),
    images: Path | None = typer.Option(None, "--images", help="Image root for --data files (default: the file's directory)."),
    model: str | None = ModelOpt,
    num_boxes: int = typer.Option(1000, "--num-boxes", min=1, help="Boxes to evaluate, one per image."),
    seed: int = typer.Option(0, "--seed", help="Seed of the box chosen in each image."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    on_error: OnErrorChoice = OnErrorOpt,
    report: bool = _flag(True, "--report/--no-report", help="Write report.html with plots and examples."),
    profile: str | None = ProfileOpt,
    trust_remote_code: bool = RemoteOpt,
    backend: BackendChoice = BackendOpt,
    threads: int | None = ThreadsOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Self-consistency Pr@0.5 (SC-Tune appendix 6): box -> caption -> box, IoU > 0.5. Resumable."""
    from refloop.evaluation.consistency import ConsistencyConfig, run_consistency

    cfg = _options(ConsistencyConfig, "consistency", num_boxes=num_boxes, seed=seed, batch_size=batch_size)
    _check_out(out, data, images, model, overwrite=overwrite)
    spec = _model_spec(model, device, dtype, profile, trust_remote_code, backend, threads)
    done = run_consistency(spec, data, out, cfg, images, on_error.value, report, overwrite, progress=True)
    if done is None:  # not the main process
        return
    metrics, load_report, path = done
    _report_skipped(load_report)
    if path is not None:
        console.print(f"report: {path}", markup=False)
    console.print_json(json.dumps(metrics))


def _report_skipped(report) -> None:
    if report.skipped:
        reasons = "; ".join(f"{reason}: {n}" for reason, n in report.reasons.items())
        err_console.print(f"skipped {report.skipped} bad record{'s' * (report.skipped != 1)} ({reasons})", markup=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("refloop-demo"), "--out", help="Output directory of the demo."),
    model: str | None = ModelOpt,
    num_boxes: int = typer.Option(1000, "--num-boxes", min=1, help="Boxes per domain."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    sctune_domain: str = typer.Option("crowded", "--sctune-domain", help="OOD style whose boxes SC-Tune trains on."),
    sctune: bool = _flag(True, "--sctune/--no-sctune", help="Also run a short SC-Tune and add the tuned row."),
    bootstrap_domain: str = typer.Option("wild", "--bootstrap-domain", help="OOD style whose boxes Pink's bootstrapping describes."),
    bootstrap_images: int = typer.Option(100, "--bootstrap-images", min=1, help="Training scenes of that style bootstrapped."),
    bootstrap: bool = _flag(True, "--bootstrap/--no-bootstrap", help="Also run Pink's self-consistent bootstrapping."),
    svp: bool = _flag(True, "--svp/--no-svp", help="Also run a short SVP on captions of --svp-domain scenes."),
    svp_domain: str = typer.Option("wild", "--svp-domain", help="OOD style whose scenes SVP captions."),
    svp_images: int = typer.Option(64, "--svp-images", min=1, help="Seed images of SVP's inner loop."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """The main job: self-consistency of refloop-tiny in and out of domain beside SC-Tune's Table 1, a short SC-Tune,
    Pink's self-consistent bootstrapping beside Pink's Table 5 and a short SVP on captions, in one report."""
    from refloop.demo import run_demo
    from refloop.world import DOMAINS

    chosen = {"sctune_domain": (sctune_domain, sctune), "svp_domain": (svp_domain, svp), "bootstrap_domain": (bootstrap_domain, bootstrap)}
    domains = {field: domain if runs else None for field, (domain, runs) in chosen.items()}
    for field, domain in domains.items():
        if domain is not None and domain not in DOMAINS:
            raise RefloopError(f"--{field.replace('_', '-')} {domain!r} is not a shapes-world domain ({', '.join(DOMAINS)})")
    _check_out(out, model, overwrite=overwrite)
    sizes = {"num_boxes": num_boxes, "batch_size": batch_size, "bootstrap_images": bootstrap_images, "svp_images": svp_images}
    run_demo(out, model=model, device=device, dtype=dtype, console=console, **sizes, **domains, overwrite=overwrite)


@app.command("pretrain-tiny")
def pretrain_tiny(
    out: Path = typer.Option(Path("refloop-tiny"), "--out", help="Where the finished HF checkpoint directory is written."),
    work_dir: Path = typer.Option(Path("runs/pretrain-tiny"), "--work-dir", help="Checkpoints and curves; rerun to resume."),
    config: str | None = _recipe_option("pretrain-tiny, pretrain-tiny-grounded", ": PretrainConfig fields"),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override the number of optimizer steps."),
    seed: int | None = typer.Option(None, "--seed", help="Override the seed."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a recipe field, e.g. --set init_from=DIR --set threads=2 (repeatable)."
    ),
    overwrite: bool = _flag(False, "--overwrite", help="Replace a checkpoint of another recipe that refloop wrote in --out."),
) -> None:
    """Train refloop-tiny (from scratch, or continued from `init_from`) on shapes scenes (deterministic, resumable)."""
    from refloop.config import load_recipe
    from refloop.methods.pretrain import PretrainConfig, run_pretrain_tiny

    overrides = [*overrides, *(f"{k}={v}" for k, v in {"steps": steps, "seed": seed}.items() if v is not None)]
    cfg = load_recipe(PretrainConfig, config, overrides)
    summary = run_pretrain_tiny(cfg, out, work_dir, [config], overwrite, progress=True, on_eval=_print_quick_eval)
    console.print(f"refloop-tiny written to {out} ({summary['elapsed_s'] / 60:.1f} min of training)", markup=False)


def _print_quick_eval(record: dict) -> None:
    console.print(
        f"step {record['step']}: REC {record['rec_acc']:.3f}  REG exact {record['reg_exact']:.3f}  "
        f"self-consistency {record['self_consistency']:.3f}"
    )


@app.command()
def sctune(
    config: str | None = _recipe_option("sctune-shapes, sctune-qwen2-vl-7b, ..."),
    out: Path = typer.Option(
        ..., "--out", help="Run directory: train/ (checkpoints, metrics.jsonl), adapters/, merged/, eval/, results.json."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe field, e.g. --set sctune.describer_lr=1e-4 (repeatable)."),
    skip_base_eval: bool = _flag(False, "--skip-base-eval", help="Do not evaluate the base model before tuning."),
    overwrite: bool = OverwriteOpt,
    report_to: str | None = ReportToOpt,
) -> None:
    """SC-Tune: describer (PPO on the locator's IoU) and locator (MLE) alternating on one base model. Resumable: rerun the same command."""
    from refloop.config import load_recipe
    from refloop.methods.sctune import schedule
    from refloop.methods.sctune_recipe import SCTuneRecipe, run_sctune
    from refloop.progress import progress_bar

    recipe = load_recipe(SCTuneRecipe, config, _with_report_to(overrides, report_to))
    _check_out(out, config, _recipe_inputs(recipe), overwrite=overwrite)
    total = sum(phase.steps for phase in schedule(recipe.sctune))
    with progress_bar("sc-tune", total) as advance:
        results = run_sctune(
            recipe, out, progress=lambda row: advance(completed=row["step"]), evaluate_base=not skip_base_eval, overwrite=overwrite
        )
    console.print_json(json.dumps(results))


class Categories(str, Enum):
    coco = "coco"
    dataset = "dataset"


class PopeStrategy(str, Enum):
    random = "random"
    popular = "popular"
    adversarial = "adversarial"


class ChairProtocol(str, Enum):
    original = "original"
    refloop = "refloop"


class PopeRule(str, Enum):
    reference = "reference"
    refloop = "refloop"


eval_app = typer.Typer(
    cls=_Group,
    help="Object-level benchmarks of the papers: REC accuracy and REG text metrics (`rec`, `reg`, as Pink and SC-Tune report "
    "them); caption hallucination and recall (`caption`) and POPE (`pope`), as SVP reports them.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(eval_app, name="eval")


def _eval_out(task: str):
    return typer.Option(..., "--out", help=f"Output directory: {task}_samples.jsonl (resumable), {task}_metrics.json.")


ObjectDataOpt = typer.Option(
    ..., "--data", help="Shapes-world domain, a COCO-style instances .json (COCO, Objects365, ...) or a .parquet dataset."
)
CaptionTokensOpt = typer.Option(
    64, "--max-new-tokens", min=1, help="Longest caption, in tokens (detailed captions of large models: raise it, e.g. 512)."
)
NumImagesOpt = typer.Option(
    None,
    "--num-images",
    min=1,
    help="Images (a shapes-world domain: scenes exported; a file: its first N; default 500; with --predictions: those the "
    "captions file names).",
)
CategoriesOpt = typer.Option(
    None,
    "--categories",
    help="Dataset files: the objects read in captions and asked about, COCO's 80 with their synonyms (coco, default; what "
    "CHAIR and POPE publish) or the file's own category names and plurals (dataset; Objects365, OpenImages, your labels; "
    "comparable only among such runs). Shapes-world domains have their own table.",
)


def _limit_option(items: str):
    return typer.Option(None, "--limit", min=1, help=f"Evaluate only the first N {items}.")


def _referring_command(task: str, items: str, doc: str):
    """`eval rec` and `eval reg`: the same options, over referring data."""

    def command(
        data: str = RefDataOpt,
        out: Path = _eval_out(task),
        refs: Path | None = RefsOpt,
        split: str | None = SplitOpt,
        images: Path | None = ImagesOpt,
        model: str | None = ModelOpt,
        limit: int | None = _limit_option(items),
        batch_size: int = BatchOpt,
        device: str = DeviceOpt,
        dtype: str = DtypeOpt,
        on_error: OnErrorChoice = OnErrorOpt,
        profile: str | None = ProfileOpt,
        trust_remote_code: bool = RemoteOpt,
        backend: BackendChoice = BackendOpt,
        threads: int | None = ThreadsOpt,
        report: bool = EvalReportOpt,
        overwrite: bool = OverwriteOpt,
    ) -> None:
        spec = _model_spec(model, device, dtype, profile, trust_remote_code, backend, threads)
        _eval_referring(task, spec, data, out, refs, split, images, limit, batch_size, on_error, overwrite, report)

    command.__doc__ = doc
    return eval_app.command(task)(command)


eval_rec = _referring_command(
    "rec",
    "(object, expression) pairs",
    "REC accuracy: the model locates each referring expression; a predicted box is correct when its IoU with the "
    "referred box is >= 0.5 (every expression counts, as RefCOCO tables do).",
)
eval_reg = _referring_command(
    "reg",
    "referred objects",
    "REG: one greedy description per referred object, scored against all its expressions (METEOR, CIDEr, BLEU, "
    "ROUGE-L, as pycocoevalcap scores them).",
)


@eval_app.command("caption")
def eval_caption(
    ctx: typer.Context,
    data: str = ObjectDataOpt,
    out: Path = _eval_out("caption"),
    images: Path | None = ImagesOpt,
    num_images: int | None = NumImagesOpt,
    captions: Path | None = typer.Option(
        None, "--captions", help="COCO captions JSON holding the reference captions of a --data file (domains: the grammar's)."
    ),
    chair_protocol: ChairProtocol | None = typer.Option(
        None,
        "--chair-protocol",
        help="CHAIR and recall at the top of the metrics as the original chair.py counts them (default for dataset files "
        "read with COCO's table) or as refloop does (default for shapes-world domains and --categories dataset); both are reported.",
    ),
    categories: Categories | None = CategoriesOpt,
    predictions: Path | None = typer.Option(
        None,
        "--predictions",
        help="Score these captions instead of generating them (no model loads): JSON Lines (refloop caption's captions.jsonl, "
        "the CHAIR forks' --cap_file) or a JSON array (chair.py's), one caption per image id of --data.",
    ),
    image_id_key: str = typer.Option("image_id", "--image-id-key", help="--predictions: the field holding the image id."),
    caption_key: str = typer.Option("caption", "--caption-key", help="--predictions: the field holding the caption (e.g. text, answer)."),
    max_new_tokens: int = CaptionTokensOpt,
    model: str | None = ModelOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    on_error: OnErrorChoice = OnErrorOpt,
    profile: str | None = ProfileOpt,
    trust_remote_code: bool = RemoteOpt,
    backend: BackendChoice = BackendOpt,
    threads: int | None = ThreadsOpt,
    report: bool = EvalReportOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Caption hallucination: one greedy caption per image (or the captions of --predictions); object recall, CHAIR_i,
    CHAIR_s and, against reference captions, the REG text metrics."""
    _check_predictions(ctx, predictions, ("image_id_key", "caption_key"), _GENERATION_OPTIONS)
    spec = _model_spec(model, device, dtype, profile, trust_remote_code, backend, threads)
    chosen = {"captions": captions, "protocol": chair_protocol.value if chair_protocol else None, "max_new_tokens": max_new_tokens}
    if predictions is not None:
        chosen |= {"predictions": predictions, "prediction_keys": (image_id_key, caption_key)}
    _eval_objects("caption", spec, data, out, images, num_images, categories, chosen, batch_size, on_error, overwrite, report)


_GENERATION_OPTIONS = ("model", "batch_size", "device", "dtype", "profile", "trust_remote_code", "backend", "threads", "max_new_tokens")


def _check_predictions(ctx: typer.Context, predictions: Path | None, file_options, model_options) -> None:
    """--predictions scores a file: the options of generating are refused beside it, its own without it."""
    if predictions is None:
        given = [name for name in file_options if _given_on_command_line(ctx, name)]
        flag = "applies" if len(given) == 1 else "apply"
        if given:
            raise RefloopError(f"{', '.join('--' + g.replace('_', '-') for g in given)} {flag} to --predictions only")
    elif given := [name for name in model_options if _given_on_command_line(ctx, name)]:
        names = ", ".join("--" + g.replace("_", "-") for g in given)
        raise RefloopError(f"{names}: --predictions scores the file's captions, no model generates (leave {names} out)")


@eval_app.command("pope")
def eval_pope(
    ctx: typer.Context,
    data: str | None = typer.Option(
        None,
        "--data",
        help="Shapes-world domain, a COCO-style instances .json (COCO, Objects365, ...) or a .parquet dataset; "
        "questions are drawn from its annotations. Or give --questions.",
    ),
    questions: Path | None = typer.Option(
        None,
        "--questions",
        help="A question file of the POPE release (e.g. output/coco/coco_pope_adversarial.json: JSON Lines of question_id, "
        "image, text, label), the set published tables are scored on, asked as written; images under --images.",
    ),
    out: Path = _eval_out("pope"),
    images: Path | None = ImagesOpt,
    num_images: int | None = NumImagesOpt,
    strategy: PopeStrategy = typer.Option(
        PopeStrategy.random, "--strategy", help="Absent objects drawn at random, the most frequent, or those co-occurring most."
    ),
    per_image: int = typer.Option(3, "--per-image", min=1, help="Yes questions per image, as many no ones."),
    seed: int = typer.Option(0, "--seed", help="Seed of the absent objects asked about."),
    pope_rule: PopeRule = typer.Option(
        PopeRule.reference,
        "--pope-rule",
        help="Answers read as the POPE release's evaluate.py does (reference) or by their first yes/no word (refloop); both are reported.",
    ),
    categories: Categories | None = CategoriesOpt,
    model: str | None = ModelOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    on_error: OnErrorChoice = OnErrorOpt,
    profile: str | None = ProfileOpt,
    trust_remote_code: bool = RemoteOpt,
    backend: BackendChoice = BackendOpt,
    threads: int | None = ThreadsOpt,
    report: bool = EvalReportOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """POPE: balanced yes/no questions about present and absent objects (accuracy, precision, recall, F1, yes-ratio)."""
    _check_seeds(seed=seed)
    _pope_source(ctx, data, questions)
    spec = _model_spec(model, device, dtype, profile, trust_remote_code, backend, threads)
    chosen = {"strategy": strategy.value, "per_image": per_image, "seed": seed, "rule": pope_rule.value, "question_file": questions}
    _eval_objects("pope", spec, data, out, images, num_images, categories, chosen, batch_size, on_error, overwrite, report)


def _pope_source(ctx: typer.Context, data: str | None, questions: Path | None) -> None:
    """Either --data (questions drawn from its annotations) or --questions (a file's, as written)."""
    if (data is None) == (questions is None):
        raise RefloopError(
            "eval pope: give --data (questions drawn from its annotations) or --questions (a POPE question file), one of them"
        )
    drawing = [f"--{name.replace('_', '-')}" for name in ("strategy", "per_image", "seed", "num_images", "categories")]
    given = [option for option in drawing if _given_on_command_line(ctx, option[2:].replace("-", "_"))]
    if questions is not None and given:
        raise RefloopError(f"{', '.join(given)} choose how questions are drawn from --data; a --questions file is asked as written")


def _eval_referring(task, spec, data, out, refs, split, images, limit, batch_size, on_error, overwrite, report) -> None:
    from refloop.evaluation.referring import run_referring_eval

    _check_out(out, data, refs, images, spec.model, overwrite=overwrite)
    common = {"images": images, "batch_size": batch_size, "on_error": on_error.value, "overwrite": overwrite, "report": report}
    done = run_referring_eval(task, spec, data, out, refs=refs, split=split, limit=limit, **common, progress=True)
    _print_eval(done)


def _eval_objects(task, spec, data, out, images, num_images, categories, chosen, batch_size, on_error, overwrite, report) -> None:
    from refloop.evaluation.hallucination import run_object_eval

    _check_out(
        out, data, images, chosen.get("captions"), chosen.get("question_file"), chosen.get("predictions"), spec.model, overwrite=overwrite
    )
    common = {"images": images, "batch_size": batch_size, "on_error": on_error.value, "overwrite": overwrite, "report": report}
    objects = {"num_images": num_images, "categories": categories.value if categories else None} | chosen
    done = run_object_eval(task, spec, data, out, **objects, **common, progress=True)
    _print_eval(done)


def _print_eval(done) -> None:
    if done is not None:  # the main process
        _report_skipped(done[1])
        console.print_json(json.dumps(done[0]))


def _given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option `name` (its parameter name), rather than its default."""
    source = ctx.get_parameter_source(name)  # typer's own click or click's: compared by name
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _file_out(value: str, option: str, example: str) -> Path:
    """A file output as typed: a trailing separator means a directory (a Path would drop it and write a file there)."""
    if value.endswith(("/", os.sep)):
        raise RefloopError(f"{option} {value}: a file is written here, not a directory (name the file, e.g. {value}{example})")
    return Path(value)


@app.command("filter")
def filter_detections(
    detections: Path = typer.Argument(..., help="COCO-style detection JSON (COCO, Objects365, a shapes-world export)."),
    out: str = typer.Option(..., "--out", help="Triplets JSONL file: image_id, category, boxes (xyxy pixels), file_name."),
    images: Path | None = typer.Option(None, "--images", help="Image root (default: the detection file's directory)."),
    exclude: Path | None = typer.Option(
        None, "--exclude", help="JSONL whose image_id fields name held-out images (e.g. a consistency samples.jsonl)."
    ),
    max_overlap_iou: float = typer.Option(
        0.5, "--max-overlap-iou", min=0.0, max=1.0, help="Drop a triplet whose box overlaps another box above this IoU."
    ),
    min_area_fraction: float = typer.Option(
        0.02, "--min-area-fraction", min=0.0, max=1.0, help="Drop a triplet holding a box smaller than this fraction of the image."
    ),
    on_error: OnErrorChoice = OnErrorOpt,
    overwrite: bool = _flag(False, "--overwrite", help="Replace --out if it is a triplets file refloop filter wrote."),
) -> None:
    """SC-Tune appendix 9: (image, category, boxes) triplets for training, from boxes alone."""
    from refloop.data.filters import is_triplets_file, write_triplets

    out = _file_out(out, "--out", "triplets.jsonl")
    _check_out(out, detections, exclude, images, kind="file", overwrite=overwrite, written_by_us=is_triplets_file)
    counts, skipped = write_triplets(detections, out, images, exclude, max_overlap_iou, min_area_fraction, on_error.value)
    console.print_json(json.dumps(counts.as_dict() | {"skipped_records": skipped}))
    console.print(f"wrote {counts.triplets_kept} triplets ({counts.boxes_kept} boxes) to {out}", markup=False)
    if counts.triplets_kept == 0:  # an empty training file is no result: say so, with the counts of each rule above
        log.warning(f"{out} holds no triplet: every image or box was removed by the rules counted above (or by --exclude)")


@app.command("export-parquet")
def export_parquet(
    jsonl: Path = typer.Argument(..., help="A refloop JSONL output: samples.jsonl, pairs.jsonl, rc.jsonl, metrics.jsonl..."),
    parquet: str = typer.Argument(..., help="The parquet file written (datasets.load_dataset('parquet', data_files=...) reads it)."),
    overwrite: bool = _flag(False, "--overwrite", help="Replace PARQUET if refloop export-parquet wrote it."),
) -> None:
    """Write a JSONL output as one parquet file (needs pyarrow). The JSONL files load with
    datasets.load_dataset('json', data_files=...) as they are."""
    from refloop.data.parquet import export_parquet as write
    from refloop.data.parquet import is_exported_parquet

    parquet = _file_out(parquet, "PARQUET", "samples.parquet")
    _check_out(parquet, jsonl, kind="file", option="PARQUET", overwrite=overwrite, written_by_us=is_exported_parquet)
    console.print_json(json.dumps({"rows": write(jsonl, parquet), "parquet": str(parquet)}))


@app.command("export-world")
def export_world(
    domain: str = typer.Option(..., "--domain", help="in-domain, crowded or wild."),
    out: Path = typer.Option(..., "--out", help="Directory for images/, instances.json (COCO) and refs.jsonl."),
    num_images: int = typer.Option(1000, "--num-images", min=1, help="Scenes to export."),
    seed: int = typer.Option(1, "--seed", help="Scene seed (0: training scenes, 1: evaluation scenes)."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Write a shapes-world split as COCO-style detection JSON + referring JSONL + PNG images."""
    from refloop.runs import run_directory
    from refloop.world import DOMAINS
    from refloop.world.export import export_split

    if domain not in DOMAINS:
        raise RefloopError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    _check_seeds(seed=seed)
    _check_out(out, overwrite=overwrite)
    with run_directory(out, {"task": "export-world", "domain": domain, "num_images": num_images, "seed": seed}, overwrite):
        path = export_split(domain, out, num_images, seed)
    console.print(f"exported {num_images} scenes of {domain} to {path}", markup=False)


@app.command("rc-data")
def rc_data(
    data: str = typer.Option(
        ...,
        "--data",
        help="Shapes-world domain, COCO/Objects365 .json, referring .jsonl, or with --objects a Visual Genome image_data.json.",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output directory: rc.jsonl (chat-format samples), rc.jsonl.root.json (its image root) and counts.json."
    ),
    images: Path | None = ImagesOpt,
    objects: Path | None = typer.Option(None, "--objects", help="Visual Genome objects.json (then --data is image_data.json)."),
    relationships: Path | None = typer.Option(None, "--relationships", help="Visual Genome relationships.json (relation tasks)."),
    expressions: Path | None = typer.Option(
        None, "--expressions", help="Referring JSONL (e.g. bootstrapped pairs.jsonl) whose expressions attach to the matching boxes."
    ),
    tasks: str | None = typer.Option(
        None, "--tasks", help="Comma-separated tasks (default: every task the annotations support: relations and expressions if present)."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Checkpoint the samples are for: its prompt profile and the pixel frame of its processor (Qwen2.5-VL's resize "
        "limits) are used and recorded in rc.jsonl, where `refloop sft` checks them (no weights load).",
    ),
    profile: str | None = typer.Option(
        None,
        "--profile",
        help="Prompt profile whose prompt layout and box text the samples use (default: --model's, else refloop-tiny; "
        "without --model, the profile's default pixel frame).",
    ),
    trust_remote_code: bool = RemoteOpt,
    seed: int = typer.Option(0, "--seed", help="Seed of template and target choice (same seed, same file)."),
    max_per_image: int = typer.Option(4, "--max-per-image", min=1, help="Samples per task per image."),
    num_images: int = typer.Option(1000, "--num-images", min=1, help="Scenes exported when --data is a shapes-world domain."),
    native_prompts: bool = _flag(
        False, "--native-prompts", help="Grounding tasks ask with the family's own REC/REG instruction instead of the template banks."
    ),
    on_error: OnErrorChoice = OnErrorOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Pink Sec. 3.2: referential-comprehension instruction data (grounding, grounding caption, relations both ways,
    coarse spatial, counting, detection) from annotations, as chat JSONL for `datasets` and SFT."""
    from refloop.data.rc import check_sources, parse_tasks, write_rc_dataset
    from refloop.models import checkpoint_profile

    chosen = parse_tasks(tasks)
    _check_seeds(seed=seed)
    check_sources(data, **{"--objects": objects, "--relationships": relationships, "--expressions": expressions})
    chosen_profile = checkpoint_profile(model, profile, trust_remote_code)
    _check_out(out, data, images, objects, relationships, expressions, overwrite=overwrite)
    files = {"images": images, "objects": objects, "relationships": relationships, "expressions": expressions}
    options = {"seed": seed, "max_per_image": max_per_image, "num_images": num_images, "native_prompts": native_prompts}
    summary = write_rc_dataset(out, data, chosen_profile, chosen, **files, **options, on_error=on_error.value, overwrite=overwrite)
    console.print_json(json.dumps(summary))


@app.command()
def sft(
    config: str | None = _recipe_option("sft-shapes"),
    out: Path = typer.Option(
        ..., "--out", help="Run directory: train/ (checkpoints, metrics.jsonl), adapters/, merged/, results.json, curves.png."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe field, e.g. --set sft.lr=2e-4 (repeatable)."),
    overwrite: bool = OverwriteOpt,
    report_to: str | None = ReportToOpt,
) -> None:
    """LoRA instruction tuning on RC data (`refloop rc-data`): answer-token loss, adapters on the language model and, with
    vision_lora, the vision tower. Resumable: rerun the same command."""
    from refloop.config import load_recipe
    from refloop.methods.sft_recipe import SFTRecipe, run_sft
    from refloop.progress import progress_bar

    recipe = load_recipe(SFTRecipe, config, _with_report_to(overrides, report_to))
    _check_out(out, config, _recipe_inputs(recipe), overwrite=overwrite)
    with progress_bar("sft", None) as advance:
        results = run_sft(recipe, out, progress=lambda row: advance(total=row["total_steps"], completed=row["step"]), overwrite=overwrite)
    console.print_json(json.dumps(results))


@app.command()
def svp(
    config: str | None = _recipe_option("svp-shapes"),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Run directory: iteration-N/ (samples.jsonl, train/, adapters/), merged/, results.json, report.html.",
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a recipe field, e.g. --set svp.score=weighted_difference (repeatable)."
    ),
    overwrite: bool = OverwriteOpt,
    report_to: str | None = ReportToOpt,
) -> None:
    """SVP: sample captions with and without grounding feedback, score them by log q(z|c,g) - log p(z|c) (Eq. 5) or the
    weighted difference (Eq. 6), fine-tune on the best; iterate. Resumable: rerun the same command."""
    from refloop.config import load_recipe
    from refloop.methods.svp_recipe import SVPRecipe, run_svp
    from refloop.progress import staged_progress

    if config is None and not overrides:  # every field has a default: this would start a full run nobody named
        raise RefloopError("svp runs a recipe: name one with --config (packaged: svp-shapes) or give its fields with --set")
    recipe = load_recipe(SVPRecipe, config, _with_report_to(overrides, report_to))
    _check_out(out, config, _recipe_inputs(recipe), overwrite=overwrite)
    with staged_progress() as advance:
        results = run_svp(recipe, out, progress=advance, overwrite=overwrite)
    console.print_json(json.dumps(results))


@app.command()
def caption(
    ctx: typer.Context,
    data: str = typer.Option(
        ..., "--data", help="Shapes-world domain, COCO/Objects365 .json, referring .jsonl or .parquet: the images captioned."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory: captions.jsonl (one line per image)."),
    images: Path | None = ImagesOpt,
    model: str | None = ModelOpt,
    num_images: int = typer.Option(
        100,
        "--num-images",
        min=1,
        help="Images captioned: a shapes-world domain's first N evaluation scenes (those eval caption scores), a file's first N "
        "(said when it has more).",
    ),
    isvp: bool = _flag(False, "--isvp", help="iSVP: prior caption -> grounding -> caption guided by the grounding as text."),
    grounder: str = typer.Option("oracle", "--grounder", help="oracle (shapes world), grounding-dino, owlv2, florence-2 or vlm."),
    grounder_model: str | None = typer.Option(None, "--grounder-model", help="Checkpoint of the grounder (not for oracle)."),
    miss_rate: float = typer.Option(0.1, "--miss-rate", min=0, max=1, help="Oracle: share of true objects missed."),
    false_positive_rate: float = typer.Option(0.1, "--false-positive-rate", min=0, max=1, help="Oracle: false detections per phrase."),
    phrases: str = typer.Option("caption", "--phrases", help="What is grounded: caption (its noun phrases), categories or both."),
    max_new_tokens: int = CaptionTokensOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    overwrite: bool = OverwriteOpt,
    on_error: OnErrorChoice = OnErrorOpt,
    profile: str | None = ProfileOpt,
    trust_remote_code: bool = RemoteOpt,
    backend: BackendChoice = BackendOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Caption images greedily; with --isvp, SVP's inference-time variant (no tuning): the caption's objects are
    grounded and the model captions again with the grounding in its prompt."""
    from refloop.methods.svp_recipe import GrounderSpec, run_captions

    if not isvp:  # plain captioning grounds nothing: these would be ignored, yet enter the run's fingerprint
        isvp_only = ("grounder", "grounder_model", "miss_rate", "false_positive_rate", "phrases")
        if given := [f"--{name.replace('_', '-')}" for name in isvp_only if _given_on_command_line(ctx, name)]:
            raise RefloopError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to iSVP only: add --isvp")
    named = {"kind": "--grounder", "model": "--grounder-model"}
    rates = {"miss_rate": miss_rate, "false_positive_rate": false_positive_rate}
    grounding = _options(GrounderSpec, "grounder", named, kind=grounder, model=grounder_model, **rates)
    grounding.check_caption(data, isvp, phrases)
    _check_out(out, data, images, model, grounder_model, overwrite=overwrite)
    spec = _model_spec(model, device, dtype, profile, trust_remote_code, backend, threads)
    options = (num_images, isvp, phrases, batch_size, on_error.value, overwrite, True, max_new_tokens)
    skipped = run_captions(spec, grounding, data, out, images, *options)
    if skipped is not None:  # the main process
        console.print(f"captions: {out / 'captions.jsonl'}" + (f" ({skipped} unreadable images skipped)" if skipped else ""))


@app.command()
def inspect(
    model: str | None = ModelOpt,
    profile: str | None = ProfileOpt,
    max_pixels: int | None = typer.Option(None, "--max-pixels", help="Image pixel budget passed to the processor (Qwen-VL)."),
    trust_remote_code: bool = RemoteOpt,
) -> None:
    """What refloop will do with a checkpoint, without loading its weights: the chosen prompt profile,
    prompts and answer for an example box, the box codec, and the LoRA targets (vision excluded)."""
    from refloop.models import default_model_path
    from refloop.models.inspection import inspect_checkpoint

    options = {"max_pixels": max_pixels} if max_pixels else None
    console.print_json(json.dumps(inspect_checkpoint(model or default_model_path(), profile, options, trust_remote_code)))


@app.command()
def bootstrap(
    config: str | None = _recipe_option("bootstrap-shapes", "; options below override it"),
    out: Path = typer.Option(
        ..., "--out", help="Output directory: pairs.jsonl, refs.json + instances.json, candidates.jsonl, stats.json, report.html."
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="Detection boxes: a shapes-world domain (in-domain, crowded, wild), a COCO / Objects365 .json or a referring .jsonl.",
    ),
    images: Path | None = typer.Option(None, "--images", help="Image root for --data files (default: the file's directory)."),
    model: str | None = ModelOpt,
    iou_lambda: float | None = typer.Option(
        None, "--lambda", min=0, max=1, help="Keep a description when IoU(box, re-located box) >= lambda (default 0.5, Pink Sec. 4.1)."
    ),
    max_objects: int | None = typer.Option(
        None, "--max-objects", min=1, help="Skip images with more boxes than this (default 15, Pink A.2)."
    ),
    min_area_px: float | None = typer.Option(
        None,
        "--min-area-px",
        min=0,
        help="Skip boxes under this many pixels (default 2000, Pink A.2; 82 on shapes-world domains' 112 px scenes).",
    ),
    samples: int | None = typer.Option(
        None,
        "--samples",
        min=1,
        help="K: the greedy description plus K-1 sampled ones per box, the most consistent kept (default 1, as Pink).",
    ),
    distractor_check: bool | None = typer.Option(
        None,
        "--distractor-check/--no-distractor-check",
        metavar="",
        help="Reject a description whose re-located box fits another box of its category at least as well.",
    ),
    num_images: int | None = typer.Option(
        None, "--num-images", min=1, help="Shapes-world domain: scenes exported (default 1000); files: only the first N images."
    ),
    scene_seed: int | None = typer.Option(None, "--scene-seed", help="Shapes-world scene seed (0: training scenes, 1: evaluation scenes)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the sampled descriptions (--samples > 1)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Images per generation batch (default 64)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto (bf16 on capable GPUs, else fp32), fp32, bf16 or fp16."),
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        help="Torch CPU threads per process (default: the recipe's, else $REFLOOP_THREADS, else every core; "
        "on a busy CPU 1 can be much faster).",
    ),
    on_error: OnErrorChoice | None = typer.Option(None, "--on-error", help="fail: stop at the first bad record; skip: skip and count."),
    report: bool | None = typer.Option(None, "--report/--no-report", metavar="", help="Write report.html with kept and rejected examples."),
    profile: str | None = ProfileOpt,
    trust_remote_code: bool | None = typer.Option(
        None, "--trust-remote-code/--no-trust-remote-code", metavar="", help="Allow a checkpoint's own modelling code."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe field, e.g. --set bootstrap.samples=4 (repeatable)."),
    backend: BackendChoice | None = typer.Option(None, "--backend", help="What generates: hf (transformers, default) or vllm."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Pink's self-consistent bootstrapping (Sec. 3.3): describe every box, re-locate the description, keep when IoU >= lambda.
    Resumable (rerun the same command); sharded under `accelerate launch`."""
    from refloop.config import load_recipe
    from refloop.methods.bootstrap_recipe import BootstrapRecipe, run_bootstrap
    from refloop.progress import staged_progress

    _check_seeds(scene_seed=scene_seed)
    recipe = load_recipe(BootstrapRecipe, config, [*_given_fields(_BOOTSTRAP_FIELDS, locals()), *overrides])
    _check_out(out, config, _recipe_inputs(recipe), overwrite=overwrite)
    main_process = recipe.process_state().is_main_process
    with staged_progress() as advance:
        stats = run_bootstrap(recipe, out, progress=advance if main_process else None, overwrite=overwrite)
    if stats is not None:  # the main process
        _print_bootstrap(stats, out)


# The options of `refloop bootstrap` and the recipe fields they override.
_BOOTSTRAP_FIELDS = {
    **{name: name for name in ("data", "images", "model", "num_images", "scene_seed", "device", "dtype", "threads")},
    **{name: name for name in ("on_error", "report", "profile", "trust_remote_code")},
    "backend": "generation_backend",
    **{name: f"bootstrap.{name}" for name in ("iou_lambda", "max_objects", "min_area_px", "samples", "distractor_check")},
    "seed": "bootstrap.seed",
    "batch_size": "bootstrap.batch_size",
}


def _given_fields(fields: dict[str, str], options: dict) -> list[str]:
    """`--set`-style overrides (field=JSON value) of the options given (not None), by `fields`:
    option name -> recipe field."""
    given = {field: options[name] for name, field in fields.items() if options[name] is not None}
    return [f"{k}={json.dumps(getattr(v, 'value', str(v) if isinstance(v, Path) else v))}" for k, v in given.items()]


def _print_bootstrap(stats: dict, out: Path) -> None:
    if stats.get("skipped_records"):
        err_console.print(f"skipped {stats['skipped_records']} bad records", markup=False)
    console.print_json(json.dumps({k: v for k, v in stats.items() if k != "config"}))
    if stats["kept"] and stats.get("images_in_data_file"):
        err_console.print(
            f"the pairs name their images by file_name, but {stats['data']} holds its images inside the file: "
            "pairs.jsonl reads back only with those images written out as files under one root (--images)",
            markup=False,
            soft_wrap=True,
        )
    elif stats["kept"]:
        console.print(
            f"read the pairs back with: --data {out / 'pairs.jsonl'} --images {stats['image_root']}", markup=False, soft_wrap=True
        )
    elif stats["boxes_considered"]:
        err_console.print(
            f"no pair was kept ({stats['boxes_considered']} boxes described): pairs.jsonl is empty; see rejected_by_reason above",
            markup=False,
        )
    else:  # A.2's filters left nothing to describe: name them and the options that set them
        skipped = ", ".join(f"{n} {reason}" for reason, n in stats.get("boxes_skipped", {}).items()) or "none"
        err_console.print(
            f"no box was described (skipped: {skipped}): pairs.jsonl is empty; Pink's filters skip boxes under --min-area-px "
            f"({stats['config']['min_area_px']:g} px) and images with more than --max-objects ({stats['config']['max_objects']}) objects",
            markup=False,
        )


def _quiet_libraries() -> None:
    """CLI users see refloop's own messages and progress bars, not library advisories
    (transformers' FutureWarnings) or weight-loading bars. Set before the libraries import."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # its retry notices; a failure still ends in refloop's error line
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the vLLM engine's start-up notes and advisories
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if "transformers" in sys.modules:  # already imported (refloop used as a library, then the CLI)
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


class _Warnings(logging.Handler):
    """refloop's own warnings and notes (logged by the library) as one `warning:` / `note:` line
    each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        label = "[bold yellow]warning:[/]" if record.levelno >= logging.WARNING else "[bold]note:[/]"
        err_console.print(f"{label} {escape(record.getMessage())}", highlight=False, soft_wrap=True)


def _end_process_group() -> None:
    """After a successful command under `accelerate launch`: the process group ends before the
    interpreter does (`refloop.parallel.end_process_group`); torch is imported only if it was."""
    if "torch.distributed" in sys.modules:
        from refloop.parallel import end_process_group

        end_process_group()


INTERRUPTED = 130  # 128 + SIGINT, as shells report it
INTERRUPTED_MESSAGE = "interrupted; rerun the same command (a resumable run continues where it stopped)"
_interrupted: list[int] = []  # signals received: whatever click / typer turn Ctrl-C into


def _on_sigint(signum, frame) -> None:
    _interrupted.append(signum)
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as Python's own handler does


def _on_sigterm(signum, frame) -> None:
    """`timeout`, `kill` and job schedulers stop a job with SIGTERM: unwound like Ctrl-C (open
    files closed, the run's manifest recorded) instead of the process vanishing."""
    _interrupted.append(signum)
    raise KeyboardInterrupt


def _exit_interrupted() -> None:
    if os.environ.get("RANK", "0") == "0":  # under accelerate / torchrun every process is stopped: one says so
        err_console.print(INTERRUPTED_MESSAGE, highlight=False)
    if _interrupted and _interrupted[0] == signal.SIGTERM:  # unwound: now end as SIGTERM ends a process
        import atexit

        atexit._run_exitfuncs()  # what the interpreter's exit would run (finalizers: a vLLM engine's adapter folder in /dev/shm)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (the status schedulers and shells read: 143, "Terminated")
        os.kill(os.getpid(), signal.SIGTERM)
    sys.exit(INTERRUPTED)


def _threads_from_environment() -> None:
    """REFLOOP_THREADS for every command, the demo and recipes included: torch reads OMP_NUM_THREADS
    when it is imported (after this); an explicit OMP_NUM_THREADS, `--threads` or a recipe's
    `threads` still wins. A bad value is named by the commands that take `--threads`."""
    threads = _env_threads(strict=False)
    if threads and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def main() -> None:
    _threads_from_environment()
    _quiet_libraries()
    logger = logging.getLogger("refloop")
    if not any(isinstance(h, _Warnings) for h in logger.handlers):
        logger.addHandler(_Warnings(logging.INFO))
        logger.setLevel(logging.INFO)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # an embedding program's own handler is kept
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except SystemExit as exc:  # click ends a command with SystemExit(0); Ctrl-C becomes SystemExit(130) or click's Abort (1)
        if _interrupted or exc.code == INTERRUPTED:
            _exit_interrupted()
        if not exc.code:
            _end_process_group()
        raise
    except RefloopError as exc:
        # under accelerate / torchrun a check every process makes fails in each: the other processes' lines say whose they are
        rank = os.environ.get("RANK", "0")
        where = "" if rank == "0" else f" (process {rank})"
        err_console.print(f"[bold red]error{where}:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _exit_interrupted()
    except RuntimeError as exc:
        # under accelerate / torchrun, a process waiting for one that stopped (its error printed by it) gets the
        # backend's "connection closed" from the collective it was in: one line, not a second traceback
        if not _peer_gone(exc):
            raise
        rank = os.environ.get("RANK", "0")
        first = str(exc).strip().splitlines()[0][:200]
        err_console.print(
            f"[bold red]error (process {rank}):[/] another process of the launch stopped (see its error), so this one stops too "
            f"({escape(first)})",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    else:
        _end_process_group()


def _peer_gone(exc: BaseException) -> bool:
    """Whether a collective of the process group failed because another process is gone (gloo and
    NCCL say it so); any other RuntimeError keeps its traceback."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    text = str(exc)
    backend = isinstance(exc, getattr(dist, "DistError", ())) or "gloo" in text or "NCCL" in text  # gloo raises a plain RuntimeError
    return backend and any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "remote process exited"))


if __name__ == "__main__":
    main()
