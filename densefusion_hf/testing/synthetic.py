"""A synthetic published dataset: many small rows in the layout ``df-hf build`` publishes, written fast.

For the browse benchmark (``benchmarks/browse_latency.py``) and tests: ``DATASET/README.md`` with the
config, ``DATASET/CONFIG/train-0000i-of-0000N.parquet`` with the datasets ``Image`` feature (bytes embedded),
row groups of 100 rows, priors of ``PRIORS_TYPE`` with boxes and OCR lines, captions whose words come from
a small vocabulary (so a search has known answers: ``expected_rows`` recomputes them).

    python -m densefusion_hf.testing.synthetic DIR --rows 1000000
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import pyarrow as pa

CONFIG = "synthetic"
CATEGORIES = ["animals", "people", "food", "vehicles", "text", "scenery"]
NOUNS = ["cat", "dog", "bicycle", "street", "sign", "coffee", "mountain", "boat", "child", "market", "bridge",
         "window", "tree", "bus", "shop", "garden", "river", "lamp", "table", "train"]
ADJECTIVES = ["red", "small", "old", "bright", "wooden", "busy", "quiet", "green", "tall", "wet"]
OCR_WORDS = ["OPEN", "SALE", "EXIT", "CAFE", "STOP", "HOTEL", "PARKING", "FRESH", "BAKERY", "TAXI"]
LABELS = ["person", "car", "dog", "cat", "sign", "cup", "bicycle", "tree"]
EXPERTS = ["detector", "open_set"]
ROW_GROUP = 100


def _images(count: int = 32) -> list[tuple[bytes, int, int]]:
    """``count`` distinct small JPEGs (bytes, width, height), 32 to 96 pixels a side."""
    from PIL import Image, ImageDraw

    rng = random.Random(7)
    out = []
    for i in range(count):
        width, height = rng.randrange(32, 97), rng.randrange(32, 97)
        image = Image.new("RGB", (width, height), tuple(rng.randrange(40, 220) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        draw.ellipse((width // 5, height // 5, width * 4 // 5, height * 4 // 5),
                     fill=tuple(rng.randrange(0, 255) for _ in range(3)))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=80)
        out.append((buf.getvalue(), width, height))
    return out


def synthetic_row(i: int, images: list[tuple[bytes, int, int]]) -> dict:
    """Row ``i``: a pure function of ``i``, so tests can recompute any row."""
    rng = random.Random(i)
    blob, width, height = images[i % len(images)]
    words = [rng.choice(ADJECTIVES) + " " + rng.choice(NOUNS) for _ in range(1 + i % 6)]
    caption = "A photo of a " + ", a ".join(words) + "."
    ocr = [rng.choice(OCR_WORDS) for _ in range(i % 3)] if i % 4 == 0 else []
    if ocr:
        caption += " Text in the image reads: " + "; ".join(ocr) + "."
    boxes = []
    for b in range(i % 4):
        x, y = round(rng.random() * 0.6, 3), round(rng.random() * 0.6, 3)
        boxes.append({"label": rng.choice(LABELS), "score": round(0.3 + rng.random() * 0.7, 4),
                      "expert": EXPERTS[b % 2], "box": [x, y, round(x + 0.3, 3), round(y + 0.3, 3)]})
    alt = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} stock photo {i}"
    return {
        "image": {"bytes": blob, "path": f"{i:012d}.jpg"},
        "key": f"{i:024x}",
        "url": f"http://images.example.test/{i}.jpg",
        "text": alt,
        "width": width, "height": height,
        "category": CATEGORIES[i % len(CATEGORIES)],
        "caption": caption,
        "priors": {"tags": [{"label": n, "score": 0.5} for n in words[:2]], "boxes": boxes,
                   "ocr": [{"text": t, "score": 0.99, "box": [0.1, 0.1 + 0.2 * k, 0.9, 0.25 + 0.2 * k]}
                           for k, t in enumerate(ocr)],
                   "alt_text": alt, "failures": []},
        "caption_model": "synthetic", "prompt_version": "synthetic-v1",
        "caption_words": len(caption.split()),
    }


def schema() -> pa.Schema:
    from densefusion_hf.fusion.priors import PRIORS_TYPE

    return pa.schema([
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("key", pa.string()),
        ("url", pa.string()), ("text", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
        ("category", pa.string()), ("caption", pa.string()), ("priors", PRIORS_TYPE),
        ("caption_model", pa.string()), ("prompt_version", pa.string()), ("caption_words", pa.int32()),
    ])


def write_synthetic(folder: Path, rows: int, files: int | None = None, bad_rows: tuple[int, ...] = ()) -> Path:
    """Write ``rows`` synthetic rows under ``folder`` (its README.md and ``CONFIG/*.parquet``); rows in
    ``bad_rows`` get bytes that are not an image.  Returns ``folder``."""
    import datasets

    from densefusion_hf.stages.publish import parquet_writer

    folder = Path(folder)
    (folder / CONFIG).mkdir(parents=True, exist_ok=True)
    files = files or max(1, min(16, rows // 100_000))
    images = _images()
    target = schema()
    features = datasets.Features.from_arrow_schema(pa.schema([f for f in target if f.name != "image"]))
    all_features = datasets.Features({"image": datasets.Image(), **features})
    per_file = -(-rows // files)
    for index in range(files):
        start, stop = index * per_file, min(rows, (index + 1) * per_file)
        path = folder / CONFIG / f"train-{index:05d}-of-{files:05d}.parquet"
        with parquet_writer(path, all_features) as writer:
            for chunk in range(start, stop, 10_000):
                batch = [synthetic_row(i, images) for i in range(chunk, min(stop, chunk + 10_000))]
                for row in batch:
                    if int(row["key"], 16) in bad_rows:
                        row["image"]["bytes"] = b"this is not an image"
                writer.write_table(pa.Table.from_pylist(batch, schema=all_features.arrow_schema),
                                   row_group_size=ROW_GROUP)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: synthetic\n  data_files:\n  - split: train\n    path: synthetic/train-*\n"
        "---\n\n# Synthetic dataset\n\n"
        f"{rows:,} small rows written by `densefusion_hf.testing.synthetic` for benchmarks and tests.\n\n"
        "| field | what |\n|---|---|\n| caption | words from a small vocabulary |\n"
        "| priors | boxes of two experts, OCR lines on every fourth row |\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    write_synthetic(args.folder, args.rows)
    print(f"Wrote {args.rows:,} rows to {args.folder}")


if __name__ == "__main__":
    main()
