"""SVP: captions improved with an open-set grounding model as feedback (paper 004, Sec. 3,
Algorithms 1-2 in appendix C, implementation details in Sec. 4).

Inner loop, per image c (Algorithm 1, lines 10-23):
1. prior samples z_p ~ p_theta(z | c): the base caption prompt, K samples;
2. grounding g_j = g(z_p^j, c): the phrases of each prior caption (or the dataset's categories)
   located by the grounder, written into the prompt as text (labels and boxes, appendix F);
3. guided samples z^j ~ q(z | c, g_j): one per grounding;
4. scores from the full-vocabulary distributions along each guided sample under q (prompt with
   the grounding) and p (prompt without), one batched forward each:
   log-ratio S(q, p) (Eq. 5, w = q) or weighted difference Delta(q, p) (Eq. 6, w^q = q, w^p = p);
5. degenerate samples dropped, the top fraction per image kept (Eq. 7's indicator s >= S_k).
Outer loop (Eq. 7, Algorithm 1 lines 25-28): LoRA SFT on (c, base caption prompt -> z), no grounding
in the training prompt, on the shared trainer; then iteration i+1 samples from the updated model.
SVP (CVQ) mixes in visual-query pairs (REC, REG, yes/no questions) so the model does not
specialise on captions.

The two ablations of SVP Table 6 are settings of the same loop: `grounding: false` is
self-captioning without feedback (prior samples, a random top fraction), `score: none` is
grounding without scoring (guided samples, a random top fraction).
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
from accelerate import PartialState
from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from refloop.data.records import ImageRecord, InstructionExample
from refloop.data.shards import ShardedRun, share
from refloop.data.vocabulary import Vocabulary
from refloop.errors import RefloopError
from refloop.grounding import Grounder, grounding_context, phrases_from_caption
from refloop.grounding.phrases import category_phrases
from refloop.limits import BatchSize, NewTokens, SafeName, Samples, Seed
from refloop.models.base import VLM, GenerateOptions
from refloop.models.hf import HFVLM
from refloop.runs import model_fingerprint, shared_run_directory, tensors_digest
from refloop.seeding import step_seed, text_seeded_rng
from refloop.training.adapters import LoraSettings
from refloop.training.sft import SFT, SFTConfig
from refloop.training.trackers import Tracking

log = logging.getLogger(__name__)

ScoreName = Literal["log_ratio", "weighted_difference", "none"]
EMPTY, REPEATED, COORDINATES, UNREADABLE = "empty", "repeated_ngrams", "coordinates_in_text", "unreadable"


# ---- scores (Eq. 5, 6) ---------------------------------------------------------------------------
def _as_flag(value: object) -> object:
    """0 and 1 (and 0.0, 1.0) are the flags false and true: one value, one run fingerprint."""
    return bool(value) if not isinstance(value, bool) and isinstance(value, int | float) and value in (0, 1) else value


LengthNormalize = Annotated[bool | Annotated[float, Field(ge=0, le=1)], BeforeValidator(_as_flag)]


def _per_sequence(per_token: torch.Tensor, mask: torch.Tensor, length_normalize: LengthNormalize) -> torch.Tensor:
    """Sum over the real positions, divided by length ** a: a = 1 (True) is the per-token mean, a = 0
    (False) the sum Eq. 5-6 print; 0 < a < 1 sits between (a length penalty, as in beam search)."""
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum(-1)
    power = float(length_normalize)
    return total / mask.sum(-1).clamp_min(1) ** power if power else total


def _plogp(logp: torch.Tensor) -> torch.Tensor:
    """sum over v of p log p, with 0 log 0 = 0 (masked vocabulary entries are -inf)."""
    return torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp.exp() * logp).sum(-1)


def log_ratio_score(
    q_logprobs: torch.Tensor, p_logprobs: torch.Tensor, mask: torch.Tensor, length_normalize: LengthNormalize = False
) -> torch.Tensor:
    """Eq. 5 with w_{v,t} = q_{v,t}: per sequence, sum over t of sum over v of q (log q - log p),
    i.e. the sum of KL(q_t || p_t) along the guided sample. Inputs [B, T, V] log-probabilities and
    a [B, T] mask of real positions; returns [B]. `length_normalize` divides by the length (True) or
    by length ** a (a number a in [0, 1])."""
    q, p = q_logprobs.float(), p_logprobs.float()
    diff = torch.where(torch.isneginf(q), torch.zeros_like(q), q.exp() * (q - p))
    return _per_sequence(diff.sum(-1), mask, length_normalize)


def weighted_difference_score(
    q_logprobs: torch.Tensor, p_logprobs: torch.Tensor, mask: torch.Tensor, length_normalize: LengthNormalize = False
) -> torch.Tensor:
    """Eq. 6 with w^q = q and w^p = p: per sequence, sum over t of (sum_v q log q - sum_v p log p),
    i.e. how much the grounding lowers the entropy at each position. Shapes as `log_ratio_score`."""
    per_token = _plogp(q_logprobs.float()) - _plogp(p_logprobs.float())
    return _per_sequence(per_token, mask, length_normalize)


SCORES: dict[str, Callable[..., torch.Tensor]] = {"log_ratio": log_ratio_score, "weighted_difference": weighted_difference_score}


def padded(distributions: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, V] log-distributions to one [B, T, V] tensor (padding 0) and its [B, T] mask."""
    width = max(d.shape[0] for d in distributions)
    out = distributions[0].new_zeros((len(distributions), width, distributions[0].shape[-1]))
    mask = torch.zeros((len(distributions), width), dtype=torch.bool)
    for i, d in enumerate(distributions):
        out[i, : d.shape[0]] = d
        mask[i, : d.shape[0]] = True
    return out, mask


