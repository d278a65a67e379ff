"""The fake Hub (densefusion_hf.testing.hub_server) driven by the real huggingface_hub and datasets clients.

Clients run in subprocesses (they read HF_ENDPOINT when imported); each prints its findings as one
``RESULT <json>`` line, and the test checks them against the local files and the fake's request log.
"""

from __future__ import annotations

import base64
import hashlib
import http.client as http_client
import json
import random
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from densefusion_hf.testing.hub_server import FakeHub
from tests.hub_fixtures import FAKE_TOKEN, run_python

REPO = "tester/captions"
README = """---
configs:
- config_name: mycfg
  data_files:
  - split: train
    path: mycfg/train-*.parquet
---
# Captions

A tiny dataset for the fake hub's tests.
"""
ROWS_V1 = [{"id": i, "caption": f"a photo of thing {i}"} for i in range(6)]
ROWS_V2 = [{"id": 100 + i, "caption": f"a revised caption {i}"} for i in range(6)]

CLIENT_PRELUDE = f"""
import json, sys, time
from huggingface_hub import CommitOperationAdd, HfApi, HfFileSystem, hf_hub_download
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
api = HfApi()
REPO = {REPO!r}

def emit(value):
    print("RESULT " + json.dumps(value, default=str))

def status_of(call):
    try:
        call()
    except HfHubHTTPError as error:
        return error.response.status_code
    return None
"""


def client(code: str, env: dict, timeout: float = 300):
    """Run client ``code`` (after CLIENT_PRELUDE) and return the value it passed to ``emit``."""
    stdout = run_python(CLIENT_PRELUDE + textwrap.dedent(code), env, timeout=timeout).stdout
    results = [line[len("RESULT "):] for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert results, f"client emitted nothing:\n{stdout}"
    return json.loads(results[-1])


def http(hub: FakeHub, method: str, path: str, body=None, headers: dict | None = None, token: bool = True):
    """A raw request to the fake (no proxy, no client library): (status, headers, body bytes)."""
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {FAKE_TOKEN}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    request = urllib.request.Request(hub.url + path, data=body, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def ndjson(*lines: dict) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_dataset(folder: Path, rows: list[dict]) -> Path:
    """README with a `mycfg` config, its rows in two parquet shards, and a PNG."""
    (folder / "mycfg").mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(README)
    half = len(rows) // 2
    for index, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), folder / "mycfg" / f"train-{index:05d}-of-00002.parquet")
    Image.new("RGB", (8, 8), (200, 30, 40)).save(folder / "swatch.png")
    return folder


def upload_code(folder: Path, message: str = "upload") -> str:
    """Client code (an expression) uploading ``folder`` to REPO's main branch."""
    return (f"api.upload_folder(folder_path={str(folder)!r}, repo_id=REPO, repo_type='dataset', "
            f"commit_message={message!r})")


def create_dataset_repo(env: dict, folder: Path) -> str:
    return client(f"""
        api.create_repo(REPO, repo_type="dataset")
        emit({upload_code(folder)}.oid)
    """, env)


def test_create_repo_exist_ok_errors_and_delete(fake_hub, hub_env):
    result = client("""
        url = api.create_repo(REPO, repo_type="dataset")
        conflict = status_of(lambda: api.create_repo(REPO, repo_type="dataset"))
        again = api.create_repo(REPO, repo_type="dataset", exist_ok=True)
        info = api.dataset_info(REPO)

        def raises(call, error_type):
            try:
                call()
            except error_type:
                return True
            return False

        api.create_repo("tester/tiny-model")
        api.upload_file(path_or_fileobj=b'{"hidden": 8}', path_in_repo="config.json", repo_id="tester/tiny-model")
        model_config = open(hf_hub_download("tester/tiny-model", "config.json")).read()
        api.create_repo("tester/scratch", repo_type="dataset", private=True)
        api.delete_repo("tester/scratch", repo_type="dataset")
        emit({
            "url": url, "repo_id": url.repo_id, "conflict": conflict, "again": again,
            "user": api.whoami()["name"], "files": api.list_repo_files(REPO, repo_type="dataset"),
            "sha": info.sha, "history": [c.title for c in api.list_repo_commits(REPO, repo_type="dataset")],
            "missing_repo": raises(lambda: api.dataset_info("tester/missing"), RepositoryNotFoundError),
            "missing_revision": raises(lambda: api.dataset_info(REPO, revision="nope"), RevisionNotFoundError),
            "missing_file": raises(lambda: hf_hub_download(REPO, "nope.txt", repo_type="dataset"),
                                   EntryNotFoundError),
            "deleted": raises(lambda: api.dataset_info("tester/scratch"), RepositoryNotFoundError),
            "model_config": model_config,
        })
    """, {name: value for name, value in hub_env.items() if name != "HF_HUB_DISABLE_TELEMETRY"})
    assert result["url"] == f"{fake_hub.url}/datasets/{REPO}" and result["repo_id"] == REPO
    assert result["conflict"] == 409 and result["again"] == result["url"]
    assert result["user"] == "tester"
    assert result["files"] == [".gitattributes"] and result["history"] == ["initial commit"]
    assert len(result["sha"]) == 40
    assert result["missing_repo"] and result["missing_revision"] and result["missing_file"] and result["deleted"]
    assert result["model_config"] == '{"hidden": 8}'
    log = fake_hub.request_log()
    assert "GET /api/agent-harnesses" in log["requests"]  # with telemetry on, the client asks for it first
    assert log["unhandled"] == []


