"""Pushes that go wrong: killed with SIGKILL at random instants, refused by the Hub, cut off by a server that
fails or goes away.  A rerun leaves the repo holding exactly the local files, each LFS object stored once in
all, the version tagged on the last commit; no file, log or output of any failed push holds the token.

The fake Hub is a real HTTP server (in this process, or as its own process where it has to go away); the
pushes are `df-hf` processes, as a user runs them.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
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
                                                                                      hub_env, tmp_path):
    folder = published / "dataset"
    rng = random.Random(20260414)
    env = dict(hub_env, PYTHONUNBUFFERED="1")
    kills = []
    for _ in range(8):
        # An instant: after the n-th write request of this attempt began, plus a random delay.
        after, delay = rng.randint(1, 3), rng.uniform(0.0, 0.05)
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
