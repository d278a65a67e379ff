"""densefusion_hf.loading on real published-layout folders: registry, streaming, resumption, DataLoader.

The fixture writes a dataset folder as publish lays it out (README with ``configs`` and ``dataset_info``, one
sub-folder of Parquet shards per config, an ``Image`` column with embedded JPEGs cut from scikit-image's
photographs).  Nothing is mocked: datasets reads the files, DataLoader workers are real processes.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from densefusion_hf.errors import UserError
from densefusion_hf.loading import (REGISTRY_ENV, ImageCaptionCollate, Resolved, dataloader, decode_resized,
                                    load_dataset, registry, resolve, stream)

REPO = Path(__file__).resolve().parents[1]
ROWS = {"densefusion-demo": (40, 4), "densefusion-tiny": (8, 2)}     # config -> (rows, Parquet files)
FEATURES = datasets.Features({
    "image": datasets.Image(), "key": datasets.Value("string"), "url": datasets.Value("string"),
    "text": datasets.Value("string"), "width": datasets.Value("int32"), "height": datasets.Value("int32"),
    "caption": datasets.Value("string"), "category": datasets.Value("string"),
    "cluster": datasets.Value("int32"), "caption_words": datasets.Value("int32"),
    "priors": {"tags": datasets.List({"label": datasets.Value("string"), "score": datasets.Value("float64")}),
               "alt_text": datasets.Value("string")},
})


def _jpeg(rng: np.random.Generator, photo: np.ndarray) -> bytes:
    """A crop of ``photo`` at a size of its own (120..400 px wide), as JPEG."""
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    width = int(rng.integers(120, 400))
    height = int(width * rng.uniform(0.6, 1.4))
    image = Image.fromarray(photo[y:y + ch, x:x + cw]).convert("RGB").resize((width, height))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def _rows(config: str, count: int) -> list[dict]:
    from skimage import data

    photos = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = np.random.default_rng(len(config))
    rows = []
    for i in range(count):
        blob = _jpeg(rng, photos[i % len(photos)])
        width, height = Image.open(io.BytesIO(blob)).size
        key = f"{config}-{i:03d}"
        caption = f"{key}: a photograph, number {i}, of a {['person', 'cup', 'cat', 'rocket'][i % 4]}"
        rows.append({"image": {"bytes": blob, "path": f"{key}.jpg"}, "key": key,
                     "url": f"http://images.test/{key}.jpg", "text": f"alt {i}", "width": width,
                     "height": height, "caption": caption, "category": "misc", "cluster": i % 3,
                     "caption_words": len(caption.split()),
                     "priors": {"tags": [{"label": "thing", "score": 0.5}], "alt_text": f"alt {i}"}})
    return rows


def write_published(folder: Path) -> dict[str, list[dict]]:
    """A dataset folder in the published layout with the configs of ROWS; returns each config's rows."""
    configs, infos, written = [], [], {}
    for config, (count, files) in ROWS.items():
        rows = written[config] = _rows(config, count)
        (folder / config).mkdir(parents=True)
        per_file = count // files
        for f in range(files):
            part = datasets.Dataset.from_list(rows[f * per_file:(f + 1) * per_file], features=FEATURES)
            part.to_parquet(str(folder / config / f"train-{f:05d}-of-{files:05d}.parquet"))
        configs.append({"config_name": config, "data_files": [{"split": "train", "path": f"{config}/train-*"}]})
        info = datasets.DatasetInfo(features=FEATURES)
        info.splits = datasets.SplitDict()
        info.splits.add(datasets.SplitInfo(name="train", num_examples=count))
        infos.append({"config_name": config, **info._to_yaml_dict()})
    header = yaml.safe_dump({"configs": configs, "dataset_info": infos}, sort_keys=False)
    (folder / "README.md").write_text(f"---\n{header}---\n# test dataset\n")
    return written


