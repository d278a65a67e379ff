"""How little an image's encoding lost, to choose the best of several copies with the same pixel count.

A copy saved losslessly ranks above any lossy one; among JPEGs the higher quality (estimated from the
quantisation tables) ranks higher; then, within one format, more bytes per pixel.  Only headers and
tables are read, never the pixels.
"""

from __future__ import annotations

import io

from PIL import Image

# libjpeg's base tables (Annex K of the JPEG standard); qualities scale them.  Sums only are needed,
# so the order of the coefficients (natural or zigzag) does not matter.
_LUMA_SUM = sum([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])
LOSSLESS = {"PNG", "BMP", "TIFF", "PPM", "QOI"}


def jpeg_quality(tables: dict) -> float:
    """libjpeg quality (1-100) whose scaling of the standard luminance table best matches table 0."""
    scale = 100.0 * sum(tables[0]) / _LUMA_SUM  # libjpeg: scale = 5000/q below 50, 200 - 2q above
    return 5000.0 / scale if scale > 100 else (200.0 - scale) / 2.0


def fidelity(data: bytes | None) -> tuple[int, float, float]:
    """(lossless, estimated JPEG quality, bytes per pixel): larger is a better copy."""
    if not data:
        return (0, 0.0, 0.0)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            fmt = image.format or ""
            quality = jpeg_quality(image.quantization) if fmt == "JPEG" and image.quantization else 0.0
    except Exception:  # unreadable here means it was kept for its pixels alone
        return (0, 0.0, 0.0)
    lossless = int(fmt in LOSSLESS or (fmt == "WEBP" and data[12:16] == b"VP8L"))
    return (lossless, round(quality, 1), len(data) / max(1, width * height))
