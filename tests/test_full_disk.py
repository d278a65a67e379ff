"""A full disk, on a real tmpfs mounted for the test (needs root; skipped with the reason otherwise)."""

import os
import subprocess

import pytest

from densefusion_hf.errors import UserError
from densefusion_hf.recipe import load_recipe
from densefusion_hf.runners.local import build
from tests.conftest import write_metadata, write_recipe


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"this machine does not allow a tmpfs mount: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def _recipe(tmp_path):
    # Random alt texts do not compress: ~2 MB of shards, written twice by ingest (its first pass, then the
    # shards), on a 3 MB disk: the first pass fits, the disk fills part-way through the shards.
    rows = [{"URL": f"http://images.example/{i}.jpg", "TEXT": os.urandom(300).hex()} for i in range(3000)]
    write_metadata(tmp_path / "meta.parquet", rows)
    return load_recipe(write_recipe(tmp_path / "recipe.yaml", {
        "name": "full-disk", "stages": ["ingest"],
        "source": {"metadata": ["meta.parquet"], "rows_per_shard": 300}}))


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("shard-*")) if p.is_file()}


def test_full_disk_names_the_folder_leaves_no_partial_shard_and_resumes_identically(tmp_path, small_disk):
    recipe = _recipe(tmp_path)
    workdir = small_disk / "work"
    with pytest.raises(UserError, match=r"disk holding .*/work/ingest is full .*each shard takes about [\d.]+ MB"):
        build(recipe, workdir, show_progress=False)
    leftovers = [p.name for p in (workdir / "ingest").iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    names = {p.name for p in (workdir / "ingest").glob("shard-*.parquet") if "dropped" not in p.name}
    assert names and all((workdir / "ingest" / n.replace(".parquet", ".done")).exists() for n in names)
    partial = len(names)

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    build(recipe, workdir, show_progress=False)
    clean = tmp_path / "clean"
    build(recipe, clean, show_progress=False)
    resumed, expected = _files(workdir / "ingest"), _files(clean / "ingest")
    assert len(expected) > 3 * partial  # the failure came part-way through
    assert {k: v for k, v in resumed.items() if not k.endswith((".json", ".done"))} == \
        {k: v for k, v in expected.items() if not k.endswith((".json", ".done"))}