def test_upload_folder_then_identical_reupload_sends_nothing(fake_hub, hub_env, tmp_path):
    folder = write_dataset(tmp_path / "ds", ROWS_V1)
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    lfs_paths = sorted(path for path in local if not path.endswith(".md"))
    first = client(f"""
        api.create_repo(REPO, repo_type="dataset")
        commit = {upload_code(folder)}
        infos = api.get_paths_info(REPO, {sorted(local)!r} + ["mycfg"], repo_type="dataset")
        downloads = {{path: open(hf_hub_download(REPO, path, repo_type="dataset"), "rb").read().hex()
                     for path in {sorted(local)!r}}}
        emit({{
            "commit": commit.oid, "files": api.list_repo_files(REPO, repo_type="dataset"),
            "infos": {{i.path: {{"blob_id": getattr(i, "blob_id", None), "size": getattr(i, "size", None),
                                "lfs_sha256": i.lfs.sha256 if getattr(i, "lfs", None) else None,
                                "folder": not hasattr(i, "blob_id")}} for i in infos}},
            "downloads": downloads,
            "card_configs": api.dataset_info(REPO).card_data.configs,
        }})
    """, hub_env)
    assert first["files"] == [".gitattributes", *sorted(local)]
    assert {path: bytes.fromhex(data) for path, data in first["downloads"].items()} == local
    infos = first["infos"]
    assert infos["mycfg"]["folder"]
    assert infos["README.md"] == {"blob_id": git_blob_oid(local["README.md"]), "size": len(local["README.md"]),
                                  "lfs_sha256": None, "folder": False}
    for path in lfs_paths:
        assert infos[path]["lfs_sha256"] == hashlib.sha256(local[path]).hexdigest(), path
    assert first["card_configs"][0]["config_name"] == "mycfg"
    log = fake_hub.request_log()
    assert (log["lfs_uploads"], log["lfs_bytes"], log["commits"]) == (
        len(lfs_paths), sum(len(local[p]) for p in lfs_paths), 1)
    assert log["unhandled"] == []

    assert http(fake_hub, "POST", "/_fake/reset-log")[0] == 200
    second = client(f"emit({upload_code(folder)}.oid)", hub_env)
    status, _, body = http(fake_hub, "GET", "/_fake/log")
    log = json.loads(body)
    assert status == 200 and second == first["commit"]
    assert (log["lfs_uploads"], log["lfs_bytes"], log["commits"]) == (0, 0, 0)
    assert f"POST /datasets/{REPO}.git/info/lfs/objects/batch" in log["requests"]  # asked, and told "stored"


