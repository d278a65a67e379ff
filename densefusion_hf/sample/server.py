"""A loopback HTTP server for the embedded sample, reached as an HTTP proxy.

The sample's URLs name a host under the reserved ``.test`` domain, so they are the same in every run
(and so are the row keys derived from them), while the bytes come from a server on 127.0.0.1 with a
port chosen by the system.  Downloaders that honour ``http_proxy`` (urllib, so img2dataset) send
their requests to that server, which answers from the sample folder by URL path.
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

SAMPLE_HOST = "images.densefusion-sample.test"

_PROXY_VARS = ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY")


class _Handler(BaseHTTPRequestHandler):
    root: Path

    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = self._body()
        if body is None:
            self.send_error(404, "Not Found")
            return
        ctype = mimetypes.guess_type(self.path)[0] or "application/octet-stream"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes | None:
        # A proxied request carries the absolute URL; a direct one only the path.
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        target = (self.root / rel).resolve()
        if self.root not in target.parents or not target.is_file():
            return None
        return target.read_bytes()

    def log_message(self, format, *args):  # keep the build's output readable
        pass


class SampleServer:
    """Serve ``root`` on 127.0.0.1 in a background thread; use as a context manager."""

    def __init__(self, root: Path):
        handler = type("SampleHandler", (_Handler,), {"root": Path(root).resolve()})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="sample-server", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "SampleServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def proxied_through(server: SampleServer):
    """Route plain-HTTP downloads of this process and its children through ``server``."""
    saved = {name: os.environ.get(name) for name in _PROXY_VARS}
    os.environ["http_proxy"] = os.environ["HTTP_PROXY"] = server.address
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = ""
    # urlopen caches the opener it first builds, with the proxy settings of that moment: drop it on
    # the way in and out so this process's urllib reads the variables set here.
    urllib.request.install_opener(None)
    try:
        yield
    finally:
        urllib.request.install_opener(None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