@pytest.fixture(scope="session")
def published(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    folder = tmp_path_factory.mktemp("published") / "dataset"
    return folder, write_published(folder)


@pytest.fixture
def demo(published):
    """(folder, config, rows) of the 40-row config in 4 Parquet files."""
    folder, rows = published
    return folder, "densefusion-demo", rows["densefusion-demo"]


def keys(ds) -> list[str]:
    return [row["key"] for row in ds]


def write_registry(path: Path, entries) -> Path:
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return path


# ------------------------------------------------------------------------------------------------ registry

def test_shipped_registry_names_the_hub_configs(monkeypatch):
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    entries = registry()
    # The paper's names mean the official release; our own builds are registered beside them.
    assert entries["densefusion-1m"][:2] == ("BAAI/DenseFusion-1M", "DenseFusion-1M")
    assert entries["densefusion-4v-100k"][:2] == ("BAAI/DenseFusion-1M", "DenseFusion-4V-100K")
    assert entries["densefusion-demo"][:2] == ("densefusion-hf/densefusion", "densefusion-demo")


def test_short_names_resolve_through_the_env_registry_to_a_local_folder(published, tmp_path, monkeypatch):
    folder, rows = published
    # A relative "./" repo is relative to the registry file; the shipped short name is overridden.
    link = tmp_path / "builds"
    link.mkdir()
    (link / "dataset").symlink_to(folder, target_is_directory=True)
    path = write_registry(tmp_path / "registry.json", {
        "densefusion-demo": {"repo": str(folder), "config": "densefusion-demo"},
        "tiny-build": {"repo": "./builds/dataset", "config": "densefusion-tiny"},
    })
    monkeypatch.setenv(REGISTRY_ENV, str(path))

    assert resolve("tiny-build") == Resolved(str(link / "dataset"), "densefusion-tiny", None, str(path))
    assert resolve("densefusion-1m").path == "BAAI/DenseFusion-1M"     # shipped entries stay
    ds = load_dataset("densefusion-demo", split="train", streaming=True)
    assert keys(ds) == [r["key"] for r in rows["densefusion-demo"]]
    tiny = load_dataset("tiny-build", split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(tiny, datasets.Dataset)
    assert tiny["key"] == [r["key"] for r in rows["densefusion-tiny"]]
    # A config given by the caller wins over the entry's.
    assert keys(stream("tiny-build", "densefusion-demo", shuffle_buffer=0)) == keys(ds)


def test_unknown_names_go_to_datasets_unchanged(demo, monkeypatch):
    folder, config, rows = demo
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    assert resolve("someone/else", "cfg") == Resolved("someone/else", "cfg")
    # A Path is never looked up, even when it is spelled like a short name.
    assert resolve(Path("densefusion-demo")) == Resolved("densefusion-demo", None)
    ds = load_dataset(str(folder), config, split="train", streaming=True)
    assert isinstance(ds, datasets.IterableDataset)
    assert keys(ds) == [r["key"] for r in rows]
    assert isinstance(next(iter(ds))["image"], Image.Image)     # load_dataset decodes as datasets does


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    ('["densefusion-demo"]', "top level is a JSON list"),
    ('{"x": "org/repo"}', "entry 'x' is a str"),
    ('{"x": {"config": "c"}}', "needs a non-empty string \"repo\""),
    ('{"x": {"repo": "org/repo", "confg": "c"}}', "unknown keys ['confg']"),
    ('{"x": {"repo": "org/repo", "config": 3}}', "non-string 'config'"),
])
def test_a_malformed_registry_is_a_user_error_naming_the_file(tmp_path, monkeypatch, text, problem):
    path = write_registry(tmp_path / "bad-registry.json", text)
    monkeypatch.setenv(REGISTRY_ENV, str(path))
    with pytest.raises(UserError) as error:
        load_dataset("x")
    assert str(path) in str(error.value)
    assert problem in str(error.value)


def test_a_missing_registry_file_or_folder_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="missing.json"):
        resolve("densefusion-demo")
    path = write_registry(tmp_path / "registry.json", {"gone": {"repo": str(tmp_path / "nowhere")}})
    monkeypatch.setenv(REGISTRY_ENV, str(path))
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("gone", split="train")


# ------------------------------------------------------------------------------------------------ stream

def test_stream_shuffles_per_epoch_and_repeats_for_the_same_seed_and_epoch(demo):
    folder, config, rows = demo
    in_files = [r["key"] for r in rows]
    ds = stream(folder, config, shuffle_buffer=16, seed=7)
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        orders.append(keys(ds))
    for order in orders:
        assert sorted(order) == sorted(in_files)
        assert order != in_files
    assert len({tuple(o) for o in orders}) == 3

    again = stream(folder, config, shuffle_buffer=16, seed=7)
    again.set_epoch(1)
    assert keys(again) == orders[1]
    ds.set_epoch(0)
    assert keys(ds) == orders[0]
    other_seed = stream(folder, config, shuffle_buffer=16, seed=8)
    assert keys(other_seed) != orders[0]
    # Images stay undecoded for the collate unless asked for.
    assert set(next(iter(ds))["image"]) == {"bytes", "path"}
    assert isinstance(next(iter(stream(folder, config, decode_images=True)))["image"], Image.Image)


def test_stream_reads_only_the_requested_columns(demo):
    folder, config, rows = demo
    ds = stream(folder, config, columns=["image", "caption"], shuffle_buffer=0)
    assert ds.column_names == ["image", "caption"]
    first = next(iter(ds))
    assert set(first) == {"image", "caption"}
    assert first["caption"] == rows[0]["caption"]
    with pytest.raises(UserError, match="no column 'captions'; columns= takes some of: image, key, url"):
        stream(folder, config, columns=["image", "captions"])


