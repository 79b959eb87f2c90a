"""Open-set detectors through transformers: GroundingDINO / MM-GroundingDINO and OWLv2.

Both load with `AutoModelForZeroShotObjectDetection` + `AutoProcessor` (a local directory or a hub
id) and post-process with the processor's `post_process_grounded_object_detection`, so boxes come
back in pixels of the original image. Detections then go through `Grounding.from_detections`
(malformed ones dropped and counted) and per-label non-maximum suppression.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from refloop.data.records import ImageRecord
from refloop.errors import RefloopError
from refloop.grounding.base import Grounding, check_inputs, unique_phrases


class _HFDetector:
    """Loading, batching and the shared tail (hygiene, NMS) of the transformers detectors."""

    kind = "detector"
    model_types: tuple[str, ...] = ()  # config.model_type values this wrapper reads correctly

    def __init__(
        self,
        model,
        processor,
        name: str | None = None,
        threshold: float = 0.3,
        nms_iou: float | None = 0.5,
        max_detections: int | None = None,
        batch_size: int = 4,
    ) -> None:
        self.model, self.processor = model.eval(), processor
        self.name = name or f"{self.kind}:{getattr(model, 'name_or_path', '') or type(model).__name__}"
        self.threshold, self.nms_iou, self.max_detections, self.batch_size = threshold, nms_iou, max_detections, batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str = "auto", dtype: str = "fp32", **options):
        """Load a checkpoint; `options` are the constructor's (thresholds, NMS, batch size)."""
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        from refloop.models.hf import check_local_or_hub, offline_reason, select_device, select_dtype

        path = str(name_or_path)
        check_local_or_hub(path, f"{cls.kind} checkpoint")
        dev = select_device(device)
        try:
            processor = AutoProcessor.from_pretrained(path)
            model = AutoModelForZeroShotObjectDetection.from_pretrained(path, dtype=select_dtype(dtype, dev))
        except (OSError, ValueError) as exc:
            reason = offline_reason(path) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise RefloopError(f"cannot load a {cls.kind} from {path}: {reason}") from None
        if model.config.model_type not in cls.model_types:
            raise RefloopError(f"{path} is a {model.config.model_type!r} model, not one of {', '.join(cls.model_types)} ({cls.__name__})")
        return cls(model.to(dev), processor, name=f"{cls.kind}:{path}", **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _to_model(self, batch) -> dict:
        dtype = next(self.model.parameters()).dtype
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, dtype=dtype) if value.is_floating_point() else value.to(self.device)
            out[key] = value
        return out

    @torch.no_grad()
    def ground(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        records: Sequence[ImageRecord] | None = None,
    ) -> list[Grounding]:
        """One Grounding per image; an image with no phrases gets an empty one without a forward."""
        check_inputs(images, phrases, records)
        asked = [self._phrases(p) for p in phrases]
        out = [Grounding() for _ in images]
        todo = [i for i, p in enumerate(asked) if p]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            raw = self._detect([images[i].convert("RGB") for i in batch], [asked[i] for i in batch])
            for i, (boxes, labels, scores, dropped) in zip(batch, raw, strict=True):
                found = Grounding.from_detections(boxes, labels, scores, images[i].size, dropped=dropped)
                out[i] = found.suppress(self.nms_iou, self.max_detections)
        return out

    def _phrases(self, phrases: Sequence[str]) -> list[str]:
        """The phrases to query, in order."""
        return unique_phrases(phrases)

    def _detect(self, images: list[Image.Image], phrases: list[list[str]]) -> list[tuple[list, list, list, int]]:
        """(boxes in original pixels, labels, scores, detections already dropped) per image."""
        raise NotImplementedError


_SEPARATORS = re.compile(r"[.?]")


