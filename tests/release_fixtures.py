"""A miniature of the official DenseFusion-1M release, in its layout and with its kinds of damage.

    README.md                                   configs DenseFusion-1M and DenseFusion-4V-100K (JSON Lines)
    DenseFusion-1M/DenseFusion-1M.jsonl         image_id (13 digits), url, image_path, caption (+ a field
                                                the layout does not name)
    DenseFusion-4V-100k/DenseFusion-4V-100k.jsonl
    images/DenseFusion-1M/000000.zip ...        members <image_id>.png holding PNG or JPEG bytes

Damage, as users of the real release met it: ``000001.zip`` has a member whose CRC is wrong,
``000002.zip`` ends inside its central directory (zipfile refuses it; its members are read from their local
headers), ``000003.zip`` is missing, ``000000.zip`` has a member that is not an image and ``000004.zip``
lacks a member its row names.  Some of the lost rows' URLs are
served from the loopback image server; the others are dead.

Each row says what the build must make of it (``expect``): taken from the release, repaired from its URL
(with the bytes served there), or lost with a reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

RELEASE_REPO = "BAAI/DenseFusion-1M"
CONFIG_1M, FOLDER_1M = "DenseFusion-1M", "DenseFusion-1M"
CONFIG_4V, FOLDER_4V = "DenseFusion-4V-100K", "DenseFusion-4V-100k"

README = f"""---
license: cc-by-4.0
configs:
- config_name: {CONFIG_1M}
  data_files:
  - split: train
    path: {FOLDER_1M}/{FOLDER_1M}.jsonl
- config_name: {CONFIG_4V}
  data_files:
  - split: train
    path: {FOLDER_4V}/{FOLDER_4V}.jsonl
---

# DenseFusion-1M (miniature for tests)
"""


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pictures() -> list[np.ndarray]:
    """Distinct real pictures (scikit-image's), small enough to keep the zips small."""
    from skimage import data

    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.camera(), data.hubble_deep_field()]
    return [np.asarray(Image.fromarray(a).resize((160, 120))) for a in arrays]


@dataclass
class MiniRelease:
    folder: Path
    rows: list[dict]                       # the 1M config's rows, each with "expect" and "zip"
    served: dict[str, bytes]               # path on the image server -> bytes
    shards: dict[str, dict] = field(default_factory=dict)   # zip path -> the card's expected counts


def _image_id(n: int) -> int:
    return 1_000_000_000_000 + 7919 * n


def _damage_crc(blob: bytes, member_data: bytes) -> bytes:
    """Flip one byte inside a stored member, so its CRC no longer matches."""
    at = blob.index(member_data) + len(member_data) // 2
    return blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1:]


def truncate_central_directory(blob: bytes) -> bytes:
    """Cut the file half-way through its central directory (the end record goes with it)."""
    eocd = blob.rindex(b"PK\x05\x06")
    size, offset = struct.unpack("<II", blob[eocd + 12: eocd + 20])
    return blob[: offset + size // 2]


def write_mini_release(folder: Path, server_url: str) -> MiniRelease:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(README)
    pics = pictures()
    served: dict[str, bytes] = {}
    rows: list[dict] = []
    members: dict[str, dict[str, bytes]] = {}

    def add(n: int, shard: str, member: bytes | None, *, expect: str, url_bytes: bytes | None = None,
            reason: str | None = None):
        image_id = _image_id(n)
        path = f"{FOLDER_1M}/{shard}/{image_id}.png"
        url = f"{server_url}/release/{image_id}.jpg"
        if url_bytes is not None:
            served[f"release/{image_id}.jpg"] = url_bytes
        if member is not None:
            members.setdefault(shard, {})[f"{image_id}.png"] = member
        rows.append({"image_id": image_id, "url": url, "image_path": path,
                     "caption": f"A dense caption of picture {n}. It describes everything in detail.",
                     "source_dataset": "laion2b", "expect": expect, "reason": reason,
                     "zip": f"images/{FOLDER_1M}/{shard}.zip", "member": member, "url_bytes": url_bytes})

    not_an_image = b"<html><body>502 Bad Gateway</body></html>"
    add(0, "000000", png_bytes(pics[0]), expect="release")
    add(1, "000000", jpeg_bytes(pics[1]), expect="release")                      # JPEG bytes, .png name
    add(2, "000000", not_an_image, expect="url", url_bytes=jpeg_bytes(pics[2]), reason="corrupt_in_release")
    add(3, "000001", jpeg_bytes(pics[3]), expect="lost", reason="corrupt_in_release")    # bad CRC, dead URL
    add(4, "000001", png_bytes(pics[4]), expect="release")
    add(5, "000002", png_bytes(pics[5]), expect="release")              # central directory cut: salvaged
    add(6, "000002", png_bytes(pics[0][::-1]), expect="release")
    add(7, "000003", None, expect="url", url_bytes=jpeg_bytes(pics[1][:, ::-1]), reason="missing_in_release")
    add(8, "000003", None, expect="lost", reason="missing_in_release")                 # zip missing, dead URL
    add(9, "000004", jpeg_bytes(pics[2][::-1]), expect="release")
    add(10, "000004", None, expect="lost", reason="missing_in_release")                # member absent

    zips = folder / "images" / FOLDER_1M
    zips.mkdir(parents=True)
    for shard, files in members.items():
        if shard == "000003":
            continue
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        blob = buf.getvalue()
        if shard == "000001":
            blob = _damage_crc(blob, rows[3]["member"])
        if shard == "000002":
            blob = truncate_central_directory(blob)
        (zips / f"{shard}.zip").write_bytes(blob)

    (folder / FOLDER_1M).mkdir()
    with open(folder / FOLDER_1M / f"{FOLDER_1M}.jsonl", "w") as out:
        for row in rows:
            out.write(json.dumps({k: row[k] for k in ("image_id", "url", "image_path", "caption",
                                                       "source_dataset")}) + "\n")
    # The 4V-100K config: a subset of the same rows, its own folder (lower-case k) and zip.
    (folder / FOLDER_4V).mkdir()
    (folder / "images" / FOLDER_4V).mkdir(parents=True)
    with zipfile.ZipFile(folder / "images" / FOLDER_4V / "000000.zip", "w") as archive:
        archive.writestr(f"{_image_id(0)}.png", rows[0]["member"])
    with open(folder / FOLDER_4V / f"{FOLDER_4V}.jsonl", "w") as out:
        out.write(json.dumps({"image_id": _image_id(0), "url": rows[0]["url"],
                              "image_path": f"{FOLDER_4V}/000000/{_image_id(0)}.png",
                              "caption": "A GPT-4V caption of picture 0."}) + "\n")

    release = MiniRelease(folder, rows, served)
    for row in rows:
        entry = release.shards.setdefault(row["zip"], {"rows": 0, "read": 0, "missing": 0, "corrupt": 0,
                                                        "too_large": 0, "repaired": 0, "lost": 0})
        entry["rows"] += 1
        if row["expect"] == "release":
            entry["read"] += 1
        else:
            entry["missing" if row["reason"] == "missing_in_release" else "corrupt"] += 1
            entry["repaired" if row["expect"] == "url" else "lost"] += 1
    return release


def expected_sha256(row: dict) -> str:
    return hashlib.sha256(row["member"] if row["expect"] == "release" else row["url_bytes"]).hexdigest()