def test_tag_pins_the_rows_load_dataset_sees(fake_hub, hub_env, tmp_path):
    folder = write_dataset(tmp_path / "ds", ROWS_V1)
    create_dataset_repo(hub_env, folder)
    client('api.create_tag(REPO, tag="v1.0.0", repo_type="dataset"); emit(None)', hub_env)
    write_dataset(folder, ROWS_V2)
    client(f"emit({upload_code(folder, 'v2 rows')}.oid)", hub_env)
    result = client("""
        import datasets
        tagged = datasets.load_dataset(REPO, "mycfg", revision="v1.0.0", split="train")
        main = datasets.load_dataset(REPO, "mycfg", split="train")
        streamed = datasets.load_dataset(REPO, "mycfg", revision="v1.0.0", split="train", streaming=True)
        tag_conflict = status_of(lambda: api.create_tag(REPO, tag="v1.0.0", repo_type="dataset"))
        api.delete_tag(REPO, tag="v1.0.0", repo_type="dataset")
        emit({"tagged": tagged.to_list(), "main": main.to_list(), "streamed": list(streamed),
              "tag_conflict": tag_conflict, "tags_after_delete": api.list_repo_refs(REPO, repo_type="dataset").tags})
    """, hub_env)
    assert result["tagged"] == ROWS_V1
    assert result["streamed"] == ROWS_V1
    assert result["main"] == ROWS_V2
    assert result["tag_conflict"] == 409 and result["tags_after_delete"] == []
    assert fake_hub.request_log()["unhandled"] == []


def test_branch_and_pull_request_are_loadable_by_revision(fake_hub, hub_env, tmp_path):
    folder = write_dataset(tmp_path / "ds", ROWS_V1)
    first_commit = create_dataset_repo(hub_env, folder)
    pr_shard = tmp_path / "pr-shard.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS_V2[3:]), pr_shard)
    result = client(f"""
        import datasets
        api.create_branch(REPO, branch="dev", repo_type="dataset")
        api.create_branch(REPO, branch="dev", repo_type="dataset", exist_ok=True)
        api.upload_file(path_or_fileobj=b"draft notes", path_in_repo="notes.txt", repo_id=REPO,
                        repo_type="dataset", revision="dev")
        pr = api.create_commit(REPO, repo_type="dataset", create_pr=True, commit_message="swap a shard",
                               operations=[CommitOperationAdd("mycfg/train-00001-of-00002.parquet", {str(pr_shard)!r})])
        stale_parent = status_of(lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO,
                                 repo_type="dataset", revision="dev", parent_commit={first_commit!r}))
        refs = api.list_repo_refs(REPO, repo_type="dataset", include_pull_requests=True)
        pr_rows = datasets.load_dataset(REPO, "mycfg", revision=pr.pr_revision, split="train").to_list()
        main_rows = datasets.load_dataset(REPO, "mycfg", revision="main", split="train").to_list()
        dev_files = api.list_repo_files(REPO, repo_type="dataset", revision="dev")
        main_files = api.list_repo_files(REPO, repo_type="dataset")
        api.delete_branch(REPO, branch="dev", repo_type="dataset")
        emit({{
            "pr_revision": pr.pr_revision, "pr_num": pr.pr_num, "pr_rows": pr_rows, "main_rows": main_rows,
            "dev_files": dev_files, "main_files": main_files, "stale_parent": stale_parent,
            "branches": sorted(b.name for b in refs.branches), "pulls": [p.ref for p in refs.pull_requests],
            "branches_after_delete": [b.name for b in api.list_repo_refs(REPO, repo_type="dataset").branches],
        }})
    """, hub_env)
    assert (result["pr_revision"], result["pr_num"]) == ("refs/pr/1", 1)
    assert result["pr_rows"] == ROWS_V1[:3] + ROWS_V2[3:]
    assert result["main_rows"] == ROWS_V1
    assert "notes.txt" in result["dev_files"] and "notes.txt" not in result["main_files"]
    assert result["stale_parent"] == 412
    assert result["branches"] == ["dev", "main"] and result["pulls"] == ["refs/pr/1"]
    assert result["branches_after_delete"] == ["main"]
    assert fake_hub.request_log()["unhandled"] == []


