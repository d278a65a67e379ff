"""Removal requests: URLs and keys dropped at ingest, image SHA-256s after fetch, recorded as removal_request."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densefusion_hf.errors import UserError
from densefusion_hf.keys import url_key
from densefusion_hf.netguard.addresses import ALLOW_ENV
from densefusion_hf.recipe import load_recipe
from densefusion_hf.runners.local import build
from densefusion_hf.stages.removal import load_removals
from densefusion_hf.stages.shards import StageDir
from tests.conftest import write_metadata, write_recipe

URLS = [f"http://images.example/{i}.jpg" for i in range(8)]


def _recipe(tmp_path, exclude, stages=("ingest",), urls=URLS, fetch=None):
    write_metadata(tmp_path / "meta.parquet", [{"URL": u} for u in urls])
    body = {"name": "removal", "stages": list(stages),
            "source": {"metadata": ["meta.parquet"], "rows_per_shard": 3, "exclude": exclude}}
    if fetch:
        body["fetch"] = fetch
    return load_recipe(write_recipe(tmp_path / "recipe.yaml", body))


def test_text_and_parquet_requests_drop_urls_and_keys_at_ingest(tmp_path):
    (tmp_path / "takedown.txt").write_text(f"# request 1\n{URLS[1]}\n\n  {url_key(URLS[4])}  \n")
    pq.write_table(pa.table({"url": [URLS[6]], "key": [None]}), tmp_path / "takedown.parquet")
    recipe = _recipe(tmp_path, ["takedown.txt", "takedown.parquet"])
    build(recipe, tmp_path / "work", show_progress=False)
    out = StageDir(tmp_path / "work", "ingest")
    kept = [r["url"] for s in out.done_shards() for r in out.read(s).to_pylist()]
    assert kept == [u for i, u in enumerate(URLS) if i not in (1, 4, 6)]
    drops = out.read_dropped().to_pylist()
    assert sorted(d["url"] for d in drops) == sorted([URLS[1], URLS[4], URLS[6]])
    assert {d["reason"] for d in drops} == {"removal_request"}


def test_a_new_request_changes_ingest_and_a_missing_file_is_a_clear_error(tmp_path):
    (tmp_path / "t.txt").write_text(URLS[0] + "\n")
    build(_recipe(tmp_path, ["t.txt"]), tmp_path / "work", show_progress=False)
    (tmp_path / "t.txt").write_text(URLS[0] + "\n" + URLS[2] + "\n")
    with pytest.raises(UserError, match="stage 'ingest'.*exclude"):
        build(_recipe(tmp_path, ["t.txt"]), tmp_path / "work", show_progress=False)
    with pytest.raises(UserError, match=r"source.exclude: .*nothing.txt does not exist"):
        load_removals([tmp_path / "nothing.txt"])
    pq.write_table(pa.table({"link": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="none of the columns url, key, sha256"):
        load_removals([tmp_path / "bad.parquet"])


def test_image_hashes_are_dropped_after_fetch(tmp_path, image_server, photo_files):
    urls = [f"{image_server}/img/{name}" for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")]
    digest = hashlib.sha256(photo_files["img/chelsea.jpg"]).hexdigest()
    (tmp_path / "hashes.txt").write_text(digest.upper() + "\n")
    recipe = _recipe(tmp_path, ["hashes.txt"], stages=("ingest", "fetch"), urls=urls,
                     fetch={"timeout": 5, "threads": 2})
    build(recipe, tmp_path / "work", show_progress=False)
    out = StageDir(tmp_path / "work", "fetch")
    kept = [r["url"] for s in out.done_shards() for r in out.read(s, columns=["url"]).to_pylist()]
    assert sorted(kept) == sorted([urls[0], urls[2]])
    (drop,) = out.read_dropped().to_pylist()
    assert drop["url"] == urls[1] and drop["reason"] == "removal_request" and digest in drop["detail"]


class _RobotsHandler(BaseHTTPRequestHandler):
    """Photos (``bodies`` by path, else ``body``); those under /robots/ come with an X-Robots-Tag that refuses
    AI use."""
    body, bodies = b"", {}

    def do_GET(self):  # noqa: N802
        body = self.bodies.get(self.path, self.body)
        self.send_response(200)
        if self.path.startswith("/robots/"):
            self.send_header("X-Robots-Tag", "noai")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_card_counts_rows_removed_on_request_and_refused_by_header(tmp_path, photo_files, monkeypatch):
    taken_down = photo_files["img/chelsea.jpg"]
    handler = type("H", (_RobotsHandler,), {"body": photo_files["img/astronaut.jpg"], "bodies": {"/4.jpg": taken_down}})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        monkeypatch.setenv(ALLOW_ENV, base.split("//", 1)[1])
        urls = [f"{base}/{i}.jpg" for i in range(5)] + [f"{base}/robots/{i}.jpg" for i in range(2)]
        # two rows at ingest (a URL, a key), one after fetch (its image's SHA-256)
        (tmp_path / "takedown.txt").write_text(f"{urls[0]}\n{url_key(urls[3])}\n"
                                               f"{hashlib.sha256(taken_down).hexdigest()}\n")
        write_metadata(tmp_path / "meta.parquet", [{"URL": u} for u in urls])
        recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", {
            "name": "removal", "version": "0.2.0", "changelog": {"0.1.0": "first", "0.2.0": "takedowns"},
            "stages": ["ingest", "fetch", "publish"],
            "source": {"metadata": ["meta.parquet"], "rows_per_shard": 4, "exclude": ["takedown.txt"]},
            "fetch": {"timeout": 5, "threads": 2}}))
        build(recipe, tmp_path / "work", show_progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    card = (tmp_path / "work" / "dataset" / "README.md").read_text()
    assert "Removal requests (`source.exclude`: URLs, keys or image SHA-256s) removed 3 rows from this " \
           "version." in card
    assert "Servers refused 2 images through `X-Robots-Tag` header directives (`noai`, `noimageai`, " \
           "`noimageindex`, `noindex`)." in card
    assert "- **0.2.0**: takedowns (3 rows removed on removal requests)" in card
    assert "- **0.1.0**: first\n" in card
    rows = pq.read_table(tmp_path / "work" / "dataset" / recipe.config_name).num_rows
    assert rows == 2


def test_the_changelog_counts_removals_only_on_a_version_that_had_some():
    from densefusion_hf.publish.cards import _changelog, dropped_for

    info = {"recipe": {"version": "1.1.0", "changelog": {"1.0.0": "first"}},
            "stages": [{"name": "ingest", "dropped": {"removal_request": 3, "no_url": 1}},
                       {"name": "fetch", "dropped": {"removal_request": 2}}]}
    assert dropped_for(info, "removal_request") == 5 and dropped_for(info, "disallowed_by_header") == 0
    assert _changelog(info, 5) == [{"version": "1.1.0", "text": "", "removed": 5},
                                   {"version": "1.0.0", "text": "first", "removed": None}]
    assert _changelog(info, 0) == [{"version": "1.0.0", "text": "first", "removed": None}]
