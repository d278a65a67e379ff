"""Fixtures for tests that publish to, or load from, a local fake of the Hugging Face Hub.

``huggingface_hub`` and ``datasets`` read ``HF_ENDPOINT`` and friends once, when imported, so clients talk
to the fake from a subprocess started with ``hub_env``: ``run_python(code, hub_env)``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from densefusion_hf.testing.hub_server import FakeHub, client_env

FAKE_TOKEN = "hf_fake_secret_token_for_tests"


@pytest.fixture
def fake_hub(tmp_path):
    """A FakeHub serving a fresh folder; stopped after the test."""
    with FakeHub(tmp_path / "fake-hub") as hub:
        yield hub


@pytest.fixture
def hub_env(fake_hub, tmp_path) -> dict[str, str]:
    """Environment for a client subprocess: the real clients, pointed at ``fake_hub``, caches under tmp_path."""
    return client_env(fake_hub.url, tmp_path, FAKE_TOKEN)


def run_python(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` with this interpreter in ``env``; fail the test with its output if it exits non-zero."""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"client exited with {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    return result
