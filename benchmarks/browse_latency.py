"""Time to the first page and to a filtered page of ``df-hf browse`` against ``datasets.load_dataset`` on the
same rows, measured in the same run.

Data: a synthetic published dataset (``densefusion_hf.testing.synthetic``: the layout ``df-hf build``
publishes, small JPEGs embedded, row groups of 100 rows, priors with boxes and OCR lines), ``--rows`` of them
(default 1,000,000), written to a temp folder unless ``--folder`` names one already written.

Ours: ``df-hf browse FOLDER`` started in a child process with an empty cache folder; the clock starts before the
process does.  A page is its HTML plus its 48 thumbnails, fetched 6 at a time as a browser does.

- first page: process start -> the first gallery page and its thumbnails (only the row groups it needs are read);
- index: the background build of the SQLite FTS5 index (once per dataset version, then cached);
- filtered page: a page with a search word, a category and a caption-length filter, once the index is there;
- restart: a second ``df-hf browse`` with that cache: process start -> the same filtered page.

Baseline, in a child process of its own (import included): ``datasets.load_dataset(FOLDER, CONFIG)`` (it
converts every row to its Arrow cache first), the first 48 rows with their images decoded and thumbnailed,
then ``Dataset.filter`` with the same conditions and the first 48 matches; and ``streaming=True``, where the
first page comes at once but a filtered page means reading rows until 48 match.

    python benchmarks/browse_latency.py [--rows 1000000] [--folder DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.request import urlopen

from densefusion_hf.testing.synthetic import CONFIG, write_synthetic

REPO = Path(__file__).resolve().parents[1]
FILTER = {"q": "bicycle", "category": "vehicles", "min_words": "12"}   # the filtered page, ours and baseline


def _get(url: str) -> bytes:
    with urlopen(url, timeout=600) as response:
        return response.read()


def _page(base: str, query: str) -> tuple[float, int]:
    """Seconds for one gallery page and its thumbnails (6 at a time), and the rows it reported."""
    started = time.perf_counter()
    html = _get(base + "rows" + query).decode()
    thumbs = re.findall(r'src="(/thumb/\d+)"', html)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda src: _get(base.rstrip("/") + src), thumbs))
    total = int(re.search(r'id="match-count" data-total="(\d+)"', html).group(1))
    return time.perf_counter() - started, total


class Browse:
    def __init__(self, folder: Path, cache: Path):
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "densefusion_hf", "browse", str(folder), "--cache-dir",
                                         str(cache)], cwd=REPO, text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for line in self.process.stdout:
            found = re.search(r"Serving on (http://127\.0\.0\.1:\d+/)", line)
            if found:
                self.url = found.group(1)
                self.serving = time.perf_counter() - self.started
                return
        raise SystemExit("df-hf browse did not start: " + self.process.stdout.read())

    def wait_index(self) -> dict:
        while True:
            status = json.loads(_get(self.url + "api/status"))
            if status["ready"]:
                if status["error"]:
                    raise SystemExit(f"index failed: {status['error']}")
                return status
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(2)
        self.process.communicate(timeout=60)


BASELINE = textwrap.dedent(r'''
    import io, json, re, sys, time
    started = time.perf_counter()
    import datasets
    from PIL import Image
    folder, config, cache, q, category, min_words = sys.argv[1:7]
    min_words = int(min_words)
    word = re.compile(r"(?<![^\W_])" + re.escape(q) + r"(?![^\W_])", re.IGNORECASE)

    def thumbs(rows):
        for row in rows:
            image = row["image"]
            image.draft("RGB", (320, 320))
            image = image.convert("RGB")
            image.thumbnail((320, 320))
            image.save(io.BytesIO(), format="JPEG", quality=82)

    def keep(caption, text, priors, cat, words):
        return (cat == category and words >= min_words and
                (word.search(caption or "") or word.search(priors["alt_text"] or text or "")
                 or any(word.search(line["text"] or "") for line in priors["ocr"])))

    out = {}
    ds = datasets.load_dataset(folder, config, split="train", cache_dir=cache)
    out["load_dataset"] = time.perf_counter() - started
    thumbs(ds.select(range(48)))
    out["first_page"] = time.perf_counter() - started
    t = time.perf_counter()
    columns = ["caption", "text", "priors", "category", "caption_words"]
    matched = ds.filter(lambda c, x, p, k, w: [bool(keep(*v)) for v in zip(c, x, p, k, w)], batched=True,
                        batch_size=10_000, input_columns=columns)
    thumbs(matched.select(range(min(48, len(matched)))))
    out["filtered_page"] = time.perf_counter() - t
    out["filtered_rows"] = len(matched)

    t = time.perf_counter()
    stream = datasets.load_dataset(folder, config, split="train", streaming=True)
    thumbs(stream.take(48))
    out["stream_first_page"] = time.perf_counter() - t
    t = time.perf_counter()
    found = []
    for row in stream:
        if keep(row["caption"], row["text"], row["priors"], row["category"], row["caption_words"]):
            found.append(row)
            if len(found) == 48:
                break
    thumbs(found)
    out["stream_filtered_page"] = time.perf_counter() - t
    print(json.dumps(out))
''')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--folder", type=Path, default=None, help="a synthetic dataset already written")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (dataset, caches)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="browse-latency-"))
    try:
        folder = args.folder
        if folder is None or not (folder / "README.md").exists():
            folder = folder or scratch / "dataset"
            started = time.perf_counter()
            write_synthetic(folder, args.rows)
            print(f"wrote {args.rows:,} synthetic rows in {time.perf_counter() - started:.1f} s to {folder}")
        size = sum(p.stat().st_size for p in folder.rglob("*.parquet"))
        print(f"dataset: {folder} ({size / 1e6:,.0f} MB of Parquet), {os.cpu_count()} cores")
        query = "?" + "&".join(f"{k}={v}" for k, v in FILTER.items())

        ours = {}
        server = Browse(folder, scratch / "cache")
        page_seconds, rows = _page(server.url, "")
        ours["first_page"] = time.perf_counter() - server.started
        ours["serving"] = server.serving
        ours["first_page_request"] = page_seconds
        ours["deep_page_request"], _ = _page(server.url, f"?page={rows // 48}")
        status = server.wait_index()
        ours["index"] = status["seconds"]
        ours["filtered_page"], ours["filtered_rows"] = _page(server.url, query)
        ours["filtered_page_next"], _ = _page(server.url, query + "&page=2")
        ours["filtered_page_again"], _ = _page(server.url, "?label=dog&expert=open_set&min_side=64")
        server.stop()
        index_mb = sum(p.stat().st_size for p in (scratch / "cache").glob("*.sqlite")) / 1e6
        again = Browse(folder, scratch / "cache")
        again.wait_index()
        _page(again.url, query)
        ours["restart_filtered_page"] = time.perf_counter() - again.started
        again.stop()

        result = subprocess.run([sys.executable, "-c", BASELINE, str(folder), CONFIG, str(scratch / "hf-cache"),
                                 FILTER["q"], FILTER["category"], FILTER["min_words"]], capture_output=True, text=True,
                                cwd=REPO)
        if result.returncode:
            raise SystemExit(result.stderr)
        base = json.loads(result.stdout.strip().splitlines()[-1])
        if base["filtered_rows"] != ours["filtered_rows"]:
            raise SystemExit(f"the filtered pages disagree: {ours['filtered_rows']} rows (ours) vs "
                             f"{base['filtered_rows']} (datasets)")

        print(f"\n{rows:,} rows; the filtered page ({query}) matches {ours['filtered_rows']:,} rows in both\n")
        print(f"{'':44s}{'df-hf browse':>14s}{'load_dataset':>14s}{'streaming':>12s}")
        print(f"{'first page (process start -> 48 thumbnails)':44s}{ours['first_page']:>13.2f}s"
              f"{base['first_page']:>13.2f}s{base['stream_first_page']:>11.2f}s")
        print(f"{'filtered page (index / Arrow cache ready)':44s}{ours['filtered_page']:>13.2f}s"
              f"{base['filtered_page']:>13.2f}s{base['stream_filtered_page']:>11.2f}s")
        print(f"{'one-off preparation':44s}{ours['index']:>13.2f}s{base['load_dataset']:>13.2f}s{'-':>12s}")
        print(f"\nours, more: serving {ours['serving']:.2f} s after the process started, the first page request "
              f"then {ours['first_page_request']:.3f} s, the last page "
              f"{ours['deep_page_request']:.3f} s, the filtered page's next page {ours['filtered_page_next']:.3f} s, "
              f"another filtered page {ours['filtered_page_again']:.3f} s, "
              f"a restart with the cached index to the filtered page {ours['restart_filtered_page']:.2f} s; "
              f"index {index_mb:,.0f} MB")
        print(f"speed-up, first page: {base['first_page'] / ours['first_page']:.1f}x vs load_dataset; "
              f"filtered page: {base['filtered_page'] / ours['filtered_page']:.0f}x vs Dataset.filter, "
              f"{base['stream_filtered_page'] / ours['filtered_page']:.0f}x vs streaming")
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