def test_tree_listing_is_paginated(fake_hub, hub_env):
    expected = sorted(f"many/{i % 3}/file-{i:03d}.txt" for i in range(130))
    result = client(f"""
        api.create_repo(REPO, repo_type="dataset")
        api.create_commit(REPO, repo_type="dataset", commit_message="many files",
                          operations=[CommitOperationAdd(path, path.encode()) for path in {expected!r}])
        top = api.list_repo_tree(REPO, "many", repo_type="dataset")
        expanded = list(api.list_repo_tree(REPO, "many/1", repo_type="dataset", expand=True))
        emit({{"files": api.list_repo_files(REPO, repo_type="dataset"),
               "top": sorted(entry.path for entry in top),
               "expanded_commits": sorted({{entry.last_commit.title for entry in expanded}}),
               "found": HfFileSystem().find(f"datasets/{{REPO}}/many/2")}})
    """, hub_env)
    assert result["files"] == [".gitattributes", *expected]
    assert result["top"] == ["many/0", "many/1", "many/2"]
    assert result["expanded_commits"] == ["many files"]
    assert result["found"] == [f"datasets/{REPO}/{path}" for path in expected if path.startswith("many/2/")]
    tree_requests = [r for r in fake_hub.request_log()["requests"] if r == f"GET /api/datasets/{REPO}/tree/main"]
    assert len(tree_requests) >= 3  # 130 files + 4 folders + .gitattributes at 50 a page

    status, headers, body = http(fake_hub, "GET", f"/api/datasets/{REPO}/tree/main?recursive=true")
    assert status == 200 and len(json.loads(body)) == 50
    assert 'rel="next"' in headers["Link"] and "cursor=" in headers["Link"]


def test_range_requests_return_exactly_the_requested_bytes(fake_hub, hub_env, tmp_path):
    data = random.Random(0).randbytes(200_000)
    (tmp_path / "blob.bin").write_bytes(data)
    result = client(f"""
        api.create_repo(REPO, repo_type="dataset")
        api.upload_file(path_or_fileobj={str(tmp_path / "blob.bin")!r}, path_in_repo="blob.bin", repo_id=REPO,
                        repo_type="dataset")
        with HfFileSystem().open(f"datasets/{{REPO}}/blob.bin", "rb", block_size=4096) as remote:
            remote.seek(150_000)
            late = remote.read(10_000)
            remote.seek(1_000)
            early = remote.read(100)
        emit([late.hex(), early.hex()])
    """, hub_env)
    # Each read is one ranged GET: a server ignoring Range would hand back the file's start instead.
    assert [bytes.fromhex(part) for part in result] == [data[150_000:160_000], data[1_000:1_100]]
    resolve = f"/datasets/{REPO}/resolve/main/blob.bin"
    assert len([r for r in fake_hub.request_log()["requests"] if r == f"GET {resolve}"]) >= 2

    for range_header, start, end in (("bytes=1000-1999", 1000, 2000), ("bytes=199990-", 199_990, 200_000),
                                     ("bytes=-10", 199_990, 200_000), ("bytes=199000-300000", 199_000, 200_000)):
        status, headers, body = http(fake_hub, "GET", resolve, headers={"Range": range_header}, token=False)
        assert (status, body) == (206, data[start:end]), range_header
        assert headers["Content-Range"] == f"bytes {start}-{end - 1}/200000"
    status, headers, _ = http(fake_hub, "GET", resolve, headers={"Range": "bytes=200000-"})
    assert status == 416 and headers["Content-Range"] == "bytes */200000"
    status, headers, body = http(fake_hub, "HEAD", resolve)
    assert status == 200 and body == b"" and headers["Content-Length"] == "200000"
    assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert headers["X-Linked-Size"] == "200000" and headers["Accept-Ranges"] == "bytes"
    assert len(headers["X-Repo-Commit"]) == 40


def test_writes_without_a_token_get_401(fake_hub, hub_env, tmp_path):
    folder = write_dataset(tmp_path / "ds", ROWS_V1)
    create_dataset_repo(hub_env, folder)
    anonymous = {name: value for name, value in hub_env.items() if name != "HF_TOKEN"}
    result = client("""
        emit({
            "create": status_of(lambda: api.create_repo("tester/other", repo_type="dataset")),
            "upload": status_of(lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt",
                                                        repo_id=REPO, repo_type="dataset")),
            "tag": status_of(lambda: api.create_tag(REPO, tag="v9", repo_type="dataset")),
            "branch": status_of(lambda: api.create_branch(REPO, branch="b", repo_type="dataset")),
            "readme": open(hf_hub_download(REPO, "README.md", repo_type="dataset")).read(),
        })
    """, anonymous)
    assert {key: result[key] for key in ("create", "upload", "tag", "branch")} == dict.fromkeys(
        ("create", "upload", "tag", "branch"), 401)
    assert result["readme"] == README

    commit = ndjson({"key": "header", "value": {"summary": "anonymous"}})
    status, headers, body = http(fake_hub, "POST", f"/api/datasets/{REPO}/commit/main", commit, token=False)
    assert status == 401 and "Authorization" in json.loads(body)["error"]
    assert FAKE_TOKEN not in json.dumps(fake_hub.request_log())


