"""The official DenseFusion-1M release as a recipe source, against a miniature of it on the local fake Hub:
every row the release or its URL can give is published with the right bytes, every other row is dropped
with both reasons, the card's per-zip table matches, and the short names load the release itself."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from densefusion_hf.keys import url_key
from densefusion_hf.netguard.addresses import ALLOW_ENV
from densefusion_hf.recipe import load_recipe
from densefusion_hf.release.images import ShardImages
from densefusion_hf.release.rows import convert
from tests.conftest import REPO, run_cli
from tests.hub_fixtures import run_python
from tests.release_fixtures import FOLDER_1M, RELEASE_REPO, expected_sha256, write_mini_release

RELEASE_RECIPE = REPO / "builders" / "densefusion-1m-release.yaml"
PUSHED = "tester/densefusion-1m-images"


@pytest.fixture
def mini_release(tmp_path, image_server):
    """The miniature release on disk, its lost rows' URLs served (or dead) on the loopback image server."""
    release = write_mini_release(tmp_path / "release", image_server)
    served = tmp_path / "served"
    for path, body in release.served.items():
        (served / path).parent.mkdir(parents=True, exist_ok=True)
        (served / path).write_bytes(body)
    return release


@pytest.fixture
def hub_release(mini_release, fake_hub, hub_env):
    """The miniature uploaded to the fake Hub as BAAI/DenseFusion-1M; yields (release, client environment)."""
    run_python(textwrap.dedent(f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo({RELEASE_REPO!r}, repo_type="dataset")
        api.upload_folder(repo_id={RELEASE_REPO!r}, repo_type="dataset", folder_path={str(mini_release.folder)!r})
    """), hub_env)
    return mini_release, dict(hub_env, **{ALLOW_ENV: os.environ[ALLOW_ENV]})


def release_recipe(tmp_path: Path, **source) -> Path:
    """The shipped release recipe, with a small shard size and short timeouts for the test."""
    body = {"extends": str(RELEASE_RECIPE),
            "source": {"rows_per_shard": 11, **source},
            "fetch": {"timeout": 3, "retries": 0, "processes": 1, "threads": 2},
            "publish": {"repo": PUSHED}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def published(workdir: Path) -> list[dict]:
    files = sorted((workdir / "dataset" / "densefusion-1m").glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def dropped(workdir: Path, stage: str) -> dict[str, dict]:
    rows = [r for f in sorted((workdir / stage).glob("shard-*.dropped.parquet")) for r in pq.read_table(f).to_pylist()]
    return {r["key"]: r for r in rows}


def assert_exactly_what_can_be_had(release, workdir: Path) -> None:
    rows = published(workdir)
    kept = [r for r in release.rows if r["expect"] != "lost"]
    assert [r["key"] for r in rows] == [url_key(r["url"]) for r in kept]      # in the release's order
    for got, want in zip(rows, kept):
        assert hashlib.sha256(got["image"]["bytes"]).hexdigest() == expected_sha256(want)
        assert got["sha256"] == expected_sha256(want)
        assert got["image_source"] == ("release" if want["expect"] == "release" else "url")
        assert got["image_id"] == str(want["image_id"]) and got["caption"] == want["caption"]
        assert got["image_path"] == want["image_path"] and got["source_dataset"] == "laion2b"
        assert got["caption_model"].startswith("DenseFusion-1M release") and got["prompt_version"] is None
    assert {r["image_format"] for r in rows} == {"PNG", "JPEG"}              # decoded from the bytes
    drops = dropped(workdir, "fetch")
    lost = [r for r in release.rows if r["expect"] == "lost"]
    assert set(drops) == {url_key(r["url"]) for r in lost}
    for row in lost:
        drop = drops[url_key(row["url"])]
        assert drop["reason"] == row["reason"]
        assert "from the URL: failed_to_download: HTTP Error 404" in drop["detail"], drop["detail"]


def card_table(card: str) -> dict[str, list[str]]:
    rows = re.findall(r"^\| `(images/[^`]+\.zip)` \| (.*) \|$", card, flags=re.M)
    return {path: [cell.strip() for cell in cells.split("|")] for path, cells in rows}


def test_release_rows_are_read_tolerantly(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"image_id": 1234567890123, "url": "http://a.test/1.jpg", "image_path": "C/000000/1.png",
                    "caption": "one", "width": 640}),
        "not json at all",
        json.dumps({"image_id": "0000000000042", "url": "http://a.test/2.jpg", "image_path": "C/000000/2.png",
                    "caption": "two", "source": {"name": "laion"}}),
        json.dumps(["a", "list"]),
    ]) + "\n")
    recipe = load_recipe(release_recipe(tmp_path, release={"repo": "./release"}))
    table = pq.read_table(convert(jsonl, tmp_path / "rows.parquet", recipe))
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == ["1234567890123", None, "0000000000042", None]  # text, digits kept
    assert [r["url"] for r in rows] == ["http://a.test/1.jpg", None, "http://a.test/2.jpg", None]
    assert rows[0]["release_width"] == "640"              # a field the build writes itself keeps its value
    assert json.loads(rows[2]["source"]) == {"name": "laion"}
    assert rows[0]["caption_model"] == recipe.source.release.caption_model and rows[0]["text"] is None


def test_zip_members_are_read_with_their_crc_checked_and_decoded(mini_release, tmp_path):
    recipe = load_recipe(release_recipe(tmp_path, release={"repo": str(mini_release.folder)}))
    rows = pa.table({"key": [url_key(r["url"]) for r in mini_release.rows],
                     "image_path": [r["image_path"] for r in mini_release.rows]})
    images = ShardImages(recipe, tmp_path / "work", rows)
    for row in mini_release.rows:
        key = url_key(row["url"])
        if row["expect"] == "release":
            assert images.image_row(key)["image"] == row["member"]
        else:
            assert images.image_row(key) is None and images.failures[key][0] == row["reason"]
    reasons = {r["image_id"]: images.failures.get(url_key(r["url"]), ("", ""))[1] for r in mini_release.rows}
    assert "Bad CRC-32" in reasons[mini_release.rows[3]["image_id"]]
    assert "not an image" in reasons[mini_release.rows[2]["image_id"]]
    assert "is not in the release" in reasons[mini_release.rows[7]["image_id"]]
    assert "has no member" in reasons[mini_release.rows[10]["image_id"]]
    assert list(images.to_download(rows).column("key")) == [
        pa.scalar(url_key(r["url"])) for r in mini_release.rows if r["expect"] != "release"]
    images.close()


@pytest.mark.parametrize("limit,value,said", [("max_pixels", 100, "fetch.max_pixels 100"),
                                              ("max_bytes", 1000, "> fetch.max_bytes 1000")])
def test_release_images_over_fetchs_limits_are_never_decoded(mini_release, tmp_path, limit, value, said):
    """Every photo of the miniature is over these limits, the zip read from its local headers included:
    max_pixels is checked before decoding, max_bytes on the size the zip states, before reading."""
    body = yaml.safe_load(release_recipe(tmp_path, release={"repo": str(mini_release.folder)}).read_text())
    body["fetch"][limit] = value
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(body))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    rows = pa.table({"key": [url_key(r["url"]) for r in mini_release.rows],
                     "image_path": [r["image_path"] for r in mini_release.rows]})
    images = ShardImages(recipe, tmp_path / "work", rows)
    readable = [r for r in mini_release.rows if r["expect"] == "release"]
    assert readable and not images.found
    assert "000002" in {r["image_path"].split("/")[-2] for r in readable}  # the zip whose directory is cut
    for row in readable:
        reason, detail = images.failures[url_key(row["url"])]
        assert reason == "too_large" and said in detail, detail
    counts = images.counts(set())  # the card's table counts them (max_bytes also catches the non-image member)
    too_large = sum(reason == "too_large" for reason, _ in images.failures.values())
    assert sum(c["too_large"] for c in counts.values()) == too_large >= len(readable)
    images.close()


def test_release_build_publishes_what_can_be_had_with_its_card_and_loads(hub_release, tmp_path):
    release, env = hub_release
    workdir = tmp_path / "work"
    result = run_cli("build", str(release_recipe(tmp_path)), "--workdir", str(workdir), "--no-progress", "--push",
                     env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert_exactly_what_can_be_had(release, workdir)
    assert dropped(workdir, "ingest") == {}

    card = (workdir / "dataset" / "README.md").read_text()
    table = card_table(card)
    assert sorted(table) == sorted(release.shards)
    for path, want in release.shards.items():
        present = "no" if path.endswith("000003.zip") else "yes"
        directory = {"yes": "ok", "no": "n/a"}[present]
        if path.endswith("000002.zip"):
            directory = "broken: read from local headers"
        assert table[path] == [present, "yes" if present == "yes" else "n/a", directory, *(str(want[n]) for n in (
            "rows", "read", "missing", "corrupt", "too_large", "repaired", "lost"))], path
    assert release.shards["images/DenseFusion-1M/000002.zip"]["read"] == 2     # every row of the cut zip
    assert "license: cc-by-4.0" in card and "arXiv:2407.08303" in card and "LAION's terms" in card
    checked = run_cli("card", "check", str(workdir / "dataset"))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    code = textwrap.dedent(f"""
        import json, datasets, densefusion_hf
        from densefusion_hf.errors import UserError
        pushed = datasets.load_dataset({PUSHED!r}, "densefusion-1m", split="train")
        short = densefusion_hf.load_dataset("densefusion-1m", split="train")
        small = densefusion_hf.load_dataset("densefusion-4v-100k", split="train")
        try:
            densefusion_hf.dataloader(densefusion_hf.stream("densefusion-1m", shuffle_buffer=0), batch_size=2)
            hint = None
        except UserError as exc:
            hint = str(exc)
        print(json.dumps([[r["key"] for r in pushed], [r["image"].size for r in pushed],
                          [[r["url"], r["caption"]] for r in short], [r["caption"] for r in small], hint]))
    """)
    keys, sizes, short, small, hint = json.loads(run_python(code, env).stdout.strip().splitlines()[-1])
    assert "These rows have no images" in hint and "densefusion-1m-release.yaml" in hint
    assert keys == [r["key"] for r in published(workdir)] and all(w > 0 and h > 0 for w, h in sizes)
    assert short == [[r["url"], r["caption"]] for r in release.rows]        # the release as the Hub serves it
    assert small == ["A GPT-4V caption of picture 0."]


def test_a_zip_whose_sha256_does_not_match_is_downloaded_again_once_and_what_reads_is_used(
        hub_release, fake_hub, tmp_path):
    release, env = hub_release
    damaged_zip = f"images/{FOLDER_1M}/000000.zip"
    original = (release.folder / damaged_zip).read_bytes()
    # The Hub's copy damaged after upload (one byte of the member that is not an image): its LFS pointer still
    # names the original SHA-256, so every download of it mismatches.
    damaged = bytearray(original)
    damaged[damaged.index(release.rows[2]["member"]) + 5] ^= 0xFF
    fake_hub.blobs.path(hashlib.sha256(original).hexdigest()).write_bytes(damaged)
    fake_hub.reset_log()
    workdir = tmp_path / "work"
    result = run_cli("build", str(release_recipe(tmp_path)), "--workdir", str(workdir), "--no-progress", env=env)
    assert result.returncode == 0, result.stderr + result.stdout

    downloads = [d["path"] for d in fake_hub.request_log()["downloads"] if d["path"].endswith(".zip")]
    present = sorted({r["zip"] for r in release.rows} - {f"images/{FOLDER_1M}/000003.zip"})
    assert sorted(downloads) == sorted([*present, damaged_zip])          # that zip twice, every other one once
    assert_exactly_what_can_be_had(release, workdir)   # its intact members read; the damaged one from its URL
    table = card_table((workdir / "dataset" / "README.md").read_text())
    assert table[damaged_zip][:3] == ["yes", "no", "ok"]
    assert table[damaged_zip][3:] == [str(release.shards[damaged_zip][n]) for n in (
        "rows", "read", "missing", "corrupt", "too_large", "repaired", "lost")]
    assert all(table[path][1] == "yes" for path in present if path != damaged_zip)


def test_a_release_build_on_ray_publishes_the_local_runners_bytes(hub_release, tmp_path):
    pytest.importorskip("ray")
    release, env = hub_release
    # Three fetch shards sharing zips (000001 and 000003 span two), run side by side on Ray.
    recipe = release_recipe(tmp_path, rows_per_shard=4)
    builds = {}
    for runner in ("local", "ray"):
        workdir = tmp_path / runner
        result = run_cli("build", str(recipe), "--workdir", str(workdir), "--runner", runner, "--no-progress",
                         env=env)
        assert result.returncode == 0, result.stderr + result.stdout
        folder = workdir / "dataset"
        builds[runner] = {str(f.relative_to(folder)): f.read_bytes().replace(str(workdir).encode(), b"W")
                          for f in sorted(folder.rglob("*")) if f.is_file()}
    assert_exactly_what_can_be_had(release, tmp_path / "ray")
    assert len(list((tmp_path / "ray" / "fetch").glob("shard-*.done"))) == 3
    local, on_ray = builds["local"], builds["ray"]
    assert sorted(on_ray) == sorted(local) and "README.md" in on_ray and any(n.endswith(".parquet") for n in on_ray)
    for name in local:
        assert on_ray[name] == local[name], name   # the card names its work directory only in its loading code


def _blobs(env: dict) -> Path:
    return Path(env["HF_HOME"]) / "hub" / f"datasets--{RELEASE_REPO.replace('/', '--')}" / "blobs"


def _kill_when(command: list[str], env: dict, ready, timeout: float = 120) -> None:
    """Run ``command``; SIGKILL it (and its children) as soon as ``ready()`` is true."""
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True, text=True)
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    reached = ready()
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
    _, errors = child.communicate()
    assert reached, f"the command ended before the moment it was to be killed at:\n{errors[-3000:]}"


def test_rerun_after_sigkill_while_reading_the_zips_gives_the_same_rows(hub_release, fake_hub, tmp_path):
    release, env = hub_release
    workdir, recipe = tmp_path / "work", release_recipe(tmp_path)
    checked = workdir / "release" / "zips"
    fake_hub.download_rate = 40_000   # bytes a second: each zip takes a second or two
    _kill_when([sys.executable, "-m", "densefusion_hf", "build", str(recipe), "--workdir", str(workdir),
                "--no-progress"], env, lambda: len(list(checked.rglob("*.json"))) >= 2)  # some zips read, not all
    assert not (workdir / "fetch" / "shard-00000.done").exists()
    fake_hub.download_rate = None
    result = run_cli("build", str(recipe), "--workdir", str(workdir), "--no-progress", env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert_exactly_what_can_be_had(release, workdir)   # what the uninterrupted build gives, row for row


def test_an_interrupted_zip_download_is_resumed_not_restarted(hub_release, fake_hub, tmp_path):
    release, env = hub_release
    zip_path = f"images/{FOLDER_1M}/000005.zip"
    big = release.folder / zip_path
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_STORED) as archive:
        # huggingface_hub writes what it receives in pieces of 10 MiB: larger than that, a kill leaves some
        archive.writestr("noise.png", np.random.default_rng(0).bytes(24 * 2**20))
    run_python(f"from huggingface_hub import HfApi; HfApi().upload_file(path_or_fileobj={str(big)!r}, "
               f"path_in_repo={zip_path!r}, repo_id={RELEASE_REPO!r}, repo_type='dataset')", env)
    downloads = tmp_path / "work" / "release" / "downloads"
    fetch_zip = textwrap.dedent(f"""
        import hashlib
        from pathlib import Path
        from densefusion_hf.recipe import load_recipe
        from densefusion_hf.release.repo import ReleaseRepo
        repo = ReleaseRepo(load_recipe({str(release_recipe(tmp_path))!r}).source.release, Path({str(downloads)!r}))
        print(hashlib.sha256(repo.file({zip_path!r}).read_bytes()).hexdigest())
    """)
    expected = hashlib.sha256(big.read_bytes()).hexdigest()

    # The build killed in the middle of the download: the rerun asks for the rest only.
    fake_hub.reset_log()
    fake_hub.download_rate = 8 * 2**20  # bytes a second
    partial = lambda: next(downloads.rglob("000005.zip.partial"), None)  # noqa: E731
    _kill_when([sys.executable, "-c", fetch_zip], env, lambda: partial() is not None and partial().stat().st_size)
    had = partial().stat().st_size
    fake_hub.download_rate = None
    assert run_python(fetch_zip, env).stdout.strip().splitlines()[-1] == expected
    ranges = [d["range"] for d in fake_hub.request_log()["downloads"] if d["path"] == zip_path]
    assert ranges == [None, f"bytes={had}-"]
    assert partial() is None  # renamed into place once complete

    # A connection dropped part-way: the same process goes on from where it stopped.
    shutil.rmtree(downloads)
    fake_hub.reset_log()
    fake_hub.drop_download_after = 12 * 2**20
    assert run_python(fetch_zip, env).stdout.strip().splitlines()[-1] == expected
    ranges = [d["range"] for d in fake_hub.request_log()["downloads"] if d["path"] == zip_path]
    assert len(ranges) == 2 and ranges[0] is None and int(ranges[1][len("bytes="):-1]) >= 10 * 2**20


def test_processes_wanting_the_same_zip_download_it_once_between_them(hub_release, fake_hub, tmp_path):
    release, env = hub_release
    zip_path = f"images/{FOLDER_1M}/000000.zip"
    downloads = tmp_path / "work" / "release" / "downloads"
    fetch_zip = textwrap.dedent(f"""
        import hashlib
        from pathlib import Path
        from densefusion_hf.recipe import load_recipe
        from densefusion_hf.release.repo import ReleaseRepo
        repo = ReleaseRepo(load_recipe({str(release_recipe(tmp_path))!r}).source.release, Path({str(downloads)!r}))
        print(hashlib.sha256(repo.file({zip_path!r}).read_bytes()).hexdigest())
    """)
    fake_hub.reset_log()
    fake_hub.download_rate = 100_000   # bytes a second: the download lasts while the others start
    children = [subprocess.Popen([sys.executable, "-c", fetch_zip], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [child.communicate(timeout=120) for child in children]
    fake_hub.download_rate = None
    expected = hashlib.sha256((release.folder / zip_path).read_bytes()).hexdigest()
    for child, (out, errors) in zip(children, outputs):
        assert child.returncode == 0, errors[-3000:]
        assert out.strip().splitlines()[-1] == expected
    assert [d["path"] for d in fake_hub.request_log()["downloads"]].count(zip_path) == 1


def test_a_caption_stage_on_a_release_writes_ours_beside_the_release_caption(mini_release, tmp_path):
    from densefusion_hf.runners.local import build

    path = release_recipe(tmp_path, release={"repo": str(mini_release.folder)}, limit=2)  # both in 000000.zip
    body = yaml.safe_load(path.read_text())
    body.update(stages=["ingest", "fetch", "caption", "publish"],
                caption={"engine": "template", "experts": {"ocr": {"engine": None}}})
    path.write_text(yaml.safe_dump(body))
    build(load_recipe(path), tmp_path / "work", show_progress=False)
    rows = published(tmp_path / "work")
    assert [r["caption"] for r in rows] == [r["caption"] for r in mini_release.rows[:2]]
    assert all(r["caption_model"].startswith("DenseFusion-1M release") for r in rows)
    assert all(r["fusion_caption"] and r["fusion_caption_model"] == "template" for r in rows)
    assert all(r["priors"] is not None and r["image_source"] == "release" for r in rows)


def test_release_recipes_are_checked_and_local_folders_resolve_against_the_recipe(tmp_path):
    from densefusion_hf.errors import RecipeError

    recipe = load_recipe(release_recipe(tmp_path, release={"repo": "./mirror"}))
    assert recipe.source.release.repo == str(tmp_path / "mirror") and recipe.source.release.is_local
    small = load_recipe(REPO / "builders" / "densefusion-4v-100k-release.yaml").source.release
    assert (small.config, small.layout.jsonl) == ("DenseFusion-4V-100K", "DenseFusion-4V-100k/DenseFusion-4V-100k.jsonl")
    with pytest.raises(RecipeError, match="exactly one of them"):
        load_recipe(release_recipe(tmp_path, metadata=["meta.parquet"]))
