"""`df-hf browse` on a work directory whose build is still running, as plain HTTP against the server: shards
finishing after the server started show on the next page loads."""

from __future__ import annotations

import re
import time

import pyarrow as pa
import pytest

from tests.test_browse import start_browse


def finish_fetch_shard(workdir, shard: int, rows: range, reasons: list[str]) -> list[str]:
    """Commit fetch's shard ``shard`` as the stage does (rows, dropped rows, stats, done marker last), with
    the synthetic rows ``rows`` kept and one dropped row per reason; the dropped keys."""
    from densefusion_hf.stages.shards import StageDir, shard_name
    from densefusion_hf.testing import synthetic

    stage = StageDir(workdir, "fetch")
    stage.prepare()
    name = shard_name(shard)
    images = synthetic._images()
    table = pa.Table.from_pylist([synthetic.synthetic_row(i, images) for i in rows], schema=synthetic.schema())
    with stage.writer(name, table.schema) as writer:
        writer.write(table)
    dropped = [{"key": f"{10_000 * (shard + 1) + n:024x}", "url": f"http://images.example.test/gone-{shard}-{n}",
                "reason": reason, "detail": "test", "dup_of": None} for n, reason in enumerate(reasons)]
    stage.finish(name, dropped, {"rows_in": len(rows) + len(reasons), "rows_out": len(rows)})
    return [d["key"] for d in dropped]


@pytest.fixture
def running_build(tmp_path):
    """A work directory whose fetch has finished one shard of two."""
    from densefusion_hf.runners.manifest import Manifest

    workdir = tmp_path / "work"
    Manifest(workdir).record("fetch", {}, "fingerprint-of-the-test")
    first = finish_fetch_shard(workdir, 0, range(0, 10), ["http_error", "http_error"])
    return workdir, first


def page_of(served, path: str) -> str:
    status, _, body = served.get(path)
    assert status == 200
    return body.decode()


def total(page: str) -> int:
    return int(re.search(r'id="match-count" data-total="(\d+)"', page).group(1))


def dropped_keys(page: str) -> list[str]:
    return re.findall(r'class="drop[^"]*" data-key="([0-9a-f]+)"', page)


def test_rows_and_drops_of_shards_finished_after_the_start_are_shown(running_build):
    workdir, first = running_build
    served = start_browse(str(workdir))
    try:
        assert total(page_of(served, "/rows")) == 10
        assert dropped_keys(page_of(served, "/dropped?stage=fetch&reason=http_error")) == first
        second = finish_fetch_shard(workdir, 1, range(10, 25), ["http_error", "timeout"])
        deadline = time.monotonic() + 30
        while total(page_of(served, "/rows")) != 25:  # looked at once a second, rebuilt lazily
            assert time.monotonic() < deadline, "the rows of the shard finished later never showed"
            time.sleep(0.3)
        page = page_of(served, "/rows?page=1&per_page=100")
        assert re.findall(r'data-row="(\d+)"', page) == [str(i) for i in range(25)]
        assert dropped_keys(page_of(served, "/dropped?stage=fetch&reason=http_error")) == first + second[:1]
        assert dropped_keys(page_of(served, "/dropped?stage=fetch&reason=timeout")) == second[1:]
        overview = page_of(served, "/")
        counts = re.search(r'<tr data-stage="fetch">.*?</tr>', overview, re.S).group(0)
        assert re.findall(r'<td class="num">(?:<a [^>]*>)?([\d,]+)', counts) == ["29", "25", "4"]
        assert total(page_of(served, "/rows?q=photo")) == 25  # the search index holds the new rows too
        key = f"{20:024x}"
        assert f'id="row-key">{key}<' in page_of(served, f"/row/{key}?at=20")
    finally:
        code, output = served.stop()
    assert code == 0 and "Traceback" not in output, output
    # the index of the first state was replaced, not kept beside the new one
    assert len(list((workdir / "browse-cache").glob("index-*.sqlite"))) == 1
