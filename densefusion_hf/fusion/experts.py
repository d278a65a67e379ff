"""The vision experts of Perceptual Fusion: each reads a batch of images and adds to their priors.

    tagger     zero-shot image classification over the tag vocabulary (CLIP / SigLIP)
    detector   closed-set object detection (the object-detection pipeline: DETR / RT-DETR family)
    open_set   open-set detection queried with the tagger's tags (zero-shot-object-detection: OWLv2 / OWL-ViT)
    ocr        rapidocr (PaddleOCR's models) or an image-text-to-text OCR model; lines in reading order

Experts run in that order, because the open-set detector asks for the tags.  ``apply`` runs an expert on
a batch; when the batch fails it retries image by image, and an image that still fails gets a
``Failure`` with the reason in its priors: captioning goes on with the priors that exist.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from densefusion_hf.errors import UserError
from densefusion_hf.fusion.boxes import Box, normalise
from densefusion_hf.fusion.chat import ChatGenerator
from densefusion_hf.fusion.priors import Failure, OcrLine, Priors, Tag, failure_reason

DEFAULT_VOCABULARY = Path(__file__).parent / "data" / "tags.txt"


def read_vocabulary(path: Path | None = None) -> list[str]:
    """Tags from a vocabulary file: one per line, ``#`` starts a comment, duplicates removed."""
    path = Path(path) if path else DEFAULT_VOCABULARY
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"caption.experts.tagger.vocabulary: cannot read {path}: {exc.strerror or exc}.") from None
    tags = [" ".join(line.split("#", 1)[0].split()) for line in lines]
    tags = list(dict.fromkeys(t for t in tags if t))
    if not tags:
        raise UserError(f"{path}: the tag vocabulary is empty; write one tag per line.")
    return tags


class Expert:
    name = ""

    def run(self, images: list, priors: list[Priors]) -> None:
        """Add this expert's findings to each image's priors.  Compute everything before changing any
        priors, so a batch that raises leaves them as they were."""
        raise NotImplementedError


def apply(expert: Expert, images: list, priors: list[Priors]) -> None:
    """Run ``expert`` on a batch; if the batch fails, image by image, recording the failures."""
    try:
        expert.run(images, priors)
    except Exception as exc:  # an expert's failure costs its priors, never the caption
        if len(images) == 1:
            priors[0].failures.append(Failure(expert.name, failure_reason(exc)))
            return
        for image, prior in zip(images, priors):
            apply(expert, [image], [prior])


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Tagger(Expert):
    """Zero-shot classification over the vocabulary, as the zero-shot-image-classification pipeline scores
    it (softmax over all tags for CLIP, sigmoid for SigLIP), with the tag embeddings computed once instead
    of for every image."""

    name = "tagger"

    def __init__(self, settings, workdir: Path):
        import torch

        from densefusion_hf.models import ImageTextEmbedder

        self.settings = settings
        self.vocabulary = read_vocabulary(settings.vocabulary)
        self.embedder = ImageTextEmbedder(settings.model, workdir, settings.device, settings.dtype)
        model = self.embedder.model
        self.sigmoid = "siglip" in model.config.model_type
        texts = [settings.hypothesis_template.format(tag) for tag in self.vocabulary]
        self.tag_vectors = np.concatenate([self.embedder.embed_texts(texts[i:i + 256])
                                           for i in range(0, len(texts), 256)])
        with torch.inference_mode():
            self.scale = float(model.logit_scale.float().exp().cpu())
            self.bias = float(model.logit_bias.float().cpu()) if getattr(model, "logit_bias", None) is not None else 0.0

    def scores(self, images: list) -> np.ndarray:
        """(images x tags) scores in the pipeline's sense."""
        logits = self.scale * (self.embedder.embed_images(images) @ self.tag_vectors.T) + self.bias
        if self.sigmoid:
            return 1.0 / (1.0 + np.exp(-logits))
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def run(self, images, priors):
        found = []
        for batch in _batches(images, self.settings.batch_size):
            for row in self.scores(batch):
                best = np.argsort(-row, kind="stable")[: self.settings.top_k]
                found.append([Tag(self.vocabulary[i], round(float(row[i]), 4)) for i in best
                              if row[i] >= self.settings.threshold])
        for prior, tags in zip(priors, found):
            prior.tags = tags


def _detections_to_boxes(detections: list[dict], image, expert: str) -> list[Box]:
    width, height = image.size
    return [Box(d["label"], round(float(d["score"]), 4), expert,
                normalise(d["box"]["xmin"], d["box"]["ymin"], d["box"]["xmax"], d["box"]["ymax"], width, height))
            for d in detections]


class Detector(Expert):
    """Closed-set detection through the object-detection pipeline."""

    name = "detector"

    def __init__(self, settings, workdir: Path):
        from densefusion_hf.models import load_pipeline

        self.settings = settings
        self.pipe = load_pipeline("object-detection", settings.model, workdir, settings.device, settings.dtype,
                                  what="caption.experts.detector model")

    def run(self, images, priors):
        outputs = self.pipe(list(images), threshold=self.settings.threshold, batch_size=self.settings.batch_size)
        found = [_detections_to_boxes(dets, image, self.name) for dets, image in zip(outputs, images)]
        for prior, boxes in zip(priors, found):
            prior.boxes = prior.boxes + boxes


