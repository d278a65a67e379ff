"""Reading a release's zip shard: members per second through ``release.images.ShardImages`` (every member read
with its CRC checked, decoded in full to check it, read again when the row is written) against the usual way of
using the official release, measured in the same run: ``ZipFile.extractall`` to a folder, then each extracted
file opened with Pillow and loaded.  The same zip with its central directory cut off (as some of the release's
are) is read through ``ShardImages`` too, which then walks its local file headers (``release.salvage``).

Data: one zip of ``--members`` JPEG photos (scikit-image's, resized to 512 x 384 with noise so no two are
equal) under ``<image_id>.png`` names, stored as the release stores them, in a temp folder.

    python benchmarks/release_zip_read.py [--members 500]
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml
from PIL import Image

from densefusion_hf.recipe import load_recipe
from densefusion_hf.release.images import ShardImages


def write_zip(folder: Path, members: int) -> list[str]:
    from skimage import data

    base = np.asarray(Image.fromarray(data.astronaut()).resize((512, 384)))
    rng = np.random.default_rng(0)
    paths = []
    zips = folder / "release" / "images" / "C"
    zips.mkdir(parents=True)
    with zipfile.ZipFile(zips / "000000.zip", "w", compression=zipfile.ZIP_STORED) as archive:
        for i in range(members):
            noisy = np.clip(base.astype(np.int16) + rng.integers(-8, 8, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
            archive.writestr(f"{i:013d}.png", buf.getvalue())
            paths.append(f"C/000000/{i:013d}.png")
    return paths


def read_all(recipe, workdir: Path, rows: pa.Table) -> tuple[float, int]:
    """Seconds to read every row's member as fetch does, and the bytes read."""
    started = time.perf_counter()
    images = ShardImages(recipe, workdir, rows)
    assert len(images.found) == rows.num_rows, images.failures
    total = sum(len(images.image_row(key)["image"]) for key in rows.column("key").to_pylist())
    images.close()
    return time.perf_counter() - started, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=500)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    try:
        paths = write_zip(folder, args.members)
        recipe_path = folder / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump({"name": "bench", "stages": ["ingest", "fetch", "publish"], "source": {
            "release": {"repo": "./release", "config": "C", "layout": {"jsonl": "C/C.jsonl"}}}}))
        recipe = load_recipe(recipe_path)
        rows = pa.table({"key": [f"k{i}" for i in range(len(paths))], "image_path": paths})

        ours, total = read_all(recipe, folder / "work", rows)

        cut = folder / "cut"
        shutil.copytree(folder / "release", cut / "release")
        cut_zip = cut / "release" / "images" / "C" / "000000.zip"
        blob = cut_zip.read_bytes()
        cut_zip.write_bytes(blob[: blob.rindex(b"PK\x01\x02") + 20])   # inside the last central header
        (cut / "recipe.yaml").write_text(recipe_path.read_text())
        salvaged, _ = read_all(load_recipe(cut / "recipe.yaml"), cut / "work", rows)

        started = time.perf_counter()
        out = folder / "extracted"
        with zipfile.ZipFile(folder / "release" / "images" / "C" / "000000.zip") as archive:
            archive.extractall(out)
        for path in sorted(out.iterdir()):
            with Image.open(path) as image:
                image.load()
        baseline = time.perf_counter() - started

        print(f"{len(paths)} members, {total / 1e6:.1f} MB")
        print(f"ShardImages (CRC-checked reads, full decode, second read): {ours:.2f} s, "
              f"{len(paths) / ours:.0f} members/s")
        print(f"baseline extractall + Pillow load:                        {baseline:.2f} s, "
              f"{len(paths) / baseline:.0f} members/s")
        print(f"ShardImages, central directory cut (local headers):       {salvaged:.2f} s, "
              f"{len(paths) / salvaged:.0f} members/s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