@pytest.mark.parametrize("shuffle_buffer", [0, 16])
@pytest.mark.parametrize("world_size", [2, 3])
def test_nodes_get_disjoint_parts_that_cover_every_row(demo, shuffle_buffer, world_size):
    folder, config, rows = demo
    parts = []
    for rank in range(world_size):
        ds = stream(folder, config, shuffle_buffer=shuffle_buffer, seed=3, rank=rank, world_size=world_size)
        ds.set_epoch(1)
        parts.append(keys(ds))
    seen = [k for part in parts for k in part]
    assert len(seen) == len(set(seen)) == len(rows)
    assert set(seen) == {r["key"] for r in rows}
    if world_size == 2:       # 4 files: whole files per node, 20 rows each
        assert [len(p) for p in parts] == [20, 20]


def test_rank_and_world_size_default_to_torchrun_variables(demo, monkeypatch):
    folder, config, rows = demo
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    from_env = keys(stream(folder, config, shuffle_buffer=0))
    assert from_env == keys(stream(folder, config, shuffle_buffer=0, rank=1, world_size=2))
    assert len(from_env) == 20
    with pytest.raises(ValueError):
        stream(folder, config, rank=0)


@pytest.mark.parametrize("cut", [1, 13, 20, 39])
def test_resuming_from_a_state_dict_continues_exactly_where_it_stopped(demo, cut):
    folder, config, _ = demo
    uninterrupted = stream(folder, config, shuffle_buffer=0)
    uninterrupted.set_epoch(1)
    expected = keys(uninterrupted)

    ds = stream(folder, config, shuffle_buffer=0)
    ds.set_epoch(1)
    it = iter(ds)
    before = [next(it)["key"] for _ in range(cut)]
    state = json.loads(json.dumps(ds.state_dict()))   # what a checkpoint keeps
    del it

    resumed = stream(folder, config, shuffle_buffer=0)
    resumed.set_epoch(1)
    resumed.load_state_dict(state)
    assert before + keys(resumed) == expected


def test_a_shuffled_stream_resumes_without_repeating_much(demo):
    """datasets does not save its shuffle buffer: the rest of the epoch is approximately the rest."""
    folder, config, rows = demo
    ds = stream(folder, config, shuffle_buffer=8, seed=1)
    ds.set_epoch(2)
    it = iter(ds)
    before = [next(it)["key"] for _ in range(17)]
    state = ds.state_dict()
    del it
    resumed = stream(folder, config, shuffle_buffer=8, seed=1)
    resumed.set_epoch(2)
    resumed.load_state_dict(state)
    after = keys(resumed)
    assert len(set(before) & set(after)) <= 2
    assert len(set(before) | set(after)) >= len(rows) - 8


# ------------------------------------------------------------------------------------------------ DataLoader

def expected_pixels(rows: list[dict], size: int) -> dict[str, np.ndarray]:
    return {r["caption"]: decode_resized(r["image"]["bytes"], size).transpose(2, 0, 1) / 255.0 for r in rows}


def test_dataloader_with_workers_yields_float_images_with_their_captions(demo):
    folder, config, rows = demo
    ds = stream(folder, config, columns=["image", "caption"], shuffle_buffer=16, seed=0)
    loader = dataloader(ds, batch_size=8, num_workers=2, image_size=48)
    expected = expected_pixels(rows, 48)
    captions = []
    for images, batch_captions in loader:
        assert images.dtype == torch.float32
        assert images.shape == (len(batch_captions), 3, 48, 48)
        assert images.is_contiguous()
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        for image, caption in zip(images, batch_captions):
            assert isinstance(caption, str)
            np.testing.assert_allclose(image.numpy(), expected[caption], atol=1e-6)
        captions += batch_captions
    assert sorted(captions) == sorted(expected)
    assert float(images.std()) > 0.05      # real pictures, not a constant


def test_dataloader_takes_datasets_decoded_images_and_uint8(demo):
    folder, config, rows = demo
    ds = stream(folder, config, shuffle_buffer=0, decode_images=True)
    images, captions = next(iter(dataloader(ds, batch_size=4, image_size=32, dtype=torch.uint8)))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert captions == [r["caption"] for r in rows[:4]]
    # PIL's full decode and the draft decode of the same JPEG agree closely after resizing.
    draft = torch.from_numpy(np.stack([decode_resized(r["image"]["bytes"], 32) for r in rows[:4]]))
    assert (images.permute(0, 2, 3, 1).float() - draft.float()).abs().mean() < 6


