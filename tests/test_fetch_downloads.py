"""fetch reads img2dataset's output a row group at a time: the right bytes per key, never a whole shard in memory."""

import os
import random

import pyarrow as pa
import pytest
from img2dataset.writer import BufferedParquetWriter

from densefusion_hf.errors import UserError
from densefusion_hf.stages.downloads import DownloadedRows, check_complete

SCHEMA = pa.schema([("row_key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                    ("original_width", pa.int64()), ("original_height", pa.int64()), ("jpg", pa.binary())])
IMAGE_BYTES = 40_000


def _write_parts(folder, keys, parts=3):
    """img2dataset's layout: one Parquet per part, rows in the order downloads finished, 100 rows a row group."""
    folder.mkdir()
    rng = random.Random(0)
    size = -(-len(keys) // parts)
    expected = {}
    for p in range(parts):
        chunk = keys[p * size:(p + 1) * size]
        # downloads finish out of order, but close to their place in the input (a few threads at a time)
        order = sorted(chunk, key=lambda k: keys.index(k) + rng.uniform(0, 40))
        writer = BufferedParquetWriter(str(folder / f"{p:05d}.parquet"), SCHEMA, 100)
        for key in order:
            body = os.urandom(IMAGE_BYTES) if not key.endswith("7") else None
            row = {"row_key": key, "status": "success" if body else "failed_to_download",
                   "error_message": None if body else "404", "original_width": 10, "original_height": 20,
                   "jpg": body}
            writer.write(row)
            expected[key] = row
        writer.close()
        (folder / f"{p:05d}_stats.json").write_text("{}")
    return expected


def test_rows_come_back_by_key_with_a_bounded_batch_in_memory(tmp_path):
    keys = [f"k{i:05d}" for i in range(4200)]
    expected = _write_parts(tmp_path / "parts", keys)
    total = IMAGE_BYTES * len(keys)
    baseline = pa.total_allocated_bytes()
    peak = 0
    seen = {}
    with DownloadedRows(tmp_path / "parts") as results:
        assert len(results) == len(keys)
        asked = keys + ["not-downloaded"]
        for start in range(0, len(asked), 256):
            found = results.results(asked[start:start + 256])
            peak = max(peak, pa.total_allocated_bytes() - baseline)
            seen.update(found)
    assert "not-downloaded" not in seen and set(seen) == set(keys)
    for key, row in expected.items():
        assert seen[key]["image"] == row["jpg"] and seen[key]["status"] == row["status"]
    # a few row groups of 100 images, not the 168 MB of the shard
    assert peak < 8 * 100 * IMAGE_BYTES < total / 5, (peak, total)


def test_a_part_img2dataset_did_not_finish_stops_the_shard(tmp_path):
    _write_parts(tmp_path / "parts", [f"k{i}" for i in range(30)], parts=3)
    (tmp_path / "parts" / "00001_stats.json").unlink()
    log = tmp_path / "shard.log"
    log.write_text("shard 1 failed with error Connection reset\n")
    check_complete(tmp_path / "parts", 1, log)  # a shard of one part: nothing missing
    if os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize < 64 * 2**20:
        pytest.skip("this disk is nearly full, which reads as the full-disk case")
    with pytest.raises(UserError, match=r"did not finish 1 of its 3 parts .*\[1\].*shard.log"):
        check_complete(tmp_path / "parts", 3, log)
    log.write_text("OSError: [Errno 28] No space left on device\n")
    with pytest.raises(OSError, match="No space left"):
        check_complete(tmp_path / "parts", 3, log)
