"""Removal requests: URLs and keys dropped at ingest, image SHA-256s after fetch, recorded as removal_request."""

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densefusion_hf.errors import UserError
from densefusion_hf.keys import url_key
from densefusion_hf.recipe import load_recipe
from densefusion_hf.runners.local import build
from densefusion_hf.stages.removal import load_removals
from densefusion_hf.stages.shards import StageDir
from tests.conftest import write_metadata, write_recipe

URLS = [f"http://images.example/{i}.jpg" for i in range(8)]


def _recipe(tmp_path, exclude, stages=("ingest",), urls=URLS, fetch=None):
    write_metadata(tmp_path / "meta.parquet", [{"URL": u} for u in urls])
    body = {"name": "removal", "stages": list(stages),
            "source": {"metadata": ["meta.parquet"], "rows_per_shard": 3, "exclude": exclude}}
    if fetch:
        body["fetch"] = fetch
    return load_recipe(write_recipe(tmp_path / "recipe.yaml", body))


def test_text_and_parquet_requests_drop_urls_and_keys_at_ingest(tmp_path):
    (tmp_path / "takedown.txt").write_text(f"# request 1\n{URLS[1]}\n\n  {url_key(URLS[4])}  \n")
    pq.write_table(pa.table({"url": [URLS[6]], "key": [None]}), tmp_path / "takedown.parquet")
    recipe = _recipe(tmp_path, ["takedown.txt", "takedown.parquet"])
    build(recipe, tmp_path / "work", show_progress=False)
    out = StageDir(tmp_path / "work", "ingest")
    kept = [r["url"] for s in out.done_shards() for r in out.read(s).to_pylist()]
    assert kept == [u for i, u in enumerate(URLS) if i not in (1, 4, 6)]
    drops = out.read_dropped().to_pylist()
    assert sorted(d["url"] for d in drops) == sorted([URLS[1], URLS[4], URLS[6]])
    assert {d["reason"] for d in drops} == {"removal_request"}


def test_a_new_request_changes_ingest_and_a_missing_file_is_a_clear_error(tmp_path):
    (tmp_path / "t.txt").write_text(URLS[0] + "\n")
    build(_recipe(tmp_path, ["t.txt"]), tmp_path / "work", show_progress=False)
    (tmp_path / "t.txt").write_text(URLS[0] + "\n" + URLS[2] + "\n")
    with pytest.raises(UserError, match="stage 'ingest'.*exclude"):
        build(_recipe(tmp_path, ["t.txt"]), tmp_path / "work", show_progress=False)
    with pytest.raises(UserError, match=r"source.exclude: .*nothing.txt does not exist"):
        load_removals([tmp_path / "nothing.txt"])
    pq.write_table(pa.table({"link": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="none of the columns url, key, sha256"):
        load_removals([tmp_path / "bad.parquet"])


def test_image_hashes_are_dropped_after_fetch(tmp_path, image_server, photo_files):
    urls = [f"{image_server}/img/{name}" for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")]
    digest = hashlib.sha256(photo_files["img/chelsea.jpg"]).hexdigest()
    (tmp_path / "hashes.txt").write_text(digest.upper() + "\n")
    recipe = _recipe(tmp_path, ["hashes.txt"], stages=("ingest", "fetch"), urls=urls,
                     fetch={"timeout": 5, "threads": 2})
    build(recipe, tmp_path / "work", show_progress=False)
    out = StageDir(tmp_path / "work", "fetch")
    kept = [r["url"] for s in out.done_shards() for r in out.read(s, columns=["url"]).to_pylist()]
    assert sorted(kept) == sorted([urls[0], urls[2]])
    (drop,) = out.read_dropped().to_pylist()
    assert drop["url"] == urls[1] and drop["reason"] == "removal_request" and digest in drop["detail"]
