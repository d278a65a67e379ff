"""`df-hf browse` refusing what it cannot show: mistyped paths, and a Hub it cannot read, each in one line."""

from __future__ import annotations

import html
import os
import socket
from urllib.error import HTTPError

import pytest

from tests.conftest import run_cli
from tests.hub_fixtures import run_python
from tests.test_browse import start_browse


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


# -- a Hub repo whose files cannot be read ------------------------------------------------------------------------

@pytest.fixture
def pushed(fake_hub, hub_env, tmp_path) -> str:
    """A synthetic dataset of two Parquet files (about 3 MB each) pushed to the fake Hub with huggingface_hub; its repo id."""
    from densefusion_hf.testing.synthetic import write_synthetic

    folder = write_synthetic(tmp_path / "synthetic", rows=4_000, files=2)  # files well over the 1 MiB read-ahead
    repo = "tester/browse-faults"
    run_python(f"from huggingface_hub import HfApi\napi = HfApi()\n"
               f"api.create_repo({repo!r}, repo_type='dataset')\n"
               f"api.upload_folder(folder_path={str(folder)!r}, repo_id={repo!r}, repo_type='dataset')\n", hub_env)
    return repo


# 501 is a 5xx huggingface_hub does not retry; a hang-up it retries 5 times (about 23 s) before giving up.
@pytest.mark.parametrize("answer, said", [(501, "HfHubHTTPError: Server error '501"),
                                          ("hangup", "RemoteProtocolError: Server disconnected")])
def test_a_hub_that_fails_reading_the_footers_gets_a_message_saying_what_to_do(fake_hub, hub_env, pushed, answer,
                                                                              said, tmp_path):
    fake_hub.fail_downloads(answer, paths="*.parquet")
    result = run_cli("browse", pushed, "--cache-dir", str(tmp_path / "cache"), env=hub_env, timeout=180)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]  # after huggingface_hub's own lines on its retries
    assert message.startswith(f"Error: {pushed}: cannot read the Parquet footer of synthetic/train-0000"), message
    assert f"from {fake_hub.url} ({said}" in message and "Check the network and HF_ENDPOINT, then retry." in message
    assert any("/resolve/" in r and r.endswith(".parquet") for r in fake_hub.request_log()["requests"])
    fake_hub.fail_downloads(None)  # the Hub is back: the same command serves the repo
    served = start_browse(pushed, "--cache-dir", str(tmp_path / "cache"), env=hub_env)
    try:
        status, _, body = served.get("/rows")
        assert status == 200 and body.count(b'class="card"') == 48
        if answer == 501:  # failing again once served: a row's image is a page saying so, the server goes on
            fake_hub.fail_downloads(answer, paths="*.parquet")
            with pytest.raises(HTTPError) as failed:
                served.get("/image/0")
            text = html.unescape(failed.value.read().decode())
            assert failed.value.code == 500 and f"{pushed}: cannot read row group 0 of synthetic/train-00000" in text
            assert "Check the network and HF_ENDPOINT, then retry. The rest of the dataset" in text
            fake_hub.fail_downloads(None)
            assert served.get("/image/0")[0] == 200
    finally:
        code, output = served.stop()
    assert "Traceback" not in output, output  # a failed page is one line on the terminal
    assert answer != 501 or f"df-hf browse: /image/0: {pushed}: cannot read row group 0" in output, output
    assert code == 0 and "Hub dataset tester/browse-faults, config synthetic: 4,000 rows in 2 files" in output, output
