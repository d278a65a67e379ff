"""A urllib opener for untrusted URLs: http(s) only, every connection checked, bodies bounded.

The check sits where the socket is made (``HTTPConnection._create_connection``): the host is resolved
once, each answer is judged by ``AddressPolicy``, and the socket connects to the very address that was
judged, so a DNS answer that changes between check and use (rebinding) gets nowhere.  Redirects make a
new connection and so are checked again; through a proxy, the proxy's address is the one judged.
"""

from __future__ import annotations

import http.client
import io
import socket
import urllib.request
import warnings
from dataclasses import dataclass, field

from densefusion_hf.netguard.addresses import AddressPolicy, BlockedAddress, parse_ip


class TooLarge(OSError):
    """A body over ``max_bytes`` or an image over ``max_pixels``, refused before it is decoded."""

    marker = "too_large"

    def __str__(self) -> str:
        return f"[{self.marker}] {self.args[0]}"


@dataclass(frozen=True)
class DownloadGuard:
    """Everything a download process needs to know; picklable, for img2dataset's spawned workers."""

    policy: AddressPolicy = field(default_factory=AddressPolicy)
    max_bytes: int | None = None
    max_pixels: int | None = None


def guarded_create_connection(policy: AddressPolicy):
    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **_):
        host, port = address
        refusals, last_error = [], None
        for family, kind, proto, _name, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            ip = parse_ip(sockaddr[0])
            refusal = policy.refusal(ip, port) if ip is not None else f"{sockaddr[0]} is not an IP address"
            if refusal:
                refusals.append(refusal)
                continue
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)  # the address just judged, not a second lookup
                return sock
            except OSError as exc:
                sock.close()
                last_error = exc
        if last_error is not None:
            raise last_error
        raise BlockedAddress(f"{'; '.join(dict.fromkeys(refusals))} (host {host}, port {port})")
    return create_connection


def _connection_class(base, policy: AddressPolicy):
    class Guarded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = guarded_create_connection(policy)
    return Guarded


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy):
        super().__init__()
        self._connection = _connection_class(http.client.HTTPConnection, policy)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy):
        super().__init__()
        self._connection = _connection_class(http.client.HTTPSConnection, policy)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


class _RefuseOtherSchemes(urllib.request.BaseHandler):
    """file://, ftp://, data: and the rest (also as redirect targets) never reach a handler."""

    def unknown_open(self, req):
        raise BlockedAddress(f"scheme {req.type}:// is not allowed (only http and https): {req.full_url[:200]}")


class _BoundedBody(urllib.request.BaseHandler):
    handler_order = 900  # after the error processor, on successful responses only

    def __init__(self, max_bytes, max_pixels):
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    def http_response(self, request, response):
        length = response.headers.get("Content-Length", "")
        if self.max_bytes is not None and length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise TooLarge(f"{int(length)} bytes (Content-Length) > fetch.max_bytes {self.max_bytes}")
        read = response.read

        def bounded_read(amt=None):
            limit = self.max_bytes
            data = read() if limit is None or amt is not None else read(limit + 1)
            if limit is not None and amt is None and len(data) > limit:
                raise TooLarge(f"more than {limit} bytes > fetch.max_bytes {limit}")
            check_pixels(data, self.max_pixels)
            return data

        response.read = bounded_read
        return response

    https_response = http_response


def check_pixels(data: bytes, max_pixels: int | None) -> None:
    """Raise TooLarge when ``data``'s header declares more than ``max_pixels``; only the header is read."""
    if max_pixels is None:
        return
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError as exc:  # over twice Pillow's limit: it refuses to give the size
        raise TooLarge(f"{exc} (fetch.max_pixels {max_pixels})") from None
    except Exception:  # not an image: fetch's decoding check says so
        return
    if width * height > max_pixels:
        raise TooLarge(f"{width}x{height} = {width * height} pixels > fetch.max_pixels {max_pixels}")


def guarded_opener(guard: DownloadGuard) -> urllib.request.OpenerDirector:
    """An opener with only the handlers a download needs (no FileHandler, no FTPHandler, no DataHandler)."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), _HTTPHandler(guard.policy), _HTTPSHandler(guard.policy),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPErrorProcessor(), _BoundedBody(guard.max_bytes, guard.max_pixels),
                    _RefuseOtherSchemes()):
        opener.add_handler(handler)
    return opener
