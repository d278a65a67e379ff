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
    # Download processes may take a moment to exit after the build: a lazy unmount waits for them.
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


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


@pytest.fixture
def photo_files():
    # Noise does not compress: 8 small images for the first shard, then 8 of ~0.5 MB that img2dataset's
    # own Parquet cannot hold on a 3 MB disk.
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def noise(side):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(out, "JPEG", quality=95)
        return out.getvalue()

    return {**{f"small/{i}.jpg": noise(32) for i in range(8)}, **{f"big/{i}.jpg": noise(640) for i in range(8)}}


def test_full_disk_inside_img2dataset_stops_the_stage_and_resumes_identically(tmp_path, small_disk, image_server,
                                                                             photo_files):
    urls = [f"{image_server}/{path}" for path in photo_files]
    write_metadata(tmp_path / "meta.parquet", [{"URL": u} for u in urls])
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", {
        "name": "full-disk-fetch", "stages": ["ingest", "fetch"],
        "source": {"metadata": ["meta.parquet"], "rows_per_shard": 8}, "fetch": {"timeout": 5, "threads": 2}}))
    workdir = small_disk / "work"
    with pytest.raises(UserError, match=r"disk holding .*/work/fetch is full .*1 of 2 shards are left"):
        build(recipe, workdir, show_progress=False)
    assert [p.name for p in (workdir / "fetch").iterdir() if ".tmp-" in p.name or p.is_dir()] == []

    subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True)
    build(recipe, workdir, show_progress=False)
    clean = tmp_path / "clean"
    build(recipe, clean, show_progress=False)
    resumed, expected = _files(workdir / "fetch"), _files(clean / "fetch")
    data = [k for k in expected if k.endswith(".parquet")]
    assert len(data) == 4  # two shards, each with its dropped-rows file
    assert {k: resumed[k] for k in data} == {k: expected[k] for k in data}
    from densefusion_hf.stages.shards import StageDir
    assert sum(StageDir(workdir, "fetch").stats(s)["rows_out"] for s in ("00000", "00001")) == 16