# ---- degenerate samples and selection ------------------------------------------------------------
_NUMBERS = re.compile(r"\[\s*-?\d*\.?\d+\s*(?:,\s*-?\d*\.?\d+\s*){3}\]|\{?<\d+>")


def degenerate_reason(
    text: str, codec=None, image_size: tuple[int, int] = (1000, 1000), ngram: int = 3, max_repeats: int = 3
) -> str | None:
    """Why a sampled caption is unusable (SVP Sec. 4 filters degenerate samples), None if it is
    fine: empty; an n-gram repeated more than `max_repeats` times or a word `max_repeats` times
    in a row; coordinates leaked from the grounding context into the caption (box text of the
    family's codec or the normalised [x1, y1, x2, y2] lists); undecodable characters."""
    words = text.split()
    if not words:
        return EMPTY
    if "\ufffd" in text:
        return UNREADABLE
    if _NUMBERS.search(text) or (codec is not None and codec.parse(text, image_size)):
        return COORDINATES
    if any(len(set(words[i : i + max_repeats])) == 1 for i in range(len(words) - max_repeats + 1)):
        return REPEATED
    grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
    if grams and max(grams.count(g) for g in set(grams)) > max_repeats:
        return REPEATED
    return None


def select_top(scores: Sequence[float], fraction: float, eligible: Sequence[bool] | None = None) -> list[int]:
    """Eq. 7's indicator: samples with s >= S_k, S_k the k-th highest eligible score, k =
    ceil(fraction * K). Ties at S_k are all kept (the indicator is >=); sample order otherwise."""
    eligible = [True] * len(scores) if eligible is None else list(eligible)
    pool = [i for i, ok in enumerate(eligible) if ok and math.isfinite(scores[i])]
    if not pool:
        return []
    k = max(1, math.ceil(fraction * len(scores)))
    threshold = sorted((scores[i] for i in pool), reverse=True)[min(k, len(pool)) - 1]
    return [i for i in pool if scores[i] >= threshold]


def select_random(count: int, fraction: float, eligible: Sequence[bool], rng: random.Random) -> list[int]:
    """The same number of samples as `select_top`, drawn at random among the eligible: the
    no-feedback and no-scoring ablations."""
    pool = [i for i, ok in enumerate(eligible) if ok]
    return sorted(rng.sample(pool, min(len(pool), max(1, math.ceil(fraction * count))))) if pool else []


