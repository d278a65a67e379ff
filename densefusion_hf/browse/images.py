"""Images for the page: thumbnails made on demand and cached on disk, full images checked before shown."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

from PIL import Image, ImageOps

from densefusion_hf.images import UnreadableImage, inspect_image

THUMB_SIDE = 320
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


def make_thumbnail(data: bytes | None, side: int = THUMB_SIDE) -> bytes:
    """A JPEG of at most ``side`` pixels a side (JPEGs decoded in draft mode, so at a fraction of the cost)."""
    if not data:
        raise UnreadableImage("no image bytes" if data is None else "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft("RGB", (side, side))
            image = ImageOps.exif_transpose(image)
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGBA")
                background = Image.new("RGB", image.size, (255, 255, 255))
                background.paste(image, mask=image.getchannel("A"))
                image = background
            image.thumbnail((side, side))
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=82, optimize=True)
            return out.getvalue()
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"too large to decode safely: {exc}") from None
    except UnreadableImage:
        raise
    except Exception as exc:  # Pillow raises many types for bad data
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None


def check_image(data: bytes | None) -> str | None:
    """None when ``data`` decodes in full, else why it does not."""
    if data is None:
        return "this row has no image bytes"
    try:
        inspect_image(data)
    except UnreadableImage as exc:
        return str(exc)
    return None


def for_browser(data: bytes) -> tuple[bytes, str]:
    """(bytes, media type) a browser shows: the stored bytes when it reads their format, else a PNG."""
    with Image.open(io.BytesIO(data)) as image:
        media = BROWSER_FORMATS.get(image.format or "")
        if media:
            return data, media
        out = io.BytesIO()
        ImageOps.exif_transpose(image).save(out, format="PNG")
        return out.getvalue(), "image/png"


def placeholder_svg(text: str, side: int = THUMB_SIDE) -> bytes:
    from html import escape

    short = escape(text if len(text) <= 48 else text[:45] + "...")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{side}" height="{side * 3 // 4}" '
            f'viewBox="0 0 {side} {side * 3 // 4}"><rect width="100%" height="100%" fill="#3b1d22"/>'
            f'<text x="50%" y="45%" fill="#ffb4b4" font-family="sans-serif" font-size="18" '
            f'text-anchor="middle">image does not decode</text><text x="50%" y="60%" fill="#e7a3a3" '
            f'font-family="sans-serif" font-size="11" text-anchor="middle">{short}</text></svg>').encode()


class ThumbnailCache:
    """``folder/ab/NAME.jpg`` per image, written atomically; a failure is cached as ``NAME.bad`` (its reason)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _paths(self, name: str) -> tuple[Path, Path]:
        digest = hashlib.sha1(name.encode()).hexdigest()
        base = self.folder / digest[:2] / digest
        return base.with_suffix(".jpg"), base.with_suffix(".bad")

    def get(self, name: str, load) -> tuple[bytes | None, str | None]:
        """(JPEG thumbnail, None) or (None, why the image does not decode); ``load()`` gives the image bytes, or
        None when they cannot be had yet (the index still being built), which is not cached."""
        good, bad = self._paths(name)
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        try:
            with lock:
                if good.exists():
                    return good.read_bytes(), None
                if bad.exists():
                    return None, bad.read_text()
                data = load()
                if data is None:
                    return None, "no image bytes"
                good.parent.mkdir(parents=True, exist_ok=True)
                try:
                    thumb = make_thumbnail(data)
                except UnreadableImage as exc:
                    self._write(bad, str(exc).encode())
                    return None, str(exc)
                self._write(good, thumb)
                return thumb, None
        finally:
            with self._lock:  # one lock per image being made, not one per image ever served
                self._locks.pop(name, None)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
