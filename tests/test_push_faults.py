"""Pushes that go wrong: killed with SIGKILL at random instants, refused by the Hub, cut off by a server that
fails or goes away.  A rerun leaves the repo holding exactly the local files, each LFS object stored once in
all, the version tagged on the last commit; no file, log or output of any failed push holds the token.

The fake Hub is a real HTTP server (in this process, or as its own process where it has to go away); the
pushes are `df-hf` processes, as a user runs them.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from densefusion_hf.netguard.addresses import ALLOW_ENV
from densefusion_hf.publish.build_info import file_sha256
from densefusion_hf.recipe import load_recipe
from densefusion_hf.runners.local import build
from densefusion_hf.sample.server import SampleServer
from densefusion_hf.testing.hub_server import client_env
from tests.conftest import REPO, run_cli, write_metadata, write_recipe

REPO_ID = "tester/pushed"
TAG = "v1.0.0"
PHOTOS = ["img/astronaut.jpg", "img/chelsea.jpg", "img/coffee.jpg", "img/rocket.jpg", "img/camera.jpg",
          "img/logo.png", "text/grand-opening.jpg", "other/astronaut-mirror.jpg"]
# Requests that change the repo or send data: the kill instants are counted in these.
WRITES = re.compile(r"(POST /api/repos/create|POST /api/datasets/.+/(preupload|commit|tag)/|"
                    r"POST /datasets/.+\.git/info/lfs/objects/batch|PUT /_lfs/objects/|POST /_lfs/verify)")


@pytest.fixture(scope="module")
def published(tmp_path_factory, photo_files) -> Path:
    """A work directory whose dataset has eight data files (nine commits with --commit-files 1)."""
    root = tmp_path_factory.mktemp("push-faults")
    served = root / "served"
    for rel, body in photo_files.items():
        (served / rel).parent.mkdir(parents=True, exist_ok=True)
        (served / rel).write_bytes(body)
    with SampleServer(served) as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv(ALLOW_ENV, server.address.split("//", 1)[1])
        write_metadata(root / "meta.parquet", [{"URL": f"{server.address}/{p}?copy={i}", "TEXT": f"photo {i}"}
                                               for i, p in enumerate(PHOTOS * 2)])
        recipe = load_recipe(write_recipe(root / "recipe.yaml", {
            "name": "pushed", "version": "1.0.0", "stages": ["ingest", "fetch", "publish"],
            "source": {"metadata": ["meta.parquet"], "rows_per_shard": 4},
            "fetch": {"timeout": 5, "threads": 2}, "publish": {"config": "cfg", "min_shards": 8}}))
        build(recipe, root / "work", show_progress=False)
    assert len(list((root / "work" / "dataset" / "cfg").glob("train-*.parquet"))) == 8
    return root / "work"


def push_command(folder: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "densefusion_hf", "publish", str(folder), "--repo", REPO_ID, "--commit-files",
            "1", "--no-progress", *extra]


def writes_seen(hub) -> int:
    return sum(1 for request in hub.request_log()["requests"] if WRITES.match(request))


def local_files(folder: Path) -> dict[str, str]:
    """path in the repo -> SHA-256 of every file a push sends, but the card (rendered for the Hub)."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "README.md"}


