"""The numbers a dataset card reports about the published rows: resolutions, categories and caption
length in characters, words and sentences (the measures of the DenseFusion paper's Table 1)."""

from __future__ import annotations

import re
import statistics
from collections import Counter

import pyarrow as pa

# Short-side buckets: the paper keeps high-resolution images, so the card shows how high.
RESOLUTION_EDGES = [0, 256, 384, 512, 768, 1024, 1536]
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def resolution_bucket(short_side: int) -> str:
    for low, high in zip(RESOLUTION_EDGES, RESOLUTION_EDGES[1:]):
        if short_side < high:
            return f"{low}-{high - 1}"
    return f"{RESOLUTION_EDGES[-1]}+"


def sentence_count(text: str) -> int:
    """Sentences end at . ! or ? before a space or the end; a trailing fragment counts as one too."""
    text = text.strip()
    if not text:
        return 0
    ends = list(_SENTENCE_END.finditer(text))
    tail = text[ends[-1].end():].strip() if ends else text
    return len(ends) + (1 if tail else 0)


def _summary(values: list[int]) -> dict:
    if not values:
        return {}
    return {"mean": round(statistics.fmean(values), 1), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


class PublishedStats:
    """Accumulates over the published tables, one at a time, so the whole dataset is never in memory."""

    def __init__(self, categories: bool = True):
        self.count_categories = categories  # without the recipe's categories every row is 'other'
        self.rows = 0
        self.resolutions: Counter = Counter()
        self.categories: Counter = Counter()
        self.widths: list[int] = []
        self.heights: list[int] = []
        self.caption_lengths = {"characters": [], "words": [], "sentences": []}

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        widths, heights = table.column("width").to_pylist(), table.column("height").to_pylist()
        self.widths += widths
        self.heights += heights
        self.resolutions.update(resolution_bucket(min(w, h)) for w, h in zip(widths, heights))
        if self.count_categories and "category" in table.column_names:
            self.categories.update(c for c in table.column("category").to_pylist() if c is not None)
        if "caption" in table.column_names:
            for caption in table.column("caption").to_pylist():
                caption = caption or ""
                self.caption_lengths["characters"].append(len(caption))
                self.caption_lengths["words"].append(len(caption.split()))
                self.caption_lengths["sentences"].append(sentence_count(caption))

    def result(self) -> dict:
        order = [resolution_bucket(low) for low in RESOLUTION_EDGES]
        return {
            "rows": self.rows,
            "resolutions": {name: self.resolutions[name] for name in order if self.resolutions[name]},
            "width": _summary(self.widths),
            "height": _summary(self.heights),
            "categories": dict(sorted(self.categories.items(), key=lambda kv: (-kv[1], kv[0]))),
            "caption_length": {unit: _summary(values) for unit, values in self.caption_lengths.items()
                               if values},
        }
