"""Fixtures for tests that publish to, or load from, a local fake of the Hugging Face Hub.

``huggingface_hub`` and ``datasets`` read ``HF_ENDPOINT`` and friends once, when imported, so clients talk
to the fake from a subprocess started with ``hub_env``: ``run_python(code, hub_env)``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from densefusion_hf.sample.hub_server import FakeHub

FAKE_TOKEN = "hf_fake_secret_token_for_tests"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture
def fake_hub(tmp_path):
    """A FakeHub serving a fresh folder; stopped after the test."""
    with FakeHub(tmp_path / "fake-hub") as hub:
        yield hub


@pytest.fixture
def hub_env(fake_hub, tmp_path) -> dict[str, str]:
    """Environment for a client subprocess: the real clients, pointed at ``fake_hub``, caches under tmp_path."""
    env = {name: value for name, value in os.environ.items() if name not in _OFFLINE_VARS}
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1", "localhost"]))
    env.update(
        HF_ENDPOINT=fake_hub.url,
        HF_HUB_DISABLE_XET="1",  # the fake speaks the LFS protocol only
        HF_TOKEN=FAKE_TOKEN,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_DATASETS_CACHE=str(tmp_path / "hf-datasets-cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY=no_proxy,  # a test's proxy (see conftest.proxied_through) must not capture the fake hub
        no_proxy=no_proxy,
    )
    return env


def run_python(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` with this interpreter in ``env``; fail the test with its output if it exits non-zero."""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"client exited with {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    return result
