"""The download guard: the address classifier on strings (no connection), the guarded opener against
loopback servers only, and one fetch build through img2dataset with every kind of refusal.

Every connection these tests make goes to 127.0.0.1 or ::1, even if the guard were broken: non-loopback
addresses appear only as data given to the classifier.
"""

import ipaddress
import struct
import threading
import urllib.error
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from densefusion_hf.errors import RecipeError
from densefusion_hf.netguard.addresses import AddressPolicy, address_kind, host_kind, parse_allowed, parse_ip
from densefusion_hf.netguard.opener import DownloadGuard, TooLarge, check_pixels, guarded_opener
from densefusion_hf.recipe import load_recipe
from densefusion_hf.runners.local import build
from densefusion_hf.stages.shards import StageDir
from tests.conftest import jpeg_bytes, write_metadata, write_recipe

# Classified as data only; never connected to.
REFUSED_HOSTS = {
    "127.0.0.1": "loopback", "127.1": "loopback", "2130706433": "loopback", "0x7f000001": "loopback",
    "0177.0.0.1": "loopback", "localhost": "loopback", "LocalHost.": "loopback", "api.localhost": "loopback",
    "[::1]": "loopback", "::ffff:127.0.0.1": "loopback", "[::ffff:7f00:1]": "loopback",
    "169.254.169.254": "link-local", "0xa9fea9fe": "link-local", "fe80::1%eth0": "link-local",
    "10.0.0.1": "private", "012.0.0.1": "private", "172.16.5.4": "private", "192.168.1.1": "private",
    "3232235777": "private", "::ffff:10.1.2.3": "private", "2002:a00:1::": "private",  # 6to4 of 10.0.0.1
    "64:ff9b::a9fe:a9fe": "link-local",  # NAT64 of the metadata address
    "fd00:ec2::254": "unique-local", "fc00::1": "unique-local",
    "224.0.0.1": "multicast", "ff02::1": "multicast",
    "0.0.0.0": "unspecified", "0": "unspecified", "::": "unspecified",
    "240.0.0.1": "reserved", "255.255.255.255": "reserved",
    "100.64.0.1": "not globally routable", "192.0.2.1": "private",
}
PUBLIC_HOSTS = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "134744072", "example.com",
                "images.densefusion-sample.test"]


@pytest.mark.parametrize("host,kind", sorted(REFUSED_HOSTS.items()))
def test_classifier_refuses_every_spelling_of_non_public_addresses(host, kind):
    assert host_kind(host) is not None
    assert host_kind(host).startswith(kind), host_kind(host)
    ip = parse_ip(host)
    if ip is not None:
        assert AddressPolicy().refusal(ip, 80).startswith(f"{ip} is {kind}")


@pytest.mark.parametrize("host", PUBLIC_HOSTS)
def test_classifier_admits_public_addresses_and_leaves_names_to_dns(host):
    assert host_kind(host) is None
    ip = parse_ip(host)
    if ip is not None:
        assert AddressPolicy().refusal(ip, 443) is None


def test_allow_list_admits_exactly_its_networks_and_endpoints():
    policy = AddressPolicy(allowed=("127.0.0.1:8080", "10.0.0.0/8", "[::1]:9000"))
    ip = ipaddress.ip_address
    assert policy.refusal(ip("127.0.0.1"), 8080) is None
    assert policy.refusal(ip("::ffff:127.0.0.1"), 8080) is None
    assert policy.refusal(ip("127.0.0.1"), 8081) == "127.0.0.1 is loopback"
    assert policy.refusal(ip("127.0.0.2"), 8080) is not None
    assert policy.refusal(ip("10.200.3.4"), 1) is None
    assert policy.refusal(ip("172.16.0.1"), 80) == "172.16.0.1 is private"
    assert policy.refusal(ip("::1"), 9000) is None and policy.refusal(ip("::1"), 9001) is not None
    assert AddressPolicy(allow_private=True).refusal(ip("169.254.169.254"), 80) is None
    for bad in ("localhost:80", "10.0.0.0/33", "127.0.0.1:0", "not an address"):
        with pytest.raises(ValueError, match="expected|needs an IP|port"):
            parse_allowed(bad)


def test_a_bad_allow_list_entry_is_a_recipe_error_naming_it(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"name": "x", "source": {"metadata": ["m.parquet"]},
                                              "fetch": {"allow_networks": ["10.0.0.0/8", "intranet:80"]}})
    with pytest.raises(RecipeError, match=r"fetch\.allow_networks\[1\].*IP address"):
        load_recipe(path)


# --- the opener, against loopback servers ---------------------------------------------------------

def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: a few KB that decode to ``width*height``."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


