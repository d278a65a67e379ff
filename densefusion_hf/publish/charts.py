"""Bar charts as PNG for the dataset card, drawn with Pillow (already a dependency of the image code).

The output depends only on the numbers, so a rebuild writes the same bytes and a re-push uploads nothing.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

_WIDTH, _ROW, _MARGIN, _LABEL = 720, 26, 16, 200
_BAR = (52, 101, 164)


def bar_chart_png(title: str, counts: dict[str, int]) -> bytes:
    """A horizontal bar chart: one bar per label, in the order given, with its count written beside it."""
    font = ImageFont.load_default(size=14)
    height = _MARGIN * 3 + _ROW * (len(counts) + 1)
    image = Image.new("RGB", (_WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((_MARGIN, _MARGIN), title, fill="black", font=ImageFont.load_default(size=16))
    largest = max(counts.values(), default=0) or 1
    span = _WIDTH - _LABEL - _MARGIN * 2 - 60
    for index, (label, count) in enumerate(counts.items()):
        top = _MARGIN * 2 + _ROW * (index + 1)
        draw.text((_MARGIN, top + 4), str(label)[:28], fill="black", font=font)
        length = round(span * count / largest)
        draw.rectangle([_LABEL, top + 3, _LABEL + max(length, 1), top + _ROW - 5], fill=_BAR)
        draw.text((_LABEL + length + 6, top + 4), f"{count:,}", fill="black", font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
