"""The priors of one image: what the vision experts found, kept as data and written as text.

Text forms follow the paper: boxes as ``label: [x1, y1, x2, y2]`` normalised to 0-1 with three decimals,
tags joined by `` | ``, OCR as a list of lines (each with the box it was read in, when the engine locates it).  The ``priors`` column of the dataset is ``PRIORS_TYPE``;
an expert that failed on the image is listed in ``failures`` with its reason, so a caption made without
that expert's help can be told apart from one where the expert found nothing.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import pyarrow as pa

from densefusion_hf.fusion.boxes import Box


@dataclass(frozen=True)
class Tag:
    label: str
    score: float


@dataclass(frozen=True)
class OcrLine:
    text: str
    score: float | None     # None when the OCR engine gives no score (a generative OCR model)
    box: tuple[float, float, float, float] | None = None   # x1, y1, x2, y2 in 0-1; None when not located


@dataclass(frozen=True)
class Failure:
    expert: str
    reason: str


def failure_reason(exc: BaseException) -> str:
    """An exception as the short reason recorded in the data (an expert's or the captioner's failure)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass
class Priors:
    alt_text: str = ""
    tags: list[Tag] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    ocr: list[OcrLine] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def to_row(self) -> dict:
        return {
            "tags": [{"label": t.label, "score": t.score} for t in self.tags],
            "boxes": [{"label": b.label, "score": b.score, "expert": b.expert, "box": list(b.box)}
                      for b in self.boxes],
            "ocr": [{"text": line.text, "score": line.score, "box": list(line.box) if line.box else None}
                    for line in self.ocr],
            "alt_text": self.alt_text,
            "failures": [{"expert": f.expert, "reason": f.reason} for f in self.failures],
        }

    @classmethod
    def from_row(cls, row: dict) -> "Priors":
        return cls(
            alt_text=row["alt_text"] or "",
            tags=[Tag(t["label"], t["score"]) for t in row["tags"]],
            boxes=[Box(b["label"], b["score"], b["expert"], tuple(b["box"])) for b in row["boxes"]],
            ocr=[OcrLine(o["text"], o["score"], tuple(o["box"]) if o.get("box") else None) for o in row["ocr"]],
            failures=[Failure(f["expert"], f["reason"]) for f in row["failures"]],
        )


PRIORS_TYPE = pa.struct([
    ("tags", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
    ("boxes", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64()), ("expert", pa.string()),
                                  ("box", pa.list_(pa.float64()))]))),
    ("ocr", pa.list_(pa.struct([("text", pa.string()), ("score", pa.float64()), ("box", pa.list_(pa.float64()))]))),
    ("alt_text", pa.string()),
    ("failures", pa.list_(pa.struct([("expert", pa.string()), ("reason", pa.string())]))),
])


def format_coords(box: tuple[float, float, float, float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in box) + "]"


def format_box(box: Box) -> str:
    return f"{box.label}: {format_coords(box.box)}"


def format_tags(tags: list[Tag]) -> str:
    return " | ".join(t.label for t in tags)


_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_TAG = re.compile(r"<[^>]{0,200}>")


def clean_alt_text(text: str | None, max_chars: int = 500) -> str:
    """Alt text as world knowledge: HTML entities decoded (twice: web text is often escaped twice), markup
    and URLs removed, whitespace collapsed, cut at a word boundary to ``max_chars``."""
    if not text:
        return ""
    text = html.unescape(html.unescape(text))
    text = _URL.sub(" ", _TAG.sub(" ", text))
    text = " ".join(text.split())
    if len(text) > max_chars:
        cut = text[: max_chars + 1].rsplit(" ", 1)[0]
        text = (cut if cut and len(cut) <= max_chars else text[:max_chars]).rstrip(" ,;:-")
    return text
