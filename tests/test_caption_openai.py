"""The openai caption engine against a real OpenAI-compatible server: ``transformers serve`` on 127.0.0.1
with the tiny Llava, end to end through the caption stage; a loopback proxy in front of it that fails some
requests; and a port where nothing listens."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pyarrow as pa
import pytest

from densefusion_hf.errors import UserError
from densefusion_hf.recipe import load_recipe
from densefusion_hf.runners.local import build
from densefusion_hf.sample.tiny_models import build_tiny_llava
from densefusion_hf.stages.caption import Captioner
from densefusion_hf.stages.shards import StageDir
from densefusion_hf.testing.transformers_serve import TransformersServe, free_port
from tests.conftest import load_published
from tests.test_caption import ROWS, captioned_rows, write_caption_recipe

SECRET = "sk-test-4f1c9a0b7d2e"


@pytest.fixture(scope="session")
def llava_server(tmp_path_factory):
    """``transformers serve`` pinned to the tiny Llava, on a free loopback port; yields (base_url, model)."""
    model = str(build_tiny_llava(tmp_path_factory.mktemp("served") / "llava"))
    with TransformersServe(model) as server:
        yield server.base_url, model


def openai_caption(base_url, model, **server):
    return {"engine": "openai", "model": model, "rows_per_chunk": 2, "generation": {"max_new_tokens": 8},
            "experts": {"ocr": {"engine": None}},
            "server": {"base_url": base_url, "generation_fields": "transformers", "concurrency": 2,
                       "timeout": 60, "backoff": 0.01, **server}}


def test_the_stage_captions_through_transformers_serve_as_the_transformers_engine_does(
        tmp_path, image_server, llava_server, monkeypatch):
    base_url, model = llava_server
    monkeypatch.setenv("CAPTION_TEST_KEY", SECRET)
    path = write_caption_recipe(tmp_path, image_server, openai_caption(base_url, model,
                                                                        api_key_env="CAPTION_TEST_KEY"))
    workdir = tmp_path / "work"
    build(load_recipe(path), workdir, show_progress=False)
    rows = captioned_rows(workdir)
    dropped = StageDir(workdir, "caption").read_dropped().to_pylist()
    assert len(rows) + len(dropped) == len(ROWS) and all(d["reason"] == "empty_caption" for d in dropped)
    assert rows, "the served tiny Llava generated no text for any image"
    for row in rows.values():
        assert row["caption_model"] == "llava" and row["prompt_version"] == "perceptual-fusion-v1"
        assert row["caption_words"] == len(row["caption"].split())

    # The same images and prompts through the in-process engine, one at a time as the server generates:
    # the server sees the stored bytes and the same generation settings, so it writes the same captions.
    in_process = dict(openai_caption(base_url, model), engine="transformers", batch_size=1)
    in_process.pop("server")
    recipe = load_recipe(write_caption_recipe(tmp_path / "local", image_server, in_process))
    fetched = StageDir(workdir, "fetch")
    source = pa.concat_tables([fetched.read(s) for s in fetched.done_shards()])
    expected, _, _ = Captioner(recipe, tmp_path / "local-work").caption_rows(source)
    by_key = {r["key"]: r["caption"] for r in expected.to_pylist()}
    for row in rows.values():
        assert row["caption"] == by_key[row["key"]]

    published = load_published(workdir / "dataset")
    assert sorted(published["caption"]) == sorted(r["caption"] for r in rows.values())
    assert "llava" in (workdir / "dataset" / "README.md").read_text()
    for file in workdir.rglob("*"):  # the key is in no file of the work directory, the card included
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


class FlakyProxy:
    """A loopback proxy in front of the real server: requests whose prompt holds FAIL-ALWAYS get a 500
    every time, FAIL-ONCE a 500 the first time, ECHO-KEY a 401 repeating the Authorization header; the
    rest are forwarded."""

    def __init__(self, upstream: str):
        self.seen: dict[str, int] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                marker = next((m for m in ("FAIL-ALWAYS", "FAIL-ONCE", "ECHO-KEY") if m.encode() in body), None)
                proxy.seen[marker] = proxy.seen.get(marker, 0) + 1
                if marker == "FAIL-ALWAYS" or (marker == "FAIL-ONCE" and proxy.seen[marker] == 1):
                    return self.answer(500, {"error": {"message": "simulated overload", "type": "server_error"}})
                if marker == "ECHO-KEY":
                    return self.answer(401, {"error": {"message": f"key {self.headers['Authorization']} refused"}})
                reply = httpx.post(upstream + self.path, content=body, timeout=60, trust_env=False,
                                   headers={"Content-Type": "application/json"})
                self.answer(reply.status_code, reply.json())

            def answer(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def rows_with_texts(photo_files, texts):
    names = ["img/chelsea.jpg", "img/coffee.jpg", "text/grand-opening.jpg", "img/astronaut.jpg"]
    return pa.table({"key": [f"k{i}" for i in range(len(texts))], "url": [f"u/{i}" for i in range(len(texts))],
                     "text": texts, "image": [photo_files[names[i % len(names)]] for i in range(len(texts))]})


def test_requests_failing_on_the_server_are_retried_then_recorded(tmp_path, llava_server, photo_files, monkeypatch):
    upstream, model = llava_server
    proxy = FlakyProxy(upstream.removesuffix("/v1"))
    monkeypatch.setenv("CAPTION_TEST_KEY", SECRET)
    try:
        caption = openai_caption(proxy.base_url, model, retries=2, api_key_env="CAPTION_TEST_KEY")
        caption["generation"]["max_new_tokens"] = 4
        recipe = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9", caption))
        captioner = Captioner(recipe, tmp_path / "work")
        try:
            captioned, drops, _ = captioner.caption_rows(
                rows_with_texts(photo_files, ["a cat FAIL-ALWAYS", "a cup FAIL-ONCE", "a sign ECHO-KEY", "a man"]))
        finally:
            captioner.close()
    finally:
        proxy.close()
    failed = {d["key"]: d["detail"] for d in drops if d["reason"] == "caption_failed"}
    assert set(failed) == {"k0", "k2"}
    assert f"HTTP 500 from {proxy.base_url}/chat/completions: simulated overload (after 3 attempts)" == failed["k0"]
    assert proxy.seen["FAIL-ALWAYS"] == 3 and proxy.seen["FAIL-ONCE"] == 2 and proxy.seen["ECHO-KEY"] == 1
    assert "HTTP 401" in failed["k2"] and "Bearer ***" in failed["k2"] and SECRET not in failed["k2"]
    kept = set(captioned.column("key").to_pylist()) | {d["key"] for d in drops if d["reason"] == "empty_caption"}
    assert kept == {"k1", "k3"}  # the retried request and the plain one were captioned


def test_a_server_that_is_not_there_fails_each_request_and_stops_the_chunk(tmp_path, photo_files, monkeypatch):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"  # nothing listens there
    # {node_ip} is this node's address: 127.0.0.1 outside Ray
    recipe = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9",
                                              openai_caption(f"http://{{node_ip}}:{port}/v1", "some/model", retries=1)))
    captioner = Captioner(recipe, tmp_path / "work")
    try:
        captioned, drops, _ = captioner.caption_rows(rows_with_texts(photo_files, ["a cat"]))
        assert captioned.num_rows == 0 and [d["reason"] for d in drops] == ["caption_failed"]
        assert drops[0]["detail"].startswith(f"cannot reach the caption server at {base_url}/chat/completions")
        assert "ConnectError" in drops[0]["detail"] and "(after 2 attempts)" in drops[0]["detail"]
        with pytest.raises(UserError, match="failed on every image of a chunk.*cannot reach the caption server"
                                            ".*check the server and caption.server"):
            captioner.caption_rows(rows_with_texts(photo_files, ["a cat", "a cup"]))
    finally:
        captioner.close()

    monkeypatch.delenv("CAPTION_TEST_KEY", raising=False)
    keyed = load_recipe(write_caption_recipe(tmp_path, "http://127.0.0.1:9",
                                             openai_caption(base_url, "some/model", api_key_env="CAPTION_TEST_KEY")))
    with pytest.raises(UserError, match="CAPTION_TEST_KEY, which is not set"):
        Captioner(keyed, tmp_path / "work")


def test_openai_recipe_settings(tmp_path):
    from densefusion_hf.stages.caption import Caption
    from tests.conftest import write_recipe

    def recipe(caption):
        return load_recipe(write_recipe(tmp_path / "r.yaml", {"name": "x", "source": {"metadata": ["m.parquet"]},
                                                               "caption": caption}))

    with pytest.raises(Exception, match="engine 'openai' needs the served model's name"):
        recipe({"engine": "openai"})
    with pytest.raises(Exception, match="caption.server.api_key_env"):
        recipe({"engine": "openai", "model": "m", "server": {"api_key_env": "sk-not a name"}})
    (tmp_path / "llava").mkdir()  # a folder of that name beside the recipe does not make it a local path
    base = recipe({"engine": "openai", "model": "llava", "server": {"concurrency": 4}})
    assert base.caption.model == "llava"
    faster = recipe({"engine": "openai", "model": "llava", "workers": 3,
                     "server": {"base_url": "http://127.0.0.1:9000/v1", "concurrency": 64, "timeout": 5,
                                "retries": 9, "backoff": 0.1, "api_key_env": "OTHER"}})
    assert Caption().params(faster) == Caption().params(base)  # where and how fast: not in the fingerprint
    resized = recipe({"engine": "openai", "model": "llava", "server": {"image": {"max_side": 448}}})
    assert Caption().params(resized) != Caption().params(base)
