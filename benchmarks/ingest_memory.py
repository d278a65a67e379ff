"""Peak memory of ingest over many metadata rows: repeated URLs found per key range, not in one Python set.

Writes ROWS synthetic LAION-style metadata rows (1% repeated URLs) in 10 Parquet files, runs `df-hf build
--only ingest` on them and reports its peak resident memory and time, beside the baseline: a Python set of
the same rows' keys, which is what finding repeats in one pass would hold (measured in its own process).
Nothing is downloaded (the URLs use a reserved name that is never resolved).

    python benchmarks/ingest_memory.py                 # 20M rows: the target is a peak under 4 GiB
    python benchmarks/ingest_memory.py --rows 2000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_scale import REPO, measured  # noqa: E402


def write_metadata(folder: Path, rows: int, files: int = 10) -> list[Path]:
    paths, per_file = [], -(-rows // files)
    for f in range(files):
        start, stop = f * per_file, min(rows, (f + 1) * per_file)
        ids = np.arange(start, stop)
        ids = np.where(ids % 100 == 99, ids // 2, ids)  # 1% repeat an earlier URL
        urls = pc.binary_join_element_wise("http://images.invalid/", pa.array(ids).cast(pa.string()), ".jpg", "")
        n = stop - start
        table = pa.table({"URL": urls, "TEXT": pa.array(["a photo"] * n), "WIDTH": np.full(n, 512.0),
                          "HEIGHT": np.full(n, 512.0), "similarity": np.full(n, 0.3), "punsafe": np.full(n, 0.01),
                          "pwatermark": np.full(n, 0.02)})
        path = folder / f"part-{f:02d}.parquet"
        pq.write_table(table, path, row_group_size=100_000)
        paths.append(path)
    return paths


BASELINE = """
import sys, pyarrow.parquet as pq
from densefusion_hf.keys import url_key
seen = set()
for path in sys.argv[1:]:
    for batch in pq.ParquetFile(path).iter_batches(columns=["URL"], batch_size=100_000):
        seen.update(url_key(u.strip()) for u in batch.column(0).to_pylist())
print(len(seen))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--rows-per-shard", type=int, default=100_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ingest-memory-"))
    try:
        files = write_metadata(folder, args.rows)
        recipe = folder / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"name": "ingest-memory", "stages": ["ingest", "fetch"],
                                          "source": {"metadata": [str(f) for f in files],
                                                     "rows_per_shard": args.rows_per_shard}}))
        seconds, peak = measured([sys.executable, "-m", "densefusion_hf", "build", str(recipe), "--workdir",
                                  str(folder / "work"), "--only", "ingest", "--no-progress"], REPO)
        base_seconds, base_peak = measured([sys.executable, "-c", BASELINE, *map(str, files)], REPO)
        print(f"machine: {os.cpu_count()} cores; {args.rows:,} metadata rows, 1% repeated URLs")
        print(f"ingest (per key range):  {seconds:8.1f} s   peak {peak / 2**30:6.2f} GiB   "
              f"({peak / args.rows:.0f} bytes a row)")
        print(f"baseline (one key set):  {base_seconds:8.1f} s   peak {base_peak / 2**30:6.2f} GiB   "
              f"({base_peak / args.rows:.0f} bytes a row; the key set alone, before any row is written)")
        print("target: ingest's peak under 4 GiB at 20M rows, and flat as the rows grow")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