class _Handler(BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", path[len("/redirect/"):].replace("__", "://", 1))
            self.end_headers()
            return
        body = self.files.get(path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if path.startswith("/robots/"):
            self.send_header("X-Robots-Tag", "noai, noimageai")
        if path.startswith("/chunked/"):  # no Content-Length: the body's end is the connection's
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def servers():
    """Two loopback servers: the first is the one a test allows, the second stays refused."""
    photo = jpeg_bytes(__import__("numpy").full((64, 96, 3), 120, "uint8"))
    files = {"/photo.jpg": photo, "/big.bin": b"x" * 5000, "/chunked/big.bin": b"x" * 5000,
             "/bomb.png": png_bomb(20_000, 10_000), "/robots/photo.jpg": photo}
    handler = type("H", (_Handler,), {"files": files})
    started = []
    for _ in range(2):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
    yield [f"127.0.0.1:{h.server_address[1]}" for h in started], files
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def _open(guard, url):
    with guarded_opener(guard).open(url, timeout=5) as response:
        return response.read()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_loopback_refused_by_default_in_every_spelling(servers):
    (allowed, _), _files = servers
    port = allowed.split(":")[1]
    for host in ("127.0.0.1", "127.1", "2130706433", "0x7f000001", "localhost", "[::ffff:127.0.0.1]", "[::1]"):
        with pytest.raises(urllib.error.URLError, match=r"\[blocked_address\] .*loopback"):
            _open(DownloadGuard(), f"http://{host}:{port}/photo.jpg")
        with pytest.raises(urllib.error.URLError, match=r"\[blocked_address\]"):
            _open(DownloadGuard(), f"https://{host}:{port}/photo.jpg")  # refused before any TLS


def test_allowed_server_is_fetched_and_a_redirect_to_a_refused_one_is_not(servers):
    (allowed, refused), files = servers
    guard = DownloadGuard(AddressPolicy(allowed=(allowed,)))
    assert _open(guard, f"http://{allowed}/photo.jpg") == files["/photo.jpg"]
    assert _open(guard, f"http://{allowed}/redirect/http__{allowed}/photo.jpg") == files["/photo.jpg"]
    with pytest.raises(urllib.error.URLError, match=rf"\[blocked_address\] 127.0.0.1 is loopback.*port {refused.split(':')[1]}"):
        _open(guard, f"http://{allowed}/redirect/http__{refused}/photo.jpg")
    with pytest.raises(urllib.error.URLError, match=r"\[blocked_address\] .*loopback"):
        _open(guard, f"http://{allowed}/redirect/http__localhost:{refused.split(':')[1]}/photo.jpg")


def test_other_schemes_are_refused_also_as_redirect_targets(servers, tmp_path):
    (allowed, _), _files = servers
    secret = tmp_path / "secret.txt"
    secret.write_text("private bytes")
    guard = DownloadGuard(AddressPolicy(allowed=(allowed,)))
    for url in (secret.as_uri(), "data:text/plain,hello", "ftp://127.0.0.1/x"):
        with pytest.raises(OSError, match=r"\[blocked_address\] scheme \w+:// is not allowed"):
            _open(guard, url)
    with pytest.raises(OSError, match=r"blocked_address|HTTP Error 30"):
        _open(guard, f"http://{allowed}/redirect/{secret.as_uri().replace('://', '__', 1)}")


def test_size_limits_refuse_before_reading_or_decoding(servers):
    (allowed, _), files = servers
    policy = AddressPolicy(allowed=(allowed,))
    with pytest.raises(TooLarge, match=r"5000 bytes \(Content-Length\) > fetch.max_bytes 4096"):
        _open(DownloadGuard(policy, max_bytes=4096), f"http://{allowed}/big.bin")
    with pytest.raises(TooLarge, match=r"more than 4096 bytes"):
        _open(DownloadGuard(policy, max_bytes=4096), f"http://{allowed}/chunked/big.bin")
    assert _open(DownloadGuard(policy, max_bytes=5000), f"http://{allowed}/chunked/big.bin") == b"x" * 5000
    with pytest.raises(TooLarge, match=r"200000000 pixels.*fetch.max_pixels 178956970"):
        _open(DownloadGuard(policy, max_pixels=178_956_970), f"http://{allowed}/bomb.png")
    with pytest.raises(TooLarge, match=r"2000x1000 = 2000000 pixels > fetch.max_pixels 1000000"):
        check_pixels(png_bomb(2000, 1000), 1_000_000)
    check_pixels(files["/photo.jpg"], 96 * 64)  # exactly at the limit passes


# --- one build through img2dataset ----------------------------------------------------------------

def test_fetch_records_every_refusal_with_its_address_and_honours_x_robots_tag(tmp_path, servers, monkeypatch):
    (allowed, refused), _files = servers
    monkeypatch.delenv("DENSEFUSION_ALLOW_NETWORKS", raising=False)
    local_file = tmp_path / "private.jpg"
    local_file.write_bytes(jpeg_bytes(__import__("numpy").zeros((32, 32, 3), "uint8")))
    rport = refused.split(":")[1]
    cases = {
        f"http://{allowed}/photo.jpg": None,
        f"http://{refused}/photo.jpg": ("blocked_address", f"127.0.0.1 is loopback (host 127.0.0.1, port {rport})"),
        f"http://0x7f000001:{rport}/photo.jpg": ("blocked_address", "127.0.0.1 is loopback"),
        f"http://[::1]:{rport}/photo.jpg": ("blocked_address", "::1 is loopback"),
        f"http://{allowed}/redirect/http__localhost:{rport}/photo.jpg": ("blocked_address", "is loopback"),
        local_file.as_uri(): ("blocked_address", "scheme file:// is not allowed"),
        f"http://{allowed}/bomb.png": ("too_large", "200000000 pixels"),
        f"http://{allowed}/robots/photo.jpg": ("disallowed_by_header", "X-Robots-Tag"),
    }
    write_metadata(tmp_path / "meta" / "part-0.parquet", [{"URL": u} for u in cases])
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", {
        "name": "guard-test", "stages": ["ingest", "fetch"],
        "source": {"metadata": ["meta/*.parquet"], "rows_per_shard": 10},
        "fetch": {"timeout": 5, "threads": 4, "allow_networks": [allowed]},
    }))
    build(recipe, tmp_path / "work", show_progress=False)
    out = StageDir(tmp_path / "work", "fetch")
    kept = [r["url"] for s in out.done_shards() for r in out.read(s).to_pylist()]
    assert kept == [f"http://{allowed}/photo.jpg"]
    drops = {r["url"]: r for r in out.read_dropped().to_pylist()}
    assert set(drops) == {u for u, want in cases.items() if want}
    for url, want in cases.items():
        if want:
            assert drops[url]["reason"] == want[0], drops[url]
            assert want[1] in drops[url]["detail"], drops[url]
