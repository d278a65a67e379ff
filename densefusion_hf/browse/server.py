"""Serving the page: uvicorn on 127.0.0.1 (a free port unless one is asked for), the address printed, a clean
stop on Ctrl-C."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

from densefusion_hf.errors import UserError

#: A dataset this small is indexed before the server answers (it takes well under a second); a larger one is
#: indexed in the background while the plain gallery is already served.
INDEX_FIRST_ROWS = 50_000
INDEX_HEAD_START = 5.0


def _imports():
    try:
        import markdown_it  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UserError(f"df-hf browse needs its web dependencies ({exc.name} is missing): "
                        f"pip install 'densefusion-hf[browse]'") from None
    return uvicorn


def bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:``port`` (0: any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); pass another --port, or none "
                        f"for a free one.") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(path: str, *, port: int = 0, open_browser: bool = False, config: str | None = None,
          revision: str | None = None, cache_dir: Path | None = None, echo=print) -> None:
    """Run ``df-hf browse`` until interrupted."""
    uvicorn = _imports()
    from densefusion_hf.browse.app import create_app
    from densefusion_hf.browse.index import Index
    from densefusion_hf.browse.source import open_source

    started = time.monotonic()
    source = open_source(path, config=config, revision=revision, cache_dir=cache_dir)
    index = Index(source).start()
    if source.num_rows <= INDEX_FIRST_ROWS:
        index.wait(INDEX_HEAD_START)
    app = create_app(source, index)
    sock = bind(port)
    address = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=2))
    echo(f"Browsing {source.describe()}.")
    if not index.ready.is_set():
        echo(f"Indexing the rows for filters and search in the background (cached in {source.cache_dir}); the "
             f"gallery works meanwhile.")
    elif index.error:
        echo(f"Filters and search are unavailable: {index.error}")
    echo(f"Serving on {address}  (Ctrl-C to stop; ready in {time.monotonic() - started:.1f} s)")
    sys.stdout.flush()
    if open_browser:
        import webbrowser

        threading.Timer(0.3, webbrowser.open, args=(address,)).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    echo("Stopped.")
