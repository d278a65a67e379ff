"""The published layout: shard and row-group plans, Hub Parquet settings, byte-identical rebuilds, and
the dataset card's commands."""

import json

import datasets
import pyarrow.parquet as pq
import pytest
import yaml

from densefusion_hf.publish.build_info import file_sha256
from densefusion_hf.publish.cards import check_card
from densefusion_hf.publish.dataset_stats import resolution_bucket, sentence_count
from densefusion_hf.runners.local import build
from densefusion_hf.recipe import load_recipe
from densefusion_hf.publish.shard_plan import even_shard_count, plan_row_groups, plan_shards
from tests.conftest import run_cli, write_metadata, write_recipe

PHOTOS = ["img/astronaut.jpg", "img/chelsea.jpg", "img/coffee.jpg", "img/rocket.jpg", "img/camera.jpg",
          "text/grand-opening.jpg", "other/astronaut-mirror.jpg", "gone/x.jpg"]


def test_shard_count_splits_evenly_over_common_worker_counts():
    assert [even_shard_count(n) for n in (0, 1, 2, 3, 5, 9, 64, 65, 129)] == [1, 1, 2, 4, 8, 16, 64, 128, 192]
    for needed in range(1, 300):
        count = even_shard_count(needed)
        assert count >= needed and all(count % consumers == 0 for consumers in (1, 2, 4, 8, 16, 32, 64)
                                       if consumers <= count)


def test_shard_plan_keeps_every_shard_under_the_limit_with_equal_rows():
    sizes = [100] * 90 + [5_000] * 10  # the large rows all at the end
    ranges = plan_shards(sizes, max_shard_bytes=20_000)
    assert ranges[0][0] == 0 and ranges[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    counts = [stop - start for start, stop in ranges]
    assert max(counts) - min(counts) <= 1 and len(ranges) == even_shard_count(len(ranges))
    assert all(sum(sizes[start:stop]) <= 20_000 for start, stop in ranges)
    # A plan by total size alone (59 kB / 20 kB -> 4 shards) would overfill the last shard.
    assert len(ranges) > 4
    assert plan_shards([10] * 3, max_shard_bytes=1, min_shards=1) == [(0, 1), (1, 2), (2, 3)]
    assert plan_shards([], max_shard_bytes=10) == [(0, 0)]


def test_row_groups_are_bounded_in_rows_and_bytes():
    assert plan_row_groups([1] * 250, max_bytes=10**9) == [100, 100, 50]
    assert plan_row_groups([40, 40, 40, 200, 10], max_bytes=100) == [2, 1, 1, 1]


def test_caption_length_measures():
    assert sentence_count("A cat. It sits on a mat! Why? ") == 3
    assert sentence_count("A cat sits on 3.5 mats") == 1
    assert sentence_count("Ends without a stop. Then a fragment") == 2
    assert sentence_count("   ") == 0
    assert [resolution_bucket(s) for s in (100, 256, 511, 2000)] == ["0-255", "256-383", "384-511", "1536+"]


@pytest.fixture
def small_recipe(tmp_path, image_server):
    write_metadata(tmp_path / "meta.parquet", [{"URL": f"{image_server}/{p}", "TEXT": f"photo {i}"}
                                               for i, p in enumerate(PHOTOS)])

    def recipe(**publish):
        return load_recipe(write_recipe(tmp_path / "recipe.yaml", {
            "name": "small", "version": "1.2.3", "changelog": {"1.2.3": "third", "1.10.0": "later"},
            "source": {"metadata": ["meta.parquet"], "rows_per_shard": 3},
            "fetch": {"timeout": 5, "threads": 2}, "dedup": {"algorithm": "phash", "threshold": 0},
            "publish": {"config": "cfg", **publish}}))

    return recipe


def _published(folder):
    return {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "README.md"}


def test_rebuild_from_the_same_inputs_gives_byte_identical_files(small_recipe, tmp_path):
    recipe = small_recipe(max_row_group_mb=0.2)
    build(recipe, tmp_path / "one", show_progress=False)
    build(recipe, tmp_path / "two", show_progress=False)
    first, second = _published(tmp_path / "one" / "dataset"), _published(tmp_path / "two" / "dataset")
    assert first == second
    assert {"cfg/train-00000-of-00001.parquet", "assets/cfg/build.json", "assets/cfg/resolutions.png"} <= set(first)

    path = tmp_path / "one" / "dataset" / "cfg" / "train-00000-of-00001.parquet"
    parquet = pq.ParquetFile(path)
    meta = parquet.metadata
    assert meta.num_rows == 7  # 8 URLs, one dead
    # The Hub's settings: content-defined chunking, a page index, row groups within the byte bound.
    assert b"content_defined_chunking" in meta.metadata
    columns = [meta.row_group(0).column(i) for i in range(meta.num_columns)]
    assert all(c.has_offset_index for c in columns)
    by_path = {c.path_in_schema: c for c in columns}
    assert by_path["key"].has_column_index
    assert by_path["image.bytes"].compression == "UNCOMPRESSED"  # JPEG bytes stored plain
    assert by_path["key"].compression == "SNAPPY"
    assert meta.num_row_groups > 1
    for index in range(meta.num_row_groups):
        group = meta.row_group(index)
        assert group.num_rows == 1 or group.total_byte_size <= 0.2e6 * 1.1


def test_small_shard_limit_gives_more_equal_shards(small_recipe, tmp_path):
    build(small_recipe(max_shard_mb=0.3), tmp_path / "work", show_progress=False)
    folder = tmp_path / "work" / "dataset"
    files = sorted((folder / "cfg").glob("*.parquet"))
    n = len(files)
    # ~0.4 MB of rows under a 0.3 MB limit: two files (a power of two), 4 and 3 rows, each under the limit
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert rows == [4, 3] and all(f.stat().st_size <= 0.3e6 for f in files)
    ds = datasets.load_dataset(str(folder), "cfg", split="train")
    assert ds.num_rows == 7 and isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].size == (ds[0]["width"], ds[0]["height"])


