"""The embedded sample: LAION-style metadata over local images, with realistic failures.

Photographs come from scikit-image's bundled data; signs with text are rendered with Pillow, so the
images hold real text to read.  Some rows are built to fail or to be filtered, so a demo build shows every
kind of drop with its reason: a dead link (404), a zero-byte file, a truncated JPEG, an HTML page
served as ``.jpg``, a repeated URL, and rows that the metadata filters reject.  A few near duplicates
(a smaller re-encoded copy, a byte-identical copy under another URL) are kept for the dedup stage;
a mirrored copy is a different image.

The scores (similarity, punsafe, pwatermark) are made up for the sample; the sizes are the real ones.
Everything is deterministic: the same files and metadata on every run and machine.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

from densefusion_hf.sample.server import SAMPLE_HOST

# Bump when the sample's content changes, so old work directories are detected as stale.
SAMPLE_VERSION = 1


@dataclass(frozen=True)
class _Row:
    path: str            # path under the sample's files/ folder (also the URL path)
    text: str            # alt text
    similarity: float = 0.31
    punsafe: float = 0.02
    pwatermark: float = 0.05
    listed_size: tuple[int, int] | None = None   # (width, height) claimed by the metadata, when no file


_PHOTOS = {
    # name in skimage.data: alt text in LAION's style
    "astronaut": "Portrait of astronaut Eileen Collins in her orange flight suit, NASA",
    "chelsea": "Chelsea the tabby cat looking at the camera",
    "coffee": "A cup of coffee on a saucer with a spoon, cafe latte art",
    "rocket": "SpaceX Falcon rocket on the launch pad before lift-off",
    "hubble_deep_field": "Hubble Deep Field: thousands of galaxies in the night sky",
    "immunohistochemistry": "Microscope slide, immunohistochemistry stain of tissue",
    "retina": "Fundus photograph of a human retina, ophthalmology",
    "camera": "Black and white photo of a cameraman with a tripod in a park",
    "coins": "Old Greek coins on a dark background",
    "moon": "Close-up photo of the surface of the Moon with craters",
    "page": "Scanned page of an old book with printed text",
    "clock": "Wall clock, black and white product photo",
    "brick": "Red brick wall texture background",
    "grass": "Green grass texture, lawn background",
    "gravel": "Gravel stones texture for a garden path",
    "colorwheel": "RGB color wheel chart",
    "text": "Text on a sign, hand-written letters",
}

_SIGNS = {
    # file stem: (lines of the sign, background, foreground, alt text)
    "grand-opening": (["GRAND OPENING", "SALE"], (200, 30, 40), (255, 255, 255),
                      "Grand opening sale banner in front of a new shop"),
    "fresh-coffee": (["FRESH COFFEE", "2 FOR 1"], (60, 40, 30), (250, 230, 200),
                     "Chalkboard sign outside a coffee shop"),
    "open-24": (["OPEN 24 HOURS"], (20, 60, 140), (255, 255, 0), "Neon open 24 hours sign in a window"),
    "no-parking": (["NO PARKING", "TOW AWAY ZONE"], (255, 255, 255), (200, 0, 0),
                   "No parking sign on a street pole"),
}


def _jpeg(array_or_image, quality: int = 90) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def render_sign(lines: list[str], background, foreground, size=(800, 450)) -> Image.Image:
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=72)
    heights = [draw.textbbox((0, 0), line, font=font)[3] for line in lines]
    y = (size[1] - sum(heights) - 30 * (len(lines) - 1)) // 2
    for line, h in zip(lines, heights):
        width = draw.textlength(line, font=font)
        draw.text(((size[0] - width) / 2, y), line, fill=foreground, font=font)
        y += h + 30
    return image


def _files_and_rows() -> tuple[dict[str, bytes], list[_Row]]:
    from skimage import data as skdata

    files: dict[str, bytes] = {}
    rows: list[_Row] = []
    for name, text in _PHOTOS.items():
        path = f"photos/{name}.jpg"
        files[path] = _jpeg(getattr(skdata, name)())
        rows.append(_Row(path, text))
    logo = Image.fromarray(skdata.logo())
    files["photos/scikit-image-logo.png"] = _png(logo)
    rows.append(_Row("photos/scikit-image-logo.png", "scikit-image logo, image processing in Python"))
    for stem, (lines, bg, fg, text) in _SIGNS.items():
        path = f"signs/{stem}.jpg"
        files[path] = _jpeg(render_sign(lines, bg, fg), quality=92)
        rows.append(_Row(path, text, similarity=0.34, pwatermark=0.1))

    # Near duplicates for the dedup stage, and one look-alike that is not a duplicate.
    astronaut = Image.fromarray(skdata.astronaut())
    files["copies/astronaut-small.jpg"] = _jpeg(astronaut.resize((256, 256), Image.Resampling.LANCZOS), 60)
    rows.append(_Row("copies/astronaut-small.jpg", "astronaut portrait thumbnail"))
    files["copies/coffee-mirror-site.jpg"] = files["photos/coffee.jpg"]
    rows.append(_Row("copies/coffee-mirror-site.jpg", "Coffee cup, stock photo"))
    files["copies/chelsea-mirrored.jpg"] = _jpeg(ImageOps.mirror(Image.fromarray(skdata.chelsea())))
    rows.append(_Row("copies/chelsea-mirrored.jpg", "Tabby cat portrait (mirrored)"))

    # Rows that the metadata filters of the demo recipe reject before any download.
    files["photos/microaneurysms.jpg"] = _jpeg(skdata.microaneurysms())
    rows.append(_Row("photos/microaneurysms.jpg", "retina microaneurysms crop"))  # short side 102 px
    rows.append(_Row("photos/horse.jpg", "horse silhouette", punsafe=0.93, listed_size=(400, 328)))
    files["photos/horse.jpg"] = _jpeg((skdata.horse() * 255).astype(np.uint8))
    rows.append(_Row("photos/checkerboard.jpg", "free shipping buy now", similarity=0.08))
    files["photos/checkerboard.jpg"] = _jpeg(skdata.checkerboard())
    rows.append(_Row("banners/wide-banner.jpg", "website banner", listed_size=(1600, 200)))
    rows.append(_Row("photos/chelsea.jpg", "cat photo (same URL listed twice)"))

    # Rows that fail during the download, each in its own way.
    jpeg = files["photos/rocket.jpg"]
    files["broken/empty.jpg"] = b""
    files["broken/truncated.jpg"] = jpeg[: len(jpeg) // 2]
    files["broken/not-an-image.jpg"] = b"<!DOCTYPE html><html><body><h1>Hotlinking forbidden</h1></body></html>"
    rows.append(_Row("broken/empty.jpg", "empty file", listed_size=(640, 427)))
    rows.append(_Row("broken/truncated.jpg", "rocket launch (truncated download)", listed_size=(640, 427)))
    rows.append(_Row("broken/not-an-image.jpg", "an HTML page served as .jpg", listed_size=(640, 480)))
    rows.append(_Row("gone/deleted-photo.jpg", "a photo that was deleted (404)", listed_size=(1024, 768)))
    return files, rows


def _listed_size(row: _Row, files: dict[str, bytes]) -> tuple[int, int]:
    if row.listed_size is not None:
        return row.listed_size
    with Image.open(io.BytesIO(files[row.path])) as image:
        return image.size


def write_sample(folder: Path) -> Path:
    """Write the sample's files and its metadata Parquet under ``folder``; return the Parquet path.

    The folder is written once; a later call reuses it (the content is deterministic).
    """
    folder = Path(folder)
    metadata_path = folder / "metadata.parquet"
    stamp = folder / "SAMPLE_VERSION"
    if metadata_path.exists() and stamp.exists() and stamp.read_text().strip() == str(SAMPLE_VERSION):
        return metadata_path
    files, rows = _files_and_rows()
    for rel, body in files.items():
        target = folder / "files" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    sizes = [_listed_size(row, files) for row in rows]
    table = pa.table({
        "URL": [f"http://{SAMPLE_HOST}/{row.path}" for row in rows],
        "TEXT": [row.text for row in rows],
        "WIDTH": pa.array([w for w, _ in sizes], pa.float64()),   # LAION stores sizes as doubles
        "HEIGHT": pa.array([h for _, h in sizes], pa.float64()),
        "similarity": [row.similarity for row in rows],
        "punsafe": pa.array([row.punsafe for row in rows], pa.float32()),
        "pwatermark": pa.array([row.pwatermark for row in rows], pa.float32()),
        "LICENSE": ["?" for _ in rows],
        "NSFW": ["UNLIKELY" if row.punsafe < 0.5 else "NSFW" for row in rows],
    })
    tmp = metadata_path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(metadata_path)
    stamp.write_text(f"{SAMPLE_VERSION}\n")
    return metadata_path
