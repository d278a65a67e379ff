"""`df-hf browse`'s row links while the index is not ready, as plain HTTP against the app served by uvicorn on
127.0.0.1 in this process (so the Source's row-group reads can be counted)."""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from urllib.request import urlopen

import pytest

ROWS, FILES = 1_000, 2  # 10 row groups of 100 rows


@contextmanager
def serving(source, index):
    """The browse app for ``source``/``index`` on a free loopback port; yields its address."""
    import uvicorn

    from densefusion_hf.browse.app import create_app
    from densefusion_hf.browse.server import bind

    sock = bind(0)
    server = uvicorn.Server(uvicorn.Config(create_app(source, index), log_level="warning", access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def get(url: str) -> tuple[int, str]:
    with urlopen(url, timeout=30) as response:
        return response.status, response.read().decode()


@pytest.fixture
def unindexed(tmp_path):
    """A published folder of many row groups, its Source with every row-group read recorded, and an Index
    that is not ready (as while it is built in the background)."""
    from densefusion_hf.browse.index import Index
    from densefusion_hf.browse.source import open_source
    from densefusion_hf.testing.synthetic import write_synthetic

    folder = write_synthetic(tmp_path / "synthetic", rows=ROWS, files=FILES)
    source = open_source(str(folder), cache_dir=tmp_path / "cache")
    assert sum(len(f.group_rows) for f in source.files) == 10
    reads = []
    read = source._read

    def counted(path, group, columns):  # the one reader every row, key and image goes through
        reads.append((path.rsplit("/", 1)[-1], group, tuple(columns)))
        return read(path, group, columns)

    source._read = counted
    index = Index(source)  # never started: not ready
    with serving(source, index) as url:
        yield source, url, reads


def small_column_groups(reads) -> set[tuple[str, int]]:
    return {(name, group) for name, group, columns in reads if columns != ("image",)}


def test_a_row_link_opened_before_the_index_is_ready_reads_one_row_group(unindexed):
    source, url, reads = unindexed
    row = 950  # in the last row group of the last file, the middle of it
    status, page = get(f"{url}/rows?page={row // 48 + 1}")
    assert status == 200
    link = re.search(rf'data-row="{row}">\s*<a href="([^"]+)"', page).group(1).replace("&amp;", "&")
    data, group, _ = source.locate(row)
    reads.clear()
    source._groups.clear()  # nothing cached from the gallery: the link alone decides what is read
    status, page = get(url + link)
    key = source.rows([row])[0]["key"]
    assert status == 200 and f'id="row-key">{key}<' in page
    assert small_column_groups(reads) == {(data.name, group)}, reads
    assert f"row <b>{row + 1:,}</b> of {ROWS:,}" in page
    # its prev/next links name their rows too
    for neighbour in (row - 1, row + 1):
        reads.clear()
        source._groups.clear()
        found = re.search(rf'href="(/row/{source.rows([neighbour])[0]["key"]}\?[^"]+)"', page).group(1)
        assert get(url + found.replace("&amp;", "&"))[0] == 200
        assert small_column_groups(reads) == {(data.name, group)}, reads


def test_a_row_link_with_a_wrong_or_no_row_still_opens_its_row(unindexed):
    source, url, reads = unindexed
    key = source.rows([420])[0]["key"]
    for query in ("?at=7", "?at=99999", "?at=x", ""):  # a stale link, one past the end, nonsense, a typed one
        status, page = get(f"{url}/row/{key}{query}")
        assert status == 200 and f'id="row-key">{key}<' in page and "row <b>421</b>" in page, query
    with pytest.raises(Exception, match="404"):
        get(f"{url}/row/{'f' * 24}?at=3")
