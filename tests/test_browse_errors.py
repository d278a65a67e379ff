"""`df-hf browse` refusing what it cannot show: mistyped paths, and a Hub it cannot read, each in one line."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import run_cli


@pytest.fixture
def dead_endpoint() -> str:
    """A loopback address where nothing listens: were a path taken for a repo id, the Hub client would fail
    there (refused at once) instead of reaching any real Hub."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("typed, named", [
    ("./buidl", "./buidl: no such file or folder."),
    ("build/nope", "build/nope: no such file or folder (build exists, nope does not)."),
    ("build/shards/nope", "build/shards/nope: no such file or folder (build exists, shards/nope does not)."),
    ("~/no-such-folder-here", "no-such-folder-here does not"),
])
def test_a_mistyped_path_is_refused_in_one_line_naming_it(tmp_path, dead_endpoint, typed, named):
    (tmp_path / "build").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HF_ENDPOINT=dead_endpoint, HF_HUB_OFFLINE="0", HOME=str(home))
    result = run_cli("browse", typed, cwd=tmp_path, env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert named in lines[0], lines[0]
    for accepted in ("work directory", "published dataset folder", "ORG/NAME"):
        assert accepted in lines[0]
    assert str(dead_endpoint) not in result.stderr  # never tried as a Hub repo
