"""Box post-processing: both detectors' boxes -> the few boxes a caption prompt can use.

Coordinates are normalised to 0-1 (x1, y1, x2, y2) with three decimals, as the paper writes them.
Duplicates (same label and IoU at or above ``merge_iou``, or boxes of the two detectors with any labels
and IoU at or above ``merge_any_label_iou``) are one object; the surer box is kept.  Then a balanced sampling keeps small objects, which a plain top-k by confidence
drops first because detectors are least sure of them (see ``balanced_sample`` for the rule).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    label: str
    score: float
    expert: str                                  # which expert found it: "detector" or "open_set"
    box: tuple[float, float, float, float]       # x1, y1, x2, y2 in 0-1

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def normalise(xmin: float, ymin: float, xmax: float, ymax: float, width: int, height: int
              ) -> tuple[float, float, float, float]:
    """Pixel corners -> 0-1 corners with three decimals, clamped to the image and ordered."""
    def scale(value: float, size: int) -> float:
        return round(min(max(value / size, 0.0), 1.0), 3)

    x1, x2 = sorted((scale(xmin, width), scale(xmax, width)))
    y1, y2 = sorted((scale(ymin, height), scale(ymax, height)))
    return (x1, y1, x2, y2)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _label_key(label: str) -> str:
    return " ".join(label.lower().split())


def merge_duplicates(boxes: list[Box], merge_iou: float, any_label_iou: float | None = None) -> list[Box]:
    """Surest box first; a later box is the same object seen again, and dropped, when it overlaps a kept box
    of the same label by ``merge_iou``, or a kept box of the other detector by ``any_label_iou`` whatever
    the labels (the two detectors name things differently: 'person' and 'woman')."""
    def same_object(kept: Box, candidate: Box) -> bool:
        overlap = iou(kept.box, candidate.box)
        if _label_key(kept.label) == _label_key(candidate.label):
            return overlap >= merge_iou
        return any_label_iou is not None and kept.expert != candidate.expert and overlap >= any_label_iou

    kept: list[Box] = []
    for candidate in sorted(boxes, key=lambda b: (-b.score, b.expert, b.box)):
        if not any(same_object(k, candidate) for k in kept):
            kept.append(candidate)
    return kept


def size_class(box: Box, small_area: float, large_area: float) -> str:
    if box.area < small_area:
        return "small"
    return "large" if box.area >= large_area else "medium"


def balanced_sample(boxes: list[Box], max_boxes: int, max_per_label: int, small_area: float,
                    large_area: float) -> list[Box]:
    """At most ``max_boxes`` boxes, with small objects kept.

    The rule: boxes fall into three bins by the share of the image they cover (small below
    ``small_area``, large from ``large_area``, medium between).  The bins take turns, small first, then
    medium, then large; at each turn a bin gives its surest box whose label has fewer than
    ``max_per_label`` boxes taken.  Turns go on until ``max_boxes`` are taken or the bins are empty.
    The result is ordered surest first.
    """
    bins = {name: [] for name in ("small", "medium", "large")}
    for box in sorted(boxes, key=lambda b: (-b.score, b.expert, b.box)):
        bins[size_class(box, small_area, large_area)].append(box)
    taken: list[Box] = []
    per_label: dict[str, int] = {}
    while len(taken) < max_boxes and any(bins.values()):
        for name in ("small", "medium", "large"):
            if len(taken) == max_boxes:
                break
            queue = bins[name]
            while queue:
                box = queue.pop(0)
                key = _label_key(box.label)
                if per_label.get(key, 0) < max_per_label:
                    per_label[key] = per_label.get(key, 0) + 1
                    taken.append(box)
                    break
    return sorted(taken, key=lambda b: (-b.score, b.expert, b.box))


def postprocess(boxes: list[Box], settings) -> list[Box]:
    """Merge duplicates, then sample, with a recipe's ``caption.experts.boxes`` settings."""
    merged = merge_duplicates(boxes, settings.merge_iou, settings.merge_any_label_iou)
    return balanced_sample(merged, settings.max_boxes, settings.max_per_label, settings.small_area,
                           settings.large_area)