def test_collate_reads_bytes_and_paths(demo, tmp_path):
    _, _, rows = demo
    path = tmp_path / "one.jpg"
    path.write_bytes(rows[0]["image"]["bytes"])
    collate = ImageCaptionCollate(image_size=16)
    images, captions = collate([{"image": rows[0]["image"]["bytes"], "caption": "a"},
                                {"image": {"bytes": None, "path": str(path)}, "caption": "b"}])
    assert images.shape == (2, 3, 16, 16) and captions == ["a", "b"]
    assert (images[0] - images[1]).abs().mean() < 0.03


def _stop_after_three_batches_and_resume(make_loader) -> tuple[list[str], list[str]]:
    """Captions of three batches from one loader, then of the rest from a new loader given its state_dict."""
    first = make_loader()
    it = iter(first)
    before = [c for _ in range(3) for c in next(it)[1]]
    state = first.state_dict()
    del it
    resumed = make_loader()
    resumed.load_state_dict(state)
    return before, [c for _, captions in resumed for c in captions]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stateful_loader_resumes_exactly(demo, num_workers):
    pytest.importorskip("torchdata.stateful_dataloader")
    folder, config, _ = demo

    def loader():
        ds = stream(folder, config, columns=["image", "caption"], shuffle_buffer=0)
        ds.set_epoch(1)
        return dataloader(ds, batch_size=4, num_workers=num_workers, image_size=16, stateful=True)

    expected = [c for _, captions in loader() for c in captions]
    before, after = _stop_after_three_batches_and_resume(loader)
    assert before + after == expected


def test_a_shuffled_stream_resumes_through_a_stateful_loader_with_workers(demo):
    """The default stream (shuffled) behind 2 workers: datasets 5.2 fails this with max_buffer_input_shards > 1."""
    pytest.importorskip("torchdata.stateful_dataloader")
    folder, config, rows = demo

    def loader():
        ds = stream(folder, config, columns=["image", "caption"], shuffle_buffer=8, seed=5)
        ds.set_epoch(3)
        return dataloader(ds, batch_size=4, num_workers=2, image_size=16)

    before, after = _stop_after_three_batches_and_resume(loader)
    assert len(set(before) & set(after)) <= 2
    assert len(set(before) | set(after)) >= len(rows) - 2 * 8


def test_a_plain_loader_without_workers_resumes_through_the_dataset(demo):
    folder, config, _ = demo
    ds = stream(folder, config, shuffle_buffer=0)
    expected = [c for _, captions in dataloader(ds, batch_size=4, image_size=16, stateful=False) for c in captions]
    ds = stream(folder, config, shuffle_buffer=0)
    loader = dataloader(ds, batch_size=4, image_size=16, stateful=False)
    assert type(loader) is torch.utils.data.DataLoader
    it = iter(loader)
    before = [c for _ in range(2) for c in next(it)[1]]
    state = ds.state_dict()
    del it
    ds = stream(folder, config, shuffle_buffer=0)
    ds.load_state_dict(state)
    after = [c for _, captions in dataloader(ds, batch_size=4, image_size=16, stateful=False) for c in captions]
    assert before + after == expected


# ------------------------------------------------------------------------------------------------ example

def _losses(output: str) -> list[tuple[int, int, float]]:
    found = re.findall(r"^epoch (\d+) step (\d+) loss (\S+)$", output, flags=re.MULTILINE)
    return [(int(e), int(s), float(v)) for e, s, v in found]


def test_the_train_loop_example_runs_saves_and_resumes(demo, tmp_path):
    folder, config, _ = demo
    script = REPO / "examples" / "train_loop.py"
    state = tmp_path / "state.pt"
    base = [sys.executable, str(script), "--dataset", str(folder), "--config", config, "--batch-size", "8",
            "--num-workers", "2", "--epochs", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*extra: str) -> str:
        done = subprocess.run(base + list(extra), capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    straight = _losses(run("--steps", "8"))
    first = _losses(run("--steps", "4", "--save-state", str(state)))
    assert [s for _, s, _ in first] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for _, _, v in first)
    assert state.exists()

    output = run("--steps", "8", "--resume-from", str(state))
    assert "resumed at epoch 0 after step 4" in output
    resumed = _losses(output)
    # 40 rows in batches of 8 from 2 workers (20 rows each: 8, 8, 4): 6 batches per epoch.
    assert [(e, s) for e, s, _ in resumed] == [(0, 5), (0, 6), (1, 7), (1, 8)]
    assert all(math.isfinite(v) for _, _, v in resumed)
    # Model, optimizer and data position all came back: the same losses as the run that never stopped.
    assert first + resumed == straight
