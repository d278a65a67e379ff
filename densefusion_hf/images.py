"""Checking that downloaded bytes are a whole, decodable image."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image


class UnreadableImage(Exception):
    """The bytes are not an image Pillow can decode in full; the message says why."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


def inspect_image(data: bytes) -> ImageInfo:
    """Decode ``data`` completely (a truncated file fails here) and return its size and format.

    JPEGs are decoded in draft mode at a reduced scale: every entropy-coded byte is still read, so
    truncation is still caught, at a fraction of the cost of a full-size decode.
    """
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            fmt = image.format or "unknown"
            if fmt == "JPEG":
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"too large to decode safely: {exc}") from None
    except Exception as exc:  # Pillow raises many types for bad data; all mean "unreadable"
        head = data[:64].lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html")):
            raise UnreadableImage("HTML page, not an image") from None
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None
    return ImageInfo(width, height, fmt)


def load_rgb(data: bytes) -> Image.Image:
    """Decode for a model: EXIF orientation applied, converted to RGB (alpha composited on white)."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
