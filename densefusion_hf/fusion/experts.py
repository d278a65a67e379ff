"""The vision experts of Perceptual Fusion: each reads a batch of images and adds to their priors.

    tagger     zero-shot image classification over the tag vocabulary (CLIP / SigLIP)
    detector   closed-set object detection (the object-detection pipeline: DETR / RT-DETR family)
    open_set   open-set detection queried with the tagger's tags (OWLv2 / OWL-ViT, one pass per image)
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
    """Open-set detection (OWLv2 / OWL-ViT), each image queried with its own best tags (no tags, no queries:
    nothing to look for).

    The zero-shot-object-detection pipeline runs the whole model once per (image, tag) pair.  Here each image
    takes one vision pass with all its queries, and each query's logits go through the same post-processing
    the pipeline applies to its pair, so the boxes and scores are the pipeline's.
    """

    name = "open_set"

    def __init__(self, settings, workdir: Path):
        from densefusion_hf.models import load_pipeline

        self.settings = settings
        pipe = load_pipeline("zero-shot-object-detection", settings.model, workdir, settings.device,
                             settings.dtype, what="caption.experts.open_set model")
        self.model, self.tokenizer, self.image_processor = pipe.model, pipe.tokenizer, pipe.image_processor

    def detect(self, images: list, queries: list[list[str]]) -> list[list[dict]]:
        """Per image, the pipeline's detections ({"score", "label", "box"}, surest first) for its queries."""
        found = []
        for start in range(0, len(images), self.settings.batch_size):
            found.extend(self._detect_batch(images[start:start + self.settings.batch_size],
                                            queries[start:start + self.settings.batch_size]))
        return found

    def _detect_batch(self, images: list, queries: list[list[str]]) -> list[list[dict]]:
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        # Queries tokenised one by one, as the pipeline does (so a tag too long fails as it does there), then
        # padded together; the text tower pools at one position per query, unaffected by the padding.
        tokens = [self.tokenizer(q, return_tensors="pt")["input_ids"][0] for qs in queries for q in qs]
        widest = max(len(t) for t in tokens)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(tokens), widest), pad, dtype=torch.long)
        attention = torch.zeros((len(tokens), widest), dtype=torch.long)
        for row, ids in enumerate(tokens):
            input_ids[row, :len(ids)] = ids
            attention[row, :len(ids)] = 1
        pixels = self.image_processor(images, return_tensors="pt")["pixel_values"].to(self.model.dtype)
        device = self.model.device
        most = max(len(qs) for qs in queries)
        # The model takes the same number of queries per image: each image's own, then the first repeated
        # (their outputs are ignored).
        order, offset = [], 0
        for qs in queries:
            order.extend(list(range(offset, offset + len(qs))) + [offset] * (most - len(qs)))
            offset += len(qs)
        index = torch.tensor(order)
        with torch.inference_mode():
            outputs = self.model(input_ids=input_ids[index].to(device), attention_mask=attention[index].to(device),
                                 pixel_values=pixels.to(device))
        results = []
        for i, (image, qs) in enumerate(zip(images, queries)):
            target = torch.tensor([[image.height, image.width]], dtype=torch.int32)
            detections = []
            for q, label in enumerate(qs):
                one = BaseModelOutput({"logits": outputs.logits[i:i + 1, :, q:q + 1].float().cpu(),
                                       "pred_boxes": outputs.pred_boxes[i:i + 1].float().cpu()})
                post = self.image_processor.post_process_object_detection(
                    outputs=one, threshold=self.settings.threshold, target_sizes=target)[0]
                for k in post["scores"].nonzero():
                    xmin, ymin, xmax, ymax = post["boxes"][k][0].int().tolist()
                    detections.append({"score": post["scores"][k].item(), "label": label,
                                       "box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}})
            results.append(sorted(detections, key=lambda d: d["score"], reverse=True))
        return results

    def run(self, images, priors):
        asked = [i for i, p in enumerate(priors) if p.tags]
        queries = [[t.label for t in priors[i].tags][: self.settings.max_queries] for i in asked]
        outputs = self.detect([images[i] for i in asked], queries) if asked else []
        found = [_detections_to_boxes(dets, images[i], self.name) for i, dets in zip(asked, outputs)]
        for i, boxes in zip(asked, found):
            priors[i].boxes = priors[i].boxes + boxes


def rapidocr_device(requested: str) -> str:
    """Where rapidocr runs: cuda (onnxruntime's CUDA provider) when asked, or for auto when onnxruntime-gpu
    is installed and a GPU is there; else cpu."""
    if requested == "cpu":
        return "cpu"
    try:
        import onnxruntime

        has_provider = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        has_provider = False
    if requested == "cuda":
        if not has_provider:
            raise UserError("caption.experts.ocr.device is cuda but onnxruntime has no CUDA provider here; "
                            "pip install onnxruntime-gpu (in place of onnxruntime), or use device: auto or cpu.")
        return "cuda"
    from densefusion_hf.models import pick_device

    return "cuda" if has_provider and pick_device("auto") == "cuda" else "cpu"


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

    def __init__(self, settings, threads: int | None = None):
        try:
            from rapidocr import RapidOCR
        except ImportError as exc:
            raise UserError(f"caption.experts.ocr.engine is rapidocr but it cannot be imported ({exc}); "
                            f"pip install rapidocr onnxruntime") from None
        self.settings = settings
        params = {"Global.log_level": "error"}
        if rapidocr_device(settings.device) == "cuda":
            params["EngineConfig.onnxruntime.use_cuda"] = True
        if threads:  # one worker process among several: share the cores instead of each taking all of them
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
        self.engine = RapidOCR(params=params)
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


EXPERT_ORDER = ("tagger", "detector", "open_set", "ocr")


def enabled_experts(caption) -> list[str]:
    """The names of the experts a recipe enables, in the order they run."""
    settings = caption.experts
    return [name for name, on in (("tagger", settings.tagger.model), ("detector", settings.detector.model),
                                  ("open_set", settings.open_set.model), ("ocr", settings.ocr.engine)) if on]


def expert_device(caption, name: str) -> str:
    from densefusion_hf.models import pick_device

    section = getattr(caption.experts, name)
    if name == "ocr" and section.engine == "rapidocr":
        return rapidocr_device(section.device)
    return pick_device(section.device)


def cpu_experts(caption) -> list[str]:
    """The enabled experts that run on the CPU and need nothing from an expert that does not: the ones a
    pool of worker processes can run apart from the GPU (the open-set detector needs the tagger's tags)."""
    names = []
    for name in enabled_experts(caption):
        if expert_device(caption, name) == "cpu" and (name != "open_set" or "tagger" in names):
            names.append(name)
    return names


def load_experts(caption, workdir: Path, names: list[str] | None = None, threads: int | None = None) -> list[Expert]:
    """The experts a recipe's ``caption.experts`` enables (or those of them in ``names``), loaded once, in the
    order they must run.  ``threads`` caps the CPU threads of rapidocr (worker processes)."""
    settings = caption.experts
    wanted = enabled_experts(caption) if names is None else [n for n in enabled_experts(caption) if n in names]
    experts: list[Expert] = []
    if "tagger" in wanted:
        experts.append(Tagger(settings.tagger, workdir))
    if "detector" in wanted:
        experts.append(Detector(settings.detector, workdir))
    if "open_set" in wanted:
        experts.append(OpenSetDetector(settings.open_set, workdir))
    if "ocr" in wanted and settings.ocr.engine == "rapidocr":
        experts.append(RapidOcr(settings.ocr, threads))
    elif "ocr" in wanted and settings.ocr.engine == "transformers":
        experts.append(TransformersOcr(settings.ocr, workdir))
    return experts