# ---- configuration -------------------------------------------------------------------------------
class SVPTraining(SFTConfig):
    """The outer loop's SFT with SVP's defaults (Sec. 4, Table 11): LoRA r 64, alpha 16, one epoch,
    batch 20, peak lr 2e-4, cosine schedule with 3% warm-up."""

    epochs: float = Field(1.0, gt=0, description="passes over each iteration's selected samples (SVP: one)")
    batch_size: BatchSize = Field(20, description="examples per optimizer step (SVP: 20)")
    lr: float = Field(2e-4, gt=0, description="peak AdamW learning rate (SVP Table 11, LLaVA-1.5/1.6: 2e-4)")
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="SVP Table 11: cosine")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the steps warming up (SVP Table 11: 0.03)")
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(r=64, alpha=16), description="adapter settings (SVP: r 64, alpha 16)")
    adapter: SafeName = Field("svp", description="name of the trained adapter")


class SVPConfig(BaseModel):
    """Defaults are SVP's (Sec. 4): K = 20 samples, top 10%, w = q, LoRA r = 64 alpha = 16, one
    epoch per iteration; up to 3 iterations in the paper."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    samples: Samples = Field(20, description="K: prior samples (and guided samples) per image")
    top_fraction: float = Field(0.1, gt=0, le=1, description="share of each image's guided samples kept (Eq. 7)")
    score: ScoreName = Field("log_ratio", description="log_ratio: S(q,p) Eq. 5; weighted_difference: Delta(q,p) Eq. 6; none: random")
    grounding: bool = Field(True, description="false: self-captioning without feedback (prior samples, random selection)")
    phrases: Literal["caption", "categories", "both"] = Field(
        "caption", description="what the grounder looks for: the prior caption's noun phrases, the dataset's categories, or both"
    )
    length_normalize: LengthNormalize = Field(
        False,
        description="divide scores by the sample length (true), by length ** a (a number a in [0, 1]), or not (Eq. 5-6 as printed: false)",
    )
    iterations: int = Field(1, ge=1, description="I: outer iterations, each sampling from the updated model")
    cvq_ratio: float = Field(0.0, ge=0, description="SVP (CVQ): visual-query pairs per selected caption (paper: 1.0)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the prior and guided captions")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the prior and guided captions (1: off)")
    max_new_tokens: NewTokens = Field(48, description="longest caption sampled")
    images_per_batch: BatchSize = Field(8, description="images sampled together (K samples each)")
    score_batch: BatchSize = Field(32, description="guided samples per full-vocabulary forward (bounds [B, T, V] memory)")
    seed: Seed = Field(0, description="seed of sampling and selection")
    sft: SVPTraining = Field(default_factory=SVPTraining, description="the outer loop's LoRA SFT")


# ---- the inner loop ------------------------------------------------------------------------------
@dataclass
class ImageSamples:
    """One image's inner loop: prior captions, groundings as text, guided captions, scores and
    the selected samples (indices into `guided`)."""

    image_id: object
    prior: list[str]
    contexts: list[str]
    guided: list[str]
    scores: list[float]
    degenerate: list[str | None]
    selected: list[int]
    dropped_detections: int = 0
    detections: int = 0  # written into the guided prompts (dropped_detections: the grounder's unusable ones)

    def as_dict(self) -> dict:
        return {
            "image_id": self.image_id,
            "prior": self.prior,
            "contexts": self.contexts,
            "guided": self.guided,
            "scores": self.scores,
            "degenerate": self.degenerate,
            "selected": self.selected,
            "dropped_detections": self.dropped_detections,
            "detections": self.detections,
        }


def label_set(records: Sequence[ImageRecord], vocabulary: Vocabulary | None = None, categories: Sequence[str] = ()) -> tuple[str, ...]:
    """The phrases a detector of the data is asked for when it is run over its label set: a closed
    vocabulary's (the shapes world's colour-shape pairs), else the file's `categories`
    (`Detections.categories`: all of its images', before any num_images cut), else every category
    the records name. The whole dataset's, never per image: an image's own labels would tell the
    grounder what is in it (SVP's seed images are unlabelled)."""
    if vocabulary is not None and vocabulary.categories:
        return tuple(vocabulary.categories)
    named = categories or sorted({o.category for r in records for o in r.objects if o.category})
    return tuple(category_phrases(list(named)))


def _given_labels(labels: Sequence[str] | None, vocabulary: Vocabulary | None, phrases: str) -> Sequence[str]:
    """The label set a batch-level function asks for: the given one, or a closed vocabulary's; a
    dataset's must be given (the batch's own records' labels would be an oracle hint)."""
    if labels is not None:
        return labels
    if vocabulary is not None and vocabulary.categories:
        return tuple(vocabulary.categories)
    if phrases in ("categories", "both"):
        raise ValueError("phrases asks for categories: pass labels=label_set(all of the dataset's records, ...)")
    return ()


def phrases_for(caption: str, how: str, vocabulary: Vocabulary | None = None, labels: Sequence[str] = ()) -> list[str]:
    """What the grounder is asked to find for one prior caption: the caption's noun phrases (read
    with a closed `vocabulary` when there is one), the dataset's `labels` (`label_set`), or both."""
    out: list[str] = []
    if how in ("caption", "both"):
        out += phrases_from_caption(caption, vocabulary)
    if how in ("categories", "both"):
        out += labels
    return list(dict.fromkeys(out))


def inner_loop(
    vlm: VLM,
    grounder: Grounder | None,
    records: Sequence[ImageRecord],
    images: Sequence[Image.Image],
    cfg: SVPConfig,
    seed: int,
    vocabulary: Vocabulary | None = None,
    labels: Sequence[str] | None = None,
) -> list[ImageSamples]:
    """Algorithm 1, lines 10-23, for a batch of images; sampling seeded by `seed`; phrases read
    with the records' closed `vocabulary` when they have one, the dataset's `labels` asked for
    with `phrases` categories / both (default: a closed vocabulary's categories; without one,
    pass them: the label set of these few records would be their own labels)."""
    labels = _given_labels(labels, vocabulary, cfg.phrases)
    profile, k = vlm.profile, cfg.samples
    sampled = GenerateOptions(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    base_prompt = profile.caption_prompt()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    # (1) prior samples z_p ~ p(z | c)
    prior_groups = vlm.generate(list(images), [base_prompt] * len(images), replace(sampled, num_return_sequences=k))
    flat_images = [img for img in images for _ in range(k)]
    flat_records = [r for r in records for _ in range(k)]
    prior = [profile.read_caption(c.text) for group in prior_groups for c in group]
    dropped, found = [0] * len(flat_images), [0] * len(flat_images)
    if cfg.grounding and grounder is not None:
        # (2) grounding of each prior sample, written as text; (3) one guided sample per grounding
        phrases = [phrases_for(text, cfg.phrases, vocabulary, labels) for text in prior]
        groundings = grounder.ground(flat_images, phrases, flat_records)
        dropped, found = [g.dropped for g in groundings], [len(g.boxes) for g in groundings]
        contexts = [grounding_context(g, img.size, codec=profile.codec) for g, img in zip(groundings, flat_images, strict=True)]
        prompts = [profile.grounded_caption_prompt(c) for c in contexts]
        guided_completions = [group[0] for group in vlm.generate(flat_images, prompts, sampled)]
    else:  # no feedback: the prior samples are the candidates
        contexts, prompts = [""] * len(flat_images), [base_prompt] * len(flat_images)
        guided_completions = [c for group in prior_groups for c in group]
    guided = [profile.read_caption(c.text) for c in guided_completions]
    degenerate = [degenerate_reason(t, profile.codec, img.size) for t, img in zip(guided, flat_images, strict=True)]
    # (4) scores from full-vocabulary distributions under q (with grounding) and p (without)
    scores = [0.0] * len(guided)
    if cfg.grounding and cfg.score != "none":
        score_fn = SCORES[cfg.score]
        for start in range(0, len(guided), cfg.score_batch):
            idx = [i for i in range(start, min(start + cfg.score_batch, len(guided))) if guided_completions[i].token_ids]
            if not idx:
                continue
            ids = [guided_completions[i].token_ids for i in idx]
            imgs = [flat_images[i] for i in idx]
            q, mask = padded(vlm.logprobs(imgs, [prompts[i] for i in idx], ids, full_vocab=True))
            p, _ = padded(vlm.logprobs(imgs, [base_prompt] * len(idx), ids, full_vocab=True))
            for i, s in zip(idx, score_fn(q, p, mask, cfg.length_normalize).tolist(), strict=True):
                scores[i] = s
    # (5) per image: drop degenerate samples, keep the top fraction (or a random one). A sample whose
    # grounding found nothing was asked exactly p's prompt: its score is 0 by construction, not a
    # measurement, so it is not eligible (an image with no grounding at all would otherwise tie all
    # K samples at 0 and send every one of them into training).
    out = []
    for n, record in enumerate(records):
        part = slice(n * k, (n + 1) * k)
        ok = [d is None for d in degenerate[part]]
        if cfg.grounding and cfg.score != "none":
            ok = [fine and bool(c.strip()) for fine, c in zip(ok, contexts[part], strict=True)]
            selected = select_top(scores[part], cfg.top_fraction, ok)
        else:
            selected = select_random(k, cfg.top_fraction, ok, rng)
        out.append(
            ImageSamples(
                record.image_id,
                prior[part],
                contexts[part],
                guided[part],
                scores[part],
                degenerate[part],
                selected,
                sum(dropped[part]),
                sum(found[part]),
            )
        )
    return out


# ---- iSVP: inference-time grounding, no tuning ----------------------------------------------------
def isvp(
    vlm: VLM,
    grounder: Grounder,
    records: Sequence[ImageRecord],
    images: Sequence[Image.Image],
    phrases: str = "caption",
    vocabulary: Vocabulary | None = None,
    max_new_tokens: int = 48,
    labels: Sequence[str] | None = None,
) -> list[dict]:
    """iSVP: a greedy prior caption, its grounding written as text, then a greedy guided caption
    from the same model (SVP Sec. 3 sampling with K = 1 and no outer loop). `labels`: the
    dataset's label set (`label_set` of all its records; required for categories without a
    closed vocabulary)."""
    profile = vlm.profile
    greedy = GenerateOptions(max_new_tokens=max_new_tokens)
    prior = [profile.read_caption(g[0].text) for g in vlm.generate(list(images), [profile.caption_prompt()] * len(images), greedy)]
    labels = _given_labels(labels, vocabulary, phrases)
    asked = [phrases_for(text, phrases, vocabulary, labels) for text in prior]
    groundings = grounder.ground(list(images), asked, list(records))
    contexts = [grounding_context(g, img.size, codec=profile.codec) for g, img in zip(groundings, images, strict=True)]
    prompts = [profile.grounded_caption_prompt(c) for c in contexts]
    guided = [profile.read_caption(g[0].text) for g in vlm.generate(list(images), prompts, greedy)]
    return [
        {
            "image_id": r.image_id,
            "image": str(r.path),
            "prior": p,
            "phrases": a,
            "context": c,
            "caption": z,
            "detections": len(g.boxes),
            "dropped_detections": g.dropped,
        }
        for r, p, a, c, z, g in zip(records, prior, asked, contexts, guided, groundings, strict=True)
    ]


def caption_images(
    vlm: VLM,
    records: Sequence[ImageRecord],
    out: Path,
    grounder: Grounder | None = None,
    phrases: str = "caption",
    vocabulary: Vocabulary | None = None,
    batch_size: int = 8,
    fingerprint: dict | None = None,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    on_error: str = "fail",
    labels: Sequence[str] | None = None,
    max_new_tokens: int = 64,
) -> int:
    """`refloop caption`: one greedy caption per image into out/captions.jsonl, or with a
    `grounder` iSVP's guided caption; resumable, sharded under `accelerate launch`. Returns the
    images skipped as undecodable. `labels`: the dataset's label set (default: `label_set` of
    `records`). `max_new_tokens`: the longest caption (`eval caption`'s default, 64)."""
    fingerprint = {"task": "caption", "model": model_fingerprint(vlm), "max_new_tokens": max_new_tokens} | (fingerprint or {})
    labels = label_set(records, vocabulary) if labels is None else labels  # the dataset's, whichever images a batch holds
    with shared_run_directory(out, fingerprint, overwrite):
        run = ShardedRun(Path(out) / "captions.jsonl", records, lambda r: r.image_id, batch_size, field="image_id")
        for batch in run.batches(lambda r: r.load_image(), on_error, progress):
            if grounder is not None:
                run.write(isvp(vlm, grounder, batch.items, batch.images, phrases, vocabulary, max_new_tokens, labels=labels))
            else:
                texts = vlm.caption(batch.images, GenerateOptions(max_new_tokens=max_new_tokens))
                run.write({"image_id": r.image_id, "image": str(r.path), "caption": t} for r, t in zip(batch.items, texts, strict=True))
        return run.finish()


# ---- the outer loop ------------------------------------------------------------------------------
def caption_examples(rows: Sequence[dict], records: dict, profile) -> list[InstructionExample]:
    """Eq. 7's data: (image, base caption prompt -> selected guided sample); no grounding in the
    training prompt, so the model learns to write unaided what it wrote with feedback."""
    prompt = profile.caption_prompt()
    return [
        InstructionExample(str(records[row["image_id"]].path), prompt, row["guided"][j], example_id=f"{row['image_id']}/{j}")
        for row in rows
        for j in row["selected"]
    ]


def mix_visual_queries(captions: list[InstructionExample], queries: Sequence[InstructionExample], ratio: float, seed: int) -> list:
    """SVP (CVQ): `ratio` visual-query pairs per caption (drawn without replacement while they
    last), so the model keeps answering its other task prompts."""
    if ratio <= 0 or not queries:
        return list(captions)
    rng = text_seeded_rng("svp-cvq", seed)
    count = min(len(queries), round(ratio * len(captions)))
    return list(captions) + rng.sample(list(queries), count)


class SVP:
    """Algorithms 1-2: `iterations` rounds of inner-loop sampling from the current model and LoRA
    SFT on the selected samples; after each round the adapter is merged, so round i + 1 samples
    from (and scores with) p_theta_i, as line 11 and 17 of Algorithm 1 read.

    Under `accelerate launch` each process samples a share of the image batches into its own
    file (batch b on process b mod P, sampling seeded per batch wherever it runs), every process
    reads all of them, and the SFT averages gradients across processes. Every stage resumes:
    sampled images are skipped, training restarts from its last checkpoint."""

    def __init__(
        self,
        vlm: HFVLM,
        grounder: Grounder | None,
        cfg: SVPConfig,
        vocabulary: Vocabulary | None = None,
        tracking: Tracking | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        """`vocabulary`: the seed records' closed vocabulary (`Detections.vocabulary`), if any;
        `tracking`: where each iteration's SFT reports (one tracker run per iteration's train/);
        `labels`: the dataset's label set (default: `label_set` of the seed records)."""
        self.vlm, self.grounder, self.cfg, self.vocabulary, self.labels = vlm, grounder, cfg, vocabulary, labels
        self.tracking = tracking or Tracking()

    def sample(
        self,
        iteration: int,
        records: Sequence[ImageRecord],
        work: Path,
        progress: Callable[[int], None] | None = None,
        on_error: str = "fail",
    ) -> list[dict]:
        """Algorithm 1's inner loop over `records` into samples.jsonl of `work`, sharded under
        `accelerate launch` (see `ShardedRun`; the seed of batch b is the same wherever it runs);
        every process returns all rows, in record order."""
        run = ShardedRun(work / "samples.jsonl", records, lambda r: r.image_id, self.cfg.images_per_batch, field="image_id")
        labels = self.labels if self.labels is not None else label_set(records, self.vocabulary)  # whichever images a batch holds
        for batch in run.batches(lambda r: r.load_image(), on_error, progress):
            seed = step_seed(step_seed(self.cfg.seed, iteration, "svp-iteration"), batch.number, "torch")
            rows = inner_loop(self.vlm, self.grounder, batch.items, batch.images, self.cfg, seed, self.vocabulary, labels)
            run.write(row.as_dict() for row in rows)
        run.finish()
        return run.rows()

    def iteration(
        self,
        iteration: int,
        records: Sequence[ImageRecord],
        work: Path,
        visual_queries: Sequence[InstructionExample] = (),
        progress: Callable[[str, int, int], None] | None = None,
        on_error: str = "fail",
    ) -> dict:
        """One round: inner loop over `records`, SFT on the selection, merge. Returns its summary."""
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        mine = share(len(records), self.cfg.images_per_batch)  # this process's images of the sharded pass
        tick = (lambda n: progress(f"iteration {iteration + 1}: inner loop (images)", n, mine)) if progress else None
        rows = self.sample(iteration, records, work, tick, on_error)
        ungrounded = sum(not any(c.strip() for c in r["contexts"]) for r in rows)
        bare = sum(not c.strip() for r in rows for c in r["contexts"])  # samples whose grounding found nothing
        if self.grounder is not None and self.cfg.grounding and rows and ungrounded == len(rows):
            raise RefloopError(
                f"iteration {iteration + 1}: the grounder found nothing in any of the {len(rows)} images, so no guided caption "
                "saw a grounding and there is no feedback to select by (check the grounder, its threshold and svp.phrases)"
            )
        by_id = {r.image_id: r for r in records}
        captions = caption_examples(rows, by_id, self.vlm.profile)
        if not captions:
            raise RefloopError(f"iteration {iteration + 1}: no sample was selected (all degenerate?); nothing to train on")
        examples = mix_visual_queries(captions, visual_queries, self.cfg.cvq_ratio, self.cfg.seed + iteration)
        sample_seconds = time.perf_counter() - started
        sft_cfg = self.cfg.sft.model_copy(update={"seed": self.cfg.sft.seed + iteration})
        tuner = SFT(self.vlm, sft_cfg, examples)
        tuner.trainer.track(self.tracking)
        step = (lambda row: progress(f"iteration {iteration + 1}: SFT (steps)", 1, tuner.total_steps)) if progress else None
        summary = tuner.run(work / "train", progress=step)
        adapters = tuner.adapters.unsharded()  # FSDP: gathered into a plain copy (every process); else itself
        if PartialState().is_main_process:
            adapters.save_pretrained(work / "adapters")
        merged = adapters.merged_copy(sft_cfg.adapter)
        # a model changed in memory: run fingerprints must tell it from the base
        lineage = [*self.vlm.lineage, {"svp_iteration": iteration + 1, "adapter": tensors_digest(adapters.state_dict())}]
        self.vlm = self.vlm.with_module(merged, lineage=lineage)
        degenerate = Counter(d for r in rows for d in r["degenerate"] if d)
        dropped = sum(r["dropped_detections"] for r in rows)
        # rows sampled before the count existed (a resumed run) have none: unknown, not 0
        used = sum(r["detections"] for r in rows) if all("detections" in r for r in rows) else None
        if used is not None and dropped > used and PartialState().is_main_process:  # e.g. a VLM grounder's unparsed answers
            log.warning(
                f"SVP iteration {iteration + 1}: the grounder's detections were mostly unusable ({dropped} dropped: unparsed "
                f"answers, malformed or outside the image; {used} used): the guided prompts carry little grounding"
            )
        return {
            "iteration": iteration + 1,
            "images": len(rows),
            "samples": sum(len(r["guided"]) for r in rows),
            "selected": len(captions),
            "visual_queries": len(examples) - len(captions),
            "degenerate": dict(sorted(degenerate.items())),
            "dropped_detections": dropped,
            "detections": used,
            "images_without_grounding": ungrounded,
            "samples_without_grounding": bare if self.cfg.grounding else None,
            "mean_score_selected": _mean([r["scores"][j] for r in rows for j in r["selected"]]),
            "mean_score_all": _mean([s for r in rows for s, d in zip(r["scores"], r["degenerate"], strict=True) if d is None]),
            "sft_steps": tuner.total_steps,
            "sample_seconds": round(sample_seconds, 1),
            "train_seconds": summary.get("train_seconds"),
        }

    def run(
        self,
        records: Sequence[ImageRecord],
        out: Path,
        visual_queries: Sequence[InstructionExample] = (),
        progress: Callable[[str, int, int], None] | None = None,
        on_error: str = "fail",
    ) -> list[dict]:
        return [
            self.iteration(i, records, out / f"iteration-{i + 1}", visual_queries, progress, on_error) for i in range(self.cfg.iterations)
        ]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
