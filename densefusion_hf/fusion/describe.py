"""The ``template`` caption engine: the priors written out as a structured description, without a model.

It says only what the experts found, with where and how big each object is, the text read in the
image, and the alt text marked as unverified, so that a dataset built offline carries honest text
(``caption_model: template``) instead of a model's guess.
"""

from __future__ import annotations

from collections import Counter

from densefusion_hf.fusion.boxes import Box, size_class
from densefusion_hf.fusion.priors import Priors

TEMPLATE_VERSION = "structured-v1"

_ROWS = ("top", "middle", "bottom")
_COLUMNS = ("left", "centre", "right")


def position(box: Box) -> str:
    """Where a box's centre lies on a 3 x 3 grid: 'top left', 'centre', 'bottom right', ..."""
    x1, y1, x2, y2 = box.box
    row = _ROWS[min(2, int((y1 + y2) / 2 * 3))]
    column = _COLUMNS[min(2, int((x1 + x2) / 2 * 3))]
    if row == "middle":
        return "centre" if column == "centre" else column
    return row if column == "centre" else f"{row} {column}"


def _quote(text: str) -> str:
    return "\u201c" + text.replace("\u201d", "\"") + "\u201d"


def _objects_sentence(boxes: list[Box], small_area: float, large_area: float) -> str:
    counts = Counter(b.label for b in boxes)
    parts = []
    for label in dict.fromkeys(b.label for b in boxes):  # first seen (surest) first
        placed = [f"{size_class(b, small_area, large_area)}, {position(b)}" for b in boxes if b.label == label]
        count = counts[label]
        parts.append(f"{label} ({'; '.join(placed)})" if count == 1
                     else f"{count} x {label} ({'; '.join(placed)})")
    return "Objects detected: " + ", ".join(parts) + "."


def describe(priors: Priors, small_area: float = 0.02, large_area: float = 0.2) -> str:
    """One paragraph from the priors; every clause names its source."""
    sentences = []
    if priors.tags:
        sentences.append("Image tags: " + ", ".join(t.label for t in priors.tags) + ".")
    if priors.boxes:
        sentences.append(_objects_sentence(priors.boxes, small_area, large_area))
    if priors.ocr:
        sentences.append("Text in the image reads: " + "; ".join(_quote(line.text) for line in priors.ocr) + ".")
    if priors.alt_text:
        sentences.append("The web alt text, unverified, says: " + _quote(priors.alt_text) + ".")
    if not sentences:
        sentences.append("No tags, objects or text were found in this image, and no alt text was given.")
    return " ".join(sentences)