def test_fail_commits_interrupts_a_push_until_cleared(fake_hub, hub_env):
    client('api.create_repo(REPO, repo_type="dataset"); emit(None)', hub_env)
    assert http(fake_hub, "POST", "/_fake/fail-commits", {"after": 1})[0] == 200
    push = """
        def push(name):
            return status_of(lambda: api.upload_file(path_or_fileobj=name.encode(), path_in_repo=name,
                                                     repo_id=REPO, repo_type="dataset"))
        started = time.monotonic()
        statuses = [push("a.txt"), push("b.txt"), push("c.txt")]
        emit({"statuses": statuses, "seconds": time.monotonic() - started,
              "files": api.list_repo_files(REPO, repo_type="dataset")})
    """
    failing = client(push, hub_env)
    assert failing["statuses"] == [None, 500, 500]
    assert failing["seconds"] < 10  # commits are not retried by the client: the failure is immediate
    assert failing["files"] == [".gitattributes", "a.txt"]

    assert http(fake_hub, "POST", "/_fake/fail-commits", {"after": None})[0] == 200
    cleared = client(push, hub_env)
    assert cleared["statuses"] == [None, None, None]
    assert cleared["files"] == [".gitattributes", "a.txt", "b.txt", "c.txt"]


def test_fail_downloads_answers_matching_files_with_an_error_or_a_hang_up_until_cleared(fake_hub, hub_env):
    client('api.create_repo(REPO, repo_type="dataset")\n'
           'for name in ("a.parquet", "README.md"):\n'
           '    api.upload_file(path_or_fileobj=name.encode(), path_in_repo=name, repo_id=REPO, repo_type="dataset")\n'
           'emit(None)', hub_env)
    resolve = f"/datasets/{REPO}/resolve/main/"
    assert http(fake_hub, "POST", "/_fake/fail-downloads", {"answer": 503, "paths": "*.parquet"})[0] == 200
    status, headers, body = http(fake_hub, "GET", resolve + "a.parquet")
    assert status == 503 and "fail-downloads" in headers["X-Error-Message"]
    assert http(fake_hub, "HEAD", resolve + "a.parquet")[0] == 503
    assert http(fake_hub, "GET", resolve + "README.md")[2] == b"README.md"  # other files are served
    fake_hub.fail_downloads("hangup", paths="*.parquet")
    with pytest.raises(http_client.RemoteDisconnected):
        http(fake_hub, "GET", resolve + "a.parquet")
    assert http(fake_hub, "POST", "/_fake/fail-downloads", {"answer": None})[0] == 200
    assert http(fake_hub, "GET", resolve + "a.parquet")[:3:2] == (200, b"a.parquet")


def test_commit_endpoint_refuses_bad_commits(fake_hub):
    assert http(fake_hub, "POST", "/api/repos/create", {"name": REPO, "type": "dataset"})[0] == 200
    _, _, body = http(fake_hub, "GET", f"/api/datasets/{REPO}")
    head = json.loads(body)["sha"]
    commit_path = f"/api/datasets/{REPO}/commit/"

    def commit(revision: str, *operations: dict, header: dict | None = None):
        payload = ndjson({"key": "header", "value": {"summary": "test", **(header or {})}}, *operations)
        status, headers, body = http(fake_hub, "POST", commit_path + revision, payload)
        return status, headers.get("X-Error-Code"), json.loads(body)

    never_uploaded = {"key": "lfsFile", "value": {"path": "big.bin", "algo": "sha256", "oid": "ab" * 32, "size": 5}}
    status, _, body = commit("main", never_uploaded)
    assert status == 400 and "never uploaded" in body["error"]
    assert commit("main", {"key": "deletedFile", "value": {"path": "nope.txt"}})[:2] == (404, "EntryNotFound")
    assert commit("nope")[:2] == (404, "RevisionNotFound")
    hello = {"key": "file", "value": {"path": "hello.txt", "encoding": "base64",
                                      "content": base64.b64encode(b"hello").decode()}}
    status, _, body = commit("main", hello, header={"parentCommit": head})
    assert status == 200 and body["pullRequestUrl"] is None
    assert commit("main", hello, header={"parentCommit": head})[0] == 412  # main moved on
    assert http(fake_hub, "POST", f"/api/datasets/{REPO}/tag/main", {"tag": "v1"})[0] == 200
    assert commit("v1", hello)[0] == 400  # tags do not move
    status, headers, body = http(fake_hub, "POST", commit_path + "main?create_pr=1",
                                 ndjson({"key": "header", "value": {"summary": "proposal"}}, hello))
    assert status == 200 and json.loads(body)["pullRequestUrl"].endswith(f"/datasets/{REPO}/discussions/1")
    status, _, body = http(fake_hub, "GET", f"/datasets/{REPO}/resolve/refs%2Fpr%2F1/hello.txt")
    assert (status, body) == (200, b"hello")

    status, _, body = http(fake_hub, "GET", "/api/spaces-hardware")
    assert status == 404 and "Not implemented" in json.loads(body)["error"]
    assert fake_hub.request_log()["unhandled"] == ["GET /api/spaces-hardware"]