class OpenSetDetector(Expert):
    """Open-set detection through the zero-shot-object-detection pipeline, each image queried with its own
    best tags (no tags, no queries: nothing to look for)."""

    name = "open_set"

    def __init__(self, settings, workdir: Path):
        from densefusion_hf.models import load_pipeline

        self.settings = settings
        self.pipe = load_pipeline("zero-shot-object-detection", settings.model, workdir, settings.device,
                                  settings.dtype, what="caption.experts.open_set model")

    def run(self, images, priors):
        asked = [i for i, p in enumerate(priors) if p.tags]
        requests = [{"image": images[i], "candidate_labels": [t.label for t in priors[i].tags]
                     [: self.settings.max_queries]} for i in asked]
        outputs = self.pipe(requests, threshold=self.settings.threshold,
                            batch_size=self.settings.batch_size) if requests else []
        found = [_detections_to_boxes(dets, images[i], self.name) for i, dets in zip(asked, outputs)]
        for i, boxes in zip(asked, found):
            priors[i].boxes = priors[i].boxes + boxes


def reading_order(lines: list[tuple[str, float | None, np.ndarray]]) -> list[tuple[str, float | None]]:
    """OCR lines (text, score, corner points) top to bottom; lines whose boxes share most of their height
    are one row, read left to right."""
    return [(text, score) for text, score, _ in located_reading_order(lines)]


def located_reading_order(lines: list[tuple[str, float | None, np.ndarray]]
                          ) -> list[tuple[str, float | None, tuple[float, float, float, float]]]:
    """``reading_order`` keeping each line's enclosing box in pixels (x1, y1, x2, y2)."""
    placed = []
    for text, score, points in lines:
        points = np.asarray(points, dtype=float).reshape(-1, 2)
        placed.append((points[:, 1].min(), points[:, 1].max(), points[:, 0].min(), text, score,
                       points[:, 0].max()))
    placed.sort(key=lambda p: (p[0] + p[1]) / 2)
    rows: list[list] = []
    for item in placed:
        top, bottom = item[0], item[1]
        if rows:
            row_top, row_bottom = min(r[0] for r in rows[-1]), max(r[1] for r in rows[-1])
            overlap = min(bottom, row_bottom) - max(top, row_top)
            if overlap > 0.5 * min(bottom - top, row_bottom - row_top):
                rows[-1].append(item)
                continue
        rows.append([item])
    return [(item[3], item[4], (item[2], item[0], item[5], item[1]))
            for row in rows for item in sorted(row, key=lambda r: r[2])]


class RapidOcr(Expert):
    """rapidocr: PaddleOCR's detection and recognition models, shipped inside its wheel."""

    name = "ocr"

    def __init__(self, settings):
        try:
            from rapidocr import RapidOCR
        except ImportError as exc:
            raise UserError(f"caption.experts.ocr.engine is rapidocr but it cannot be imported ({exc}); "
                            f"pip install rapidocr onnxruntime") from None
        self.settings = settings
        self.engine = RapidOCR(params={"Global.log_level": "error"})
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)

    def read(self, image) -> list[OcrLine]:
        result = self.engine(image)  # as PIL: rapidocr takes an array as BGR, a PIL image as RGB
        if result.txts is None:
            return []
        lines = [(text.strip(), float(score), box) for text, score, box in
                 zip(result.txts, result.scores, result.boxes)
                 if text.strip() and score >= self.settings.min_score]
        width, height = image.size
        return [OcrLine(text, round(score, 4), normalise(*corners, width, height))
                for text, score, corners in located_reading_order(lines)][: self.settings.max_lines]

    def run(self, images, priors):
        found = [self.read(image) for image in images]
        for prior, lines in zip(priors, found):
            prior.ocr = lines


class TransformersOcr(Expert):
    """A generative OCR model through the image-text-to-text pipeline; its lines carry no score."""

    name = "ocr"

    def __init__(self, settings, workdir: Path):

        self.settings = settings
        self.generator = ChatGenerator(settings.model, workdir, settings.device, settings.dtype, settings.batch_size,
                                       {"max_new_tokens": settings.max_new_tokens, "do_sample": False},
                                       what="caption.experts.ocr model")

    def run(self, images, priors):
        found = []
        for text in self.generator.generate(images, [self.settings.prompt] * len(images)):
            lines = [" ".join(line.split()) for line in text.splitlines()]
            found.append([OcrLine(line, None) for line in lines if line][: self.settings.max_lines])
        for prior, lines in zip(priors, found):
            prior.ocr = lines


def load_experts(caption, workdir: Path) -> list[Expert]:
    """The experts a recipe's ``caption.experts`` enables, loaded once, in the order they must run."""
    settings = caption.experts
    experts: list[Expert] = []
    if settings.tagger.model:
        experts.append(Tagger(settings.tagger, workdir))
    if settings.detector.model:
        experts.append(Detector(settings.detector, workdir))
    if settings.open_set.model:
        experts.append(OpenSetDetector(settings.open_set, workdir))
    if settings.ocr.engine == "rapidocr":
        experts.append(RapidOcr(settings.ocr))
    elif settings.ocr.engine == "transformers":
        experts.append(TransformersOcr(settings.ocr, workdir))
    return experts