def test_card_has_the_numbers_and_check_finds_what_contradicts_the_data(small_recipe, tmp_path):
    build(small_recipe(), tmp_path / "work", show_progress=False)
    folder = tmp_path / "work" / "dataset"
    text = (folder / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["configs"] == [{"config_name": "cfg", "data_files": [{"split": "train", "path": "cfg/train-*"}]}]
    assert meta["task_categories"] == ["image-to-text", "text-to-image"] and meta["size_categories"] == ["n<1K"]
    assert meta["dataset_info"][0]["config_name"] == "cfg"
    assert meta["dataset_info"][0]["splits"][0]["num_examples"] == 7
    # the body: loading code, drop reasons, resolutions, changelog newest first, licenses, citation
    assert 'load_dataset("' + str(folder) + '", "cfg", split="train")' in text
    assert "`failed_to_download`" in text and "![Images per short side](assets/cfg/resolutions.png)" in text
    assert text.index("**1.10.0**") < text.index("**1.2.3**")
    assert "CC-BY 4.0" in text and "arXiv:2407.08303" in text
    info = json.loads((folder / "assets" / "cfg" / "build.json").read_text())
    assert info["stats"]["rows"] == 7 and sum(info["stats"]["resolutions"].values()) == 7
    assert check_card(folder) == []
    ok = run_cli("card", "check", str(folder))
    assert ok.returncode == 0 and "matches" in ok.stdout

    # A card that lies about the row count, and a chart that went missing.
    (folder / "README.md").write_text(text.replace("num_examples: 7", "num_examples: 8"))
    assert not (folder / "assets" / "cfg" / "categories.png").exists()  # no categories in this recipe
    (folder / "assets" / "cfg" / "resolutions.png").unlink()
    bad = run_cli("card", "check", str(folder))
    assert bad.returncode == 1
    assert "dataset_info says 8 train rows, the files hold 7" in bad.stderr
    assert "assets/cfg/resolutions.png" in bad.stderr

    # render puts back a card that matches (the chart stays missing until a publish writes it)
    rendered = run_cli("card", "render", str(folder), "--repo", "org/small", "--version", "1.2.4")
    assert rendered.returncode == 0, rendered.stderr
    text = (folder / "README.md").read_text()
    assert 'load_dataset("org/small", "cfg"' in text and "Version 1.2.4." in text
    assert check_card(folder) == [f"the card shows assets/cfg/resolutions.png, which is not in {folder}."]

    # a changed data file no longer matches the checksum the card lists
    data = folder / "cfg" / "train-00000-of-00001.parquet"
    data.write_bytes(data.read_bytes())  # same bytes: still fine
    assert len(check_card(folder)) == 1
    pq.write_table(pq.read_table(data), data)  # same rows, other bytes
    assert any("SHA-256 differs" in p for p in check_card(folder))

    good = (folder / "README.md").read_text()
    for before, after, problem in [
        ("- n<1K", "- 1K<n<10K", "size_categories is ['1K<n<10K'] but the configs hold 7 rows"),
        ("path: cfg/train-*", "path: nope/train-*", "its data_files match no Parquet file"),
        ("  - name: width\n    dtype: int64", "  - name: width\n    dtype: int32", "features differ"),
    ]:
        assert before in good
        (folder / "README.md").write_text(good.replace(before, after, 1))
        assert any(problem in found for found in check_card(folder)), (problem, check_card(folder))
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n# x\n")
    broken = run_cli("card", "check", str(folder))
    assert broken.returncode == 1 and "YAML header does not parse" in broken.stderr