def test_a_push_killed_at_random_instants_ends_with_the_local_files_each_uploaded_once(published, fake_hub,
                                                                                      hub_env):
    folder = published / "dataset"
    rng = random.Random(20260414)
    env = dict(hub_env, PYTHONUNBUFFERED="1")
    kills = []
    for _ in range(8):
        # An instant: after the n-th write request of this attempt began, plus a random delay of a few ms (the
        # fake Hub answers a write in ms: a longer delay lets one attempt finish what was left).
        after, delay = rng.randint(1, 3), rng.uniform(0.0, 0.005)
        start = writes_seen(fake_hub)
        process = subprocess.Popen(push_command(folder), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while process.poll() is None and writes_seen(fake_hub) - start < after and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        if process.poll() is not None:
            assert process.returncode == 0
            break  # it finished before the instant came: nothing is left to interrupt
        os.killpg(process.pid, signal.SIGKILL)
        kills.append((after, round(delay, 3)))
        process.wait(timeout=60)
    assert len(kills) >= 4, kills  # most attempts were killed mid-push, not after it

    finished = subprocess.run(push_command(folder), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    again = run_cli("publish", str(folder), "--repo", REPO_ID, "--dry-run", "--no-progress", env=hub_env)
    assert "upload 0 files" in again.stdout and "delete 0" in again.stdout, again.stdout  # the card too

    repo = fake_hub.repos.load("dataset", REPO_ID)
    head = repo["branches"]["main"]
    files = repo["commits"][head]["files"]
    expected = local_files(folder)
    assert set(files) - {".gitattributes"} == set(expected) | {"README.md"}
    assert {path: files[path]["sha256"] for path in expected} == expected
    assert repo["tags"] == {TAG: head}  # the version tag is on the last commit

    lfs = {entry["sha256"] for path, entry in files.items() if entry["lfs"]}
    uploads = fake_hub.request_log()["lfs_uploads_by_oid"]
    assert len(lfs) >= 5 and uploads == {sha256: 1 for sha256 in lfs}, (uploads, lfs)  # each once in all
    assert not any((fake_hub.root / "blobs" / "tmp").iterdir())  # uploads cut off mid-body left nothing


GOOD_TOKEN = "hf_pushSecretGood7Qx93kLmV2"
WRONG_TOKEN = "hf_pushSecretWrong4Zr81pTdN6"


class HubProcess:
    """The fake Hub as its own process on a fixed port, so it can go away mid-push and come back."""

    def __init__(self, root: Path, log: Path, port: int = 0):
        self.root, self.log, self.port, self.process = root, log, port, None
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy

    def start(self) -> "HubProcess":
        handle = open(self.log, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "densefusion_hf.testing.hub_server", "--root", str(self.root), "--port",
             str(self.port), "--token", f"{GOOD_TOKEN}=tester"], stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        handle.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = re.findall(r"at http://127\.0\.0\.1:(\d+)", self.log.read_text())
            if found and self.process.poll() is None:
                self.port = int(found[-1])
                try:
                    self.fake("GET", "log")
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"the fake Hub did not start: {self.log.read_text()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fake(self, method: str, hook: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(f"{self.url}/_fake/{hook}", method=method,
                                         data=None if body is None else json.dumps(body).encode())
        with self.opener.open(request, timeout=10) as answer:
            return json.loads(answer.read())

    def writes(self) -> int:
        return sum(1 for request in self.fake("GET", "log")["requests"] if WRITES.match(request))

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def run_push(command: list[str], env: dict, outputs: list[str], kill_after_writes: int | None = None,
             hub: HubProcess | None = None, kill_hub: bool = False) -> subprocess.CompletedProcess | None:
    """A push in its own process; with ``kill_after_writes``, the push (or the Hub) is killed once that many
    write requests began.  Its output is kept in ``outputs``."""
    if kill_after_writes is None:
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        outputs += [result.stdout, result.stderr]
        return result
    start = hub.writes()
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while process.poll() is None and hub.writes() - start < kill_after_writes and time.monotonic() < deadline:
        time.sleep(0.005)
    if kill_hub:
        hub.kill()
    else:
        os.killpg(process.pid, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=300)
    outputs += [stdout, stderr]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_no_failed_push_leaves_the_token_in_any_file_log_or_output(published, tmp_path):
    home = tmp_path / "home"
    hub = HubProcess(tmp_path / "hub", tmp_path / "hub.log").start()
    folder = published / "dataset"
    outputs: list[str] = []

    def env(token: str) -> dict:
        return dict(client_env(hub.url, home, token), HOME=str(home), PYTHONUNBUFFERED="1")

    def refused(result, *words):
        assert result.returncode == 1, (result.returncode, result.stderr)
        assert "Traceback" not in result.stderr and all(w in result.stderr for w in words), result.stderr

    # A token the Hub does not know: 401, for a plain push and for a build that pushes.
    refused(run_push(push_command(folder), env(WRONG_TOKEN), outputs), "401", "HF_TOKEN")
    build_push = [sys.executable, "-m", "densefusion_hf", "build", str(published.parent / "recipe.yaml"),
                  "--workdir", str(published), "--only", "publish", "--push", "--repo", REPO_ID, "--no-progress"]
    refused(run_push(build_push, env(WRONG_TOKEN), outputs), "401")
    # A namespace the token may not write to: 403.
    other = push_command(folder)
    other[other.index(REPO_ID)] = "someone-else/pushed"
    refused(run_push(other, env(GOOD_TOKEN), outputs), "403", "cannot write to someone-else/pushed")
    # The server fails every commit: 500.
    hub.fake("POST", "fail-commits", {"after": 0})
    refused(run_push(build_push, env(GOOD_TOKEN), outputs), "500", "run the same command again")
    hub.fake("POST", "fail-commits", {"after": None})
    # The server goes away after the first commit began, then comes back on the same port.
    gone = run_push(push_command(folder), env(GOOD_TOKEN), outputs, kill_after_writes=4, hub=hub, kill_hub=True)
    refused(gone, "run the same command again")
    hub.start()
    # The push itself killed mid-upload.
    killed = run_push(push_command(folder), env(GOOD_TOKEN), outputs, kill_after_writes=3, hub=hub)
    assert killed.returncode == -signal.SIGKILL
    # Finished, then a new version whose commit fails, after its plan read the repo's card into the cache.
    assert run_push(push_command(folder), env(GOOD_TOKEN), outputs).returncode == 0
    hub.fake("POST", "fail-commits", {"after": 0})
    refused(run_push(push_command(folder, "--version", "1.0.1"), env(GOOD_TOKEN), outputs), "500")
    hub.kill()
    outputs.append(hub.log.read_text())

    secrets = [token.encode() for token in (GOOD_TOKEN, WRONG_TOKEN)] + [GOOD_TOKEN[-10:].encode(),
                                                                          WRONG_TOKEN[-10:].encode()]
    for text in outputs:
        assert not any(secret.decode() in text for secret in secrets), text
    searched = [p for base in (published, tmp_path) for p in base.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.is_relative_to(home) and p.parent.name == "blobs" for p in searched)  # the cached card too
    holding = [str(p) for p in searched if any(secret in p.read_bytes() for secret in secrets)]
    assert holding == []