def test_state_survives_a_restart(tmp_path):
    with FakeHub(tmp_path / "hub") as hub:
        http(hub, "POST", "/api/repos/create", {"name": "kept", "organization": "tester", "type": "dataset"})
        hello = {"key": "file", "value": {"path": "hello.txt", "content": base64.b64encode(b"hi").decode()}}
        http(hub, "POST", "/api/datasets/tester/kept/commit/main", ndjson({"key": "header", "value": {}}, hello))
    with FakeHub(tmp_path / "hub") as hub:
        status, headers, body = http(hub, "GET", "/datasets/tester/kept/resolve/main/hello.txt", token=False)
    assert (status, body) == (200, b"hi")
    assert headers["ETag"] == f'"{git_blob_oid(b"hi")}"'


def test_command_line_serves_until_interrupted(tmp_path):
    server = subprocess.Popen([sys.executable, "-m", "densefusion_hf.testing.hub_server", "--root", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split(" at ")[1].strip()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(url + "/api/whoami-v2", headers={"Authorization": "Bearer x"})
        with opener.open(request, timeout=30) as response:
            assert json.loads(response.read())["name"] == "tester"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_unknown_tokens_and_foreign_namespaces_are_refused_when_tokens_are_set(tmp_path):
    with FakeHub(tmp_path / "hub", tokens={FAKE_TOKEN: ("tester",)}) as hub:
        create = {"name": "mine", "organization": "tester", "type": "dataset"}
        assert http(hub, "POST", "/api/repos/create", create)[0] == 200
        status, headers, _ = http(hub, "GET", "/api/datasets/tester/mine",
                                  headers={"Authorization": "Bearer hf_not_a_token_it_knows"}, token=False)
        assert status == 401 and headers["X-Error-Message"] == "Invalid credentials in Authorization header"
        status, _, body = http(hub, "POST", "/api/repos/create", dict(create, organization="someone"))
        assert status == 403 and "rights to write to someone/mine" in json.loads(body)["error"]
        assert http(hub, "GET", "/api/datasets/tester/mine", token=False)[0] == 200  # reads need no token
    with FakeHub(tmp_path / "hub") as hub:  # without tokens, as before: any token writes anywhere
        assert http(hub, "POST", "/api/repos/create", dict(create, organization="someone"))[0] == 200


def test_an_upload_cut_off_mid_body_stores_nothing_and_counts_nothing(tmp_path):
    import socket
    import time

    data = b"x" * 100_000
    oid = hashlib.sha256(data).hexdigest()
    tmp = tmp_path / "hub" / "blobs" / "tmp"

    def wait_until(condition):
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        return condition()

    with FakeHub(tmp_path / "hub") as hub:
        target = f"/_lfs/objects/{oid}?size={len(data)}&sig={hub.sign(oid, len(data))}"
        with socket.create_connection(("127.0.0.1", int(hub.url.rsplit(":", 1)[1]))) as raw:
            raw.sendall(f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                        + data[:1000])
            assert wait_until(lambda: any(tmp.iterdir()))  # the upload has begun
        assert wait_until(lambda: not any(tmp.iterdir()))  # the client went away: its part is gone
        assert not hub.blobs.has(oid) and hub.request_log()["lfs_uploads_by_oid"] == {}
        assert http(hub, "PUT", target, data, token=False)[0] == 200
        assert hub.request_log()["lfs_uploads_by_oid"] == {oid: 1} and hub.blobs.has(oid, len(data))
