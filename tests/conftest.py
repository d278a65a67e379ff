"""Shared fixtures: real images, a loopback server, metadata and recipes written to temp folders."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from densefusion_hf.netguard.addresses import ALLOW_ENV
from densefusion_hf.sample.server import SampleServer

pytest_plugins = ["tests.hub_fixtures"]

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "builders" / "demo.yaml"


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_files() -> dict[str, bytes]:
    """Real photographs (scikit-image's) and broken files, keyed by their path on the server."""
    from skimage import data

    good = {f"img/{name}.jpg": jpeg_bytes(getattr(data, name)())
            for name in ("astronaut", "chelsea", "coffee", "rocket", "camera")}
    png = io.BytesIO()
    Image.fromarray(data.logo()).save(png, format="PNG")
    good["img/logo.png"] = png.getvalue()
    astronaut = Image.fromarray(data.astronaut())
    coffee = data.coffee()
    h, w = coffee.shape[:2]
    good["dup/astronaut-copy.jpg"] = good["img/astronaut.jpg"]          # byte-identical
    good["dup/astronaut-small.jpg"] = jpeg_bytes(np.asarray(astronaut.resize((256, 256))), quality=60)
    good["dup/coffee-crop.jpg"] = jpeg_bytes(coffee[h // 50: h - h // 50, w // 50: w - w // 50], quality=80)
    good["other/astronaut-mirror.jpg"] = jpeg_bytes(np.asarray(astronaut)[:, ::-1])  # not a duplicate
    from densefusion_hf.sample.make import render_sign

    good["text/grand-opening.jpg"] = jpeg_bytes(np.asarray(render_sign(["GRAND OPENING", "SALE"], (200, 30, 40),
                                                                         (255, 255, 255))), quality=92)
    rocket = good["img/rocket.jpg"]
    broken = {
        "bad/empty.jpg": b"",
        "bad/truncated.jpg": rocket[: len(rocket) // 2],
        "bad/page.jpg": b"<!DOCTYPE html><html><body>Forbidden</body></html>",
    }
    return {**good, **broken}


@pytest.fixture
def image_server(tmp_path, photo_files, monkeypatch):
    """A loopback HTTP server over ``photo_files``; yields its base URL.

    Fetch refuses loopback addresses by default; this server (its exact host:port, nothing else) is
    allowed through the operator's allow-list in the environment, which builds in subprocesses inherit.
    """
    root = tmp_path / "served"
    for rel, body in photo_files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    with SampleServer(root) as server:
        monkeypatch.setenv(ALLOW_ENV, server.address.split("//", 1)[1])
        yield server.address


def write_metadata(path: Path, rows: list[dict]) -> Path:
    """A LAION-style metadata Parquet file."""
    defaults = {"TEXT": "a photo", "WIDTH": 512.0, "HEIGHT": 512.0, "similarity": 0.3,
                "punsafe": 0.01, "pwatermark": 0.02}
    full = [dict(defaults, **row) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full), path)
    return path


def load_published(folder: Path):
    """``datasets.load_dataset`` of a published folder, never from the cache: datasets keys its cache of a
    local folder on the card and the file names, so a rebuild of the same size in the same place would
    read the earlier build."""
    import datasets

    return datasets.load_dataset(str(folder), split="train", download_mode="force_redownload")


def write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``df-hf ARGS`` in a child process, as a user runs it."""
    env = dict(kwargs.pop("env", os.environ), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "densefusion_hf", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=kwargs.pop("cwd", REPO), **kwargs)


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory) -> Path:
    """The demo recipe built once, end to end, through the command line; yields the work directory."""
    workdir = tmp_path_factory.mktemp("demo") / "work"
    result = run_cli("build", str(DEMO_RECIPE), "--workdir", str(workdir), "--no-progress")
    assert result.returncode == 0, result.stderr + result.stdout
    return workdir


# A Ray started by a test listens on loopback only (see densefusion_hf.runners.ray.LOCAL_ONLY_ENV), and so does a
# `ray start --head` a test runs; set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a test cluster on loopback, joined by its own tests