class HFGroundingDINO(_HFDetector):
    """GroundingDINO / MM-GroundingDINO: one text prompt per image, 'phrase a. phrase b.'.

    A query's label is the phrase whose tokens it scores highest. transformers' `text_labels` are
    the decoded tokens above `text_threshold` and can straddle two phrases ('red circle blue');
    they are used when they name a requested phrase exactly, otherwise the best phrase is read
    from the token scores (a query with no phrase token above `text_threshold` has no label and
    is dropped). Defaults are GroundingDINO's (box 0.35, text 0.25).
    """

    kind = "grounding-dino"
    model_types = ("grounding-dino", "mm-grounding-dino")

    def __init__(self, model, processor, name: str | None = None, threshold: float = 0.35, text_threshold: float = 0.25, **options) -> None:
        super().__init__(model, processor, name=name, threshold=threshold, **options)
        self.text_threshold = text_threshold
        tok = processor.tokenizer
        self._delimiters = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, *tok.convert_tokens_to_ids([".", "?"])}
        self._max_text_len = getattr(model.config, "max_text_len", 256)

    @staticmethod
    def _text(phrase: str) -> str:
        """A phrase as the prompt writes it: lowercased, free of the '.' and '?' that separate phrases."""
        return " ".join(_SEPARATORS.sub(" ", phrase.lower()).split())

    @classmethod
    def prompt(cls, phrases: Sequence[str]) -> str:
        """'a. b. c.'"""
        return " ".join(cls._text(p) + "." for p in phrases)

    def _phrases(self, phrases: Sequence[str]) -> list[str]:
        """Phrases with words left once separators are removed: each is then one span of the prompt."""
        return [p for p in unique_phrases(phrases) if self._text(p)]

    def _spans(self, input_ids: list[int]) -> list[list[int]]:
        """Token positions of each phrase: the runs between [CLS], '.', '?', [SEP]."""
        spans: list[list[int]] = []
        current: list[int] = []
        for pos, token in enumerate(input_ids):
            if token in self._delimiters:
                if current:
                    spans.append(current)
                current = []
            else:
                current.append(pos)
        return spans + ([current] if current else [])

    def _detect(self, images, phrases):
        texts = [self.prompt(p) for p in phrases]
        batch = self.processor(
            images=images, text=texts, return_tensors="pt", padding="longest", truncation=True, max_length=self._max_text_len
        )
        inputs = self._to_model(batch)
        outputs = self.model(**inputs)
        results = self.processor.post_process_grounded_object_detection(
            outputs,
            input_ids=inputs["input_ids"],
            threshold=self.threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(im.height, im.width) for im in images],
        )
        probs = outputs.logits.sigmoid().float().cpu()
        raw = []
        for row, (result, asked) in enumerate(zip(results, phrases, strict=True)):
            # The queries post-processing kept, in order (its own rule: best token score > threshold).
            kept = (probs[row].max(dim=-1).values > self.threshold).nonzero().flatten().tolist()
            spans = self._spans(inputs["input_ids"][row].tolist())[: len(asked)]
            tok = self.processor.tokenizer
            by_text = {tok.decode(tok(self._text(p), add_special_tokens=False).input_ids): p for p in asked}
            labels = []
            for k, text_label in enumerate(result["text_labels"]):
                label = by_text.get(" ".join(str(text_label).split()), "")
                if not label and spans and len(kept) == len(result["text_labels"]):
                    best = [float(probs[row, kept[k], span].max()) for span in spans]
                    j = max(range(len(spans)), key=best.__getitem__)
                    label = asked[j] if best[j] > self.text_threshold else ""
                labels.append(label)
            raw.append((result["boxes"].float().cpu().tolist(), labels, result["scores"].float().cpu().tolist(), 0))
        return raw


class HFOwlV2(_HFDetector):
    """OWLv2: each phrase is its own text query; the default threshold is OWLv2's 0.1.

    The processor pads every image to a square (bottom and right) before resizing, and predicted
    boxes are fractions of that square: post-processing with the original (height, width) scales
    them by the longer side, which is pixels of the original image; the parts in the padding are
    clipped away. Images with fewer phrases than others in a batch get blank padding queries,
    which OWLv2 does not mask (it masks only queries starting with token id 0): their logits are
    set to the lowest value so no box is labelled with one.

    The processor's resize needs scipy; without it the image is resized here with PIL (longer side
    to the processor's size, the same geometry) and the processor only pads, with a warning,
    since pixel values then differ slightly from the reference preprocessing.
    """

    kind = "owlv2"
    model_types = ("owlv2",)

    def __init__(self, model, processor, name: str | None = None, threshold: float = 0.1, **options) -> None:
        super().__init__(model, processor, name=name, threshold=threshold, **options)
        ip = processor.image_processor
        self._resize_here = bool(getattr(ip, "do_resize", True)) and importlib.util.find_spec("scipy") is None
        if self._resize_here:
            warnings.warn(
                "OWLv2's image processor needs scipy to resize; resizing with PIL instead (install scipy for the reference preprocessing)",
                stacklevel=2,
            )

    def _fit(self, image: Image.Image) -> Image.Image:
        size = self.processor.image_processor.size
        side = int(size["height"] if isinstance(size, dict) else size.height)
        scale = side / max(image.size)
        target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)

    def _detect(self, images, phrases):
        kwargs = {"do_resize": False} if self._resize_here else {}
        pixels = [self._fit(im) for im in images] if self._resize_here else images
        batch = self.processor(images=pixels, text=[list(p) for p in phrases], return_tensors="pt", truncation=True, **kwargs)
        outputs = self.model(**self._to_model(batch))
        for row, asked in enumerate(phrases):
            outputs.logits[row, :, len(asked) :] = torch.finfo(outputs.logits.dtype).min
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(im.height, im.width) for im in images], text_labels=[list(p) for p in phrases]
        )
        return [(r["boxes"].float().cpu().tolist(), list(r["text_labels"]), r["scores"].float().cpu().tolist(), 0) for r in results]
