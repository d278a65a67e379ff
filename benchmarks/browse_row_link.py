"""Opening a row link of ``df-hf browse`` before its index is ready: the link with its row (``/row/KEY?at=ROW``,
what the gallery writes) against the same link without it (``/row/KEY``, typed by hand, or as every link was
before they carried the row), measured in the same run.

Data: a synthetic published dataset (``densefusion_hf.testing.synthetic``, row groups of 100 rows), ``--rows``
of them (default 100,000) in ``--files`` files, written to a temp folder. The app runs under uvicorn on
127.0.0.1 in this process with an index that is never started (as while a large one is built), so the row
groups the Source reads can be counted. Each link is opened ``--repeat`` times with the row-group cache
emptied before each, for rows near the start, the middle and the end; a read is one row group's small
columns or its image column.

    python benchmarks/browse_row_link.py [--rows 100000] [--files 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.request import urlopen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import uvicorn

    from densefusion_hf.browse.app import create_app
    from densefusion_hf.browse.index import Index
    from densefusion_hf.browse.server import bind
    from densefusion_hf.browse.source import open_source
    from densefusion_hf.testing.synthetic import write_synthetic

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        folder = write_synthetic(Path(scratch) / "synthetic", rows=args.rows, files=args.files)
        print(f"wrote {args.rows:,} rows in {args.files} files in {time.perf_counter() - started:.1f} s")
        source = open_source(str(folder), cache_dir=Path(scratch) / "cache")
        groups = sum(len(f.group_rows) for f in source.files)
        reads = []
        read = source._read

        def counted(path, group, columns):
            reads.append(group)
            return read(path, group, columns)

        source._read = counted
        sock = bind(0)
        server = uvicorn.Server(uvicorn.Config(create_app(source, Index(source)), log_level="warning",
                                               access_log=False, lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        print(f"{groups:,} row groups; index not ready")
        print(f"{'row':>10}  {'with at=ROW':>22}  {'without (scan)':>22}")
        try:
            for row in (50, args.rows // 2 + 50, args.rows - 50):
                key = source.rows([row])[0]["key"]
                figures = []
                for query in (f"?at={row}", ""):
                    seconds = []
                    for _ in range(args.repeat):
                        source._groups.clear()  # cold: nothing cached, the image column included
                        source._images.clear()
                        source._image_bytes_cached = 0
                        reads.clear()
                        begun = time.perf_counter()
                        with urlopen(f"{base}/row/{key}{query}", timeout=600) as response:
                            assert response.status == 200 and key.encode() in response.read()
                        seconds.append(time.perf_counter() - begun)
                    figures.append(f"{statistics.median(seconds) * 1000:8.1f} ms {len(reads):5d} reads")
                print(f"{row:>10,}  {figures[0]:>22}  {figures[1]:>22}")
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()


if __name__ == "__main__":
    main()
