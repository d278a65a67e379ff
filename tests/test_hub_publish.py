"""`df-hf publish` and `df-hf build --push` against the local fake Hub, read back by the real clients.

The command line and the loaders run in child processes whose environment points huggingface_hub and
datasets at the fake (they read HF_ENDPOINT when imported).
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap

import pyarrow.parquet as pq

from densefusion_hf.publish.build_info import file_sha256
from tests.conftest import DEMO_RECIPE, run_cli
from tests.hub_fixtures import FAKE_TOKEN, run_python

REPO_ID = "tester/densefusion"
CONFIG = "densefusion-demo"


def publish(env, folder, *args):
    result = run_cli("publish", str(folder), "--repo", REPO_ID, "--no-progress", *args, env=env)
    assert FAKE_TOKEN not in result.stdout + result.stderr  # never printed, not even in errors
    return result


def load_rows(env, revision, config=CONFIG, streaming=False) -> list[dict]:
    """(key, caption) of every row of the repo at ``revision``, through datasets.load_dataset."""
    code = textwrap.dedent(f"""
        import json, datasets
        ds = datasets.load_dataset({REPO_ID!r}, {config!r}, split="train", revision={revision!r},
                                   streaming={streaming})
        print(json.dumps([[row["key"], row["caption"], row["image"].size] for row in ds]))
    """)
    return json.loads(run_python(code, env).stdout.strip().splitlines()[-1])


def local_rows(folder, config=CONFIG) -> list[list]:
    rows = [r for f in sorted((folder / config).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return [[r["key"], r["caption"], [r["width"], r["height"]]] for r in rows]


def uploads_by_sha(hub) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in hub.request_log()["requests"]:
        match = re.match(r"PUT /_lfs/objects/([0-9a-f]{64})", request)
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def test_publish_tags_a_version_that_loads_back_and_a_repush_uploads_nothing(demo_build, fake_hub, hub_env):
    folder = demo_build / "dataset"
    dry = publish(hub_env, demo_build, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "a new repo" in dry.stdout and f"+ {CONFIG}/train-00000-of-00002.parquet" in dry.stdout
    assert "+ README.md" in dry.stdout and "tag v0.1.0" in dry.stdout
    assert fake_hub.request_log()["commits"] == 0 and not (fake_hub.root / "repos" / "datasets").exists()

    pushed = publish(hub_env, demo_build, "--commit-files", "1")
    assert pushed.returncode == 0, pushed.stderr
    assert "in 3 commits" in pushed.stdout and "Tagged v0.1.0" in pushed.stdout  # 2 data files, then the card
    expected = local_rows(folder)
    assert load_rows(hub_env, "v0.1.0") == expected
    assert load_rows(hub_env, "v0.1.0", streaming=True) == expected

    card = run_python(f"from huggingface_hub import DatasetCard; print(DatasetCard.load({REPO_ID!r}).text)",
                      hub_env).stdout
    assert f'load_dataset("{REPO_ID}", "{CONFIG}", split="train", revision="v0.1.0")' in card

    fake_hub.reset_log()
    again = publish(hub_env, demo_build)
    assert again.returncode == 0, again.stderr
    assert "Pushed 0 files" in again.stdout
    assert fake_hub.request_log()["commits"] == 0 and fake_hub.request_log()["lfs_bytes"] == 0
    assert "upload 0 files" in publish(hub_env, demo_build, "--dry-run").stdout


def test_interrupted_push_uploads_only_what_is_missing(demo_build, fake_hub, hub_env):
    folder = demo_build / "dataset"
    fake_hub.fail_commits(after=1)  # the first data commit lands, the second fails
    broken = publish(hub_env, folder, "--commit-files", "1")
    assert broken.returncode == 1
    assert "run the same command again" in broken.stderr and "Traceback" not in broken.stderr
    first, second = sorted((folder / CONFIG).glob("*.parquet"))
    tree = run_python(f"from huggingface_hub import HfApi; print(HfApi().list_repo_files({REPO_ID!r}, "
                      f"repo_type='dataset'))", hub_env).stdout
    assert first.name in tree and second.name not in tree and "README.md" not in tree

    fake_hub.fail_commits(after=None)
    resumed = publish(hub_env, folder, "--commit-files", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "1 unchanged" in resumed.stdout  # the committed data file
    uploads = uploads_by_sha(fake_hub)
    assert uploads[file_sha256(first)] == 1 and uploads[file_sha256(second)] == 1  # each sent once in all
    assert load_rows(hub_env, "v0.1.0") == local_rows(folder)


def test_a_published_version_is_never_moved(demo_build, fake_hub, hub_env, tmp_path):
    assert publish(hub_env, demo_build).returncode == 0
    changed = tmp_path / "dataset"
    shutil.copytree(demo_build / "dataset", changed)
    info_path = changed / "assets" / CONFIG / "build.json"
    info = json.loads(info_path.read_text())
    info["recipe"]["description"] = "A better description."
    info_path.write_text(json.dumps(info))

    refused = publish(hub_env, changed)
    assert refused.returncode == 1 and "already has version v0.1.0" in refused.stderr
    bumped = publish(hub_env, changed, "--version", "0.2.0")
    assert bumped.returncode == 0 and "Tagged v0.2.0" in bumped.stdout
    assert "upload 1 files" in publish(hub_env, changed, "--version", "0.2.1", "--dry-run").stdout  # the card
    code = f"""
from pathlib import Path
from huggingface_hub import hf_hub_download
for rev in ("v0.1.0", "v0.2.0"):
    card = Path(hf_hub_download({REPO_ID!r}, "README.md", repo_type="dataset", revision=rev)).read_text()
    print(rev, "A better description." in card)
"""
    assert run_python(code, hub_env).stdout.split() == ["v0.1.0", "False", "v0.2.0", "True"]


def _as_config(source, target, config, version, keep=None):
    """A dataset folder holding ``source``'s data as another config (first ``keep`` files only)."""
    files = sorted((source / CONFIG).glob("*.parquet"))[:keep]
    (target / config).mkdir(parents=True)
    shutil.copytree(source / "assets" / CONFIG, target / "assets" / config)
    listed = []
    for index, path in enumerate(files):
        copy = target / config / f"train-{index:05d}-of-{len(files):05d}.parquet"
        shutil.copy(path, copy)
        listed.append({"path": f"{config}/{copy.name}", "rows": pq.ParquetFile(copy).metadata.num_rows,
                       "bytes": copy.stat().st_size, "sha256": file_sha256(copy)})
    info = json.loads((target / "assets" / config / "build.json").read_text())
    info.update(config=config, files=listed)
    info["recipe"]["version"] = version
    (target / "assets" / config / "build.json").write_text(json.dumps(info))
    shutil.copy(source / "README.md", target / "README.md")
    return target


def test_a_second_config_joins_the_repo_and_stale_files_go(demo_build, fake_hub, hub_env, tmp_path):
    source = demo_build / "dataset"
    assert publish(hub_env, demo_build).returncode == 0
    whole = _as_config(source, tmp_path / "whole", "subset", "0.3.0")
    assert publish(hub_env, whole).returncode == 0
    card = run_python(f"from huggingface_hub import DatasetCard; print(DatasetCard.load({REPO_ID!r}).content)",
                      hub_env).stdout
    assert f"config_name: {CONFIG}" in card and "config_name: subset" in card
    assert load_rows(hub_env, "v0.3.0", config="subset") == local_rows(source)

    # The subset shrinks to one file: its two old files leave the repo, the other config stays.
    half = _as_config(source, tmp_path / "half", "subset", "0.3.1", keep=1)
    dry = publish(hub_env, half, "--dry-run").stdout
    assert "+ subset/train-00000-of-00001.parquet" in dry
    assert "- subset/train-00000-of-00002.parquet" in dry and "- subset/train-00001-of-00002.parquet" in dry
    assert f"- {CONFIG}/" not in dry
    assert publish(hub_env, half).returncode == 0
    assert load_rows(hub_env, "v0.3.1", config="subset") == local_rows(half, "subset")
    assert len(local_rows(half, "subset")) < len(local_rows(source))
    assert load_rows(hub_env, "v0.3.0", config="subset") == local_rows(source)
    assert load_rows(hub_env, "v0.3.1") == local_rows(source)


def test_branch_pull_request_and_private_repo(demo_build, fake_hub, hub_env):
    branch = publish(hub_env, demo_build, "--revision", "dev", "--private")
    assert branch.returncode == 0 and "(dev)" in branch.stdout, branch.stderr
    assert load_rows(hub_env, "dev") == local_rows(demo_build / "dataset")
    private = run_python(f"from huggingface_hub import HfApi; print(HfApi().dataset_info({REPO_ID!r}).private)",
                         hub_env).stdout.strip()
    assert private == "True"

    pr = publish(hub_env, demo_build, "--create-pr")
    assert pr.returncode == 0, pr.stderr
    assert "discussions/1" in pr.stdout and "Not tagged" in pr.stdout
    assert load_rows(hub_env, "refs/pr/1") == local_rows(demo_build / "dataset")


def test_build_push_and_clear_errors(demo_build, fake_hub, hub_env):
    missing = run_cli("build", str(DEMO_RECIPE), "--workdir", str(demo_build), "--only", "publish", "--push",
                      "--no-progress", env=hub_env)
    assert missing.returncode == 1 and "--push needs a Hub repo" in missing.stderr

    pushed = run_cli("build", str(DEMO_RECIPE), "--workdir", str(demo_build), "--only", "publish", "--push",
                     "--repo", REPO_ID, "--version", "0.1.1", "--no-progress", env=hub_env)
    assert pushed.returncode == 0, pushed.stderr
    assert "Tagged v0.1.1" in pushed.stdout and FAKE_TOKEN not in pushed.stdout + pushed.stderr

    anonymous = {k: v for k, v in hub_env.items() if k != "HF_TOKEN"}
    refused = run_cli("publish", str(demo_build), "--repo", "tester/other", "--no-progress", env=anonymous)
    assert refused.returncode == 1 and "HF_TOKEN" in refused.stderr and "Traceback" not in refused.stderr

    bad = publish(hub_env, demo_build, "--version", "1.0")
    assert bad.returncode == 1 and "--version 1.0: expected X.Y.Z" in bad.stderr
    nothing = publish(hub_env, demo_build / "ingest")
    assert nothing.returncode == 1 and "no published dataset here" in nothing.stderr


def test_short_name_streams_the_published_version_into_a_dataloader(demo_build, fake_hub, hub_env, tmp_path):
    assert publish(hub_env, demo_build).returncode == 0
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"densefusion-demo": {"repo": REPO_ID, "config": CONFIG}}))
    env = dict(hub_env, DENSEFUSION_HF_REGISTRY=str(registry))
    code = textwrap.dedent("""
        import json, densefusion_hf
        ds = densefusion_hf.load_dataset("densefusion-demo", split="train", revision="v0.1.0")
        stream = densefusion_hf.stream("densefusion-demo", revision="v0.1.0", shuffle_buffer=8, seed=1)
        stream.set_epoch(1)
        loader = densefusion_hf.dataloader(stream, batch_size=4, image_size=32, num_workers=2)
        shapes, captions = set(), []
        for images, texts in loader:
            shapes.add(tuple(images.shape[1:]))
            captions += texts
            assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        print(json.dumps({"rows": ds.num_rows, "shapes": sorted(shapes), "captions": sorted(captions)}))
    """)
    found = json.loads(run_python(code, env).stdout.strip().splitlines()[-1])
    expected = sorted(caption for _, caption, _ in local_rows(demo_build / "dataset"))
    assert found["rows"] == len(expected) == 18
    assert found["shapes"] == [[3, 32, 32]] and found["captions"] == expected


def test_a_new_branch_is_planned_against_main_and_foreign_configs_are_kept_safe(demo_build, fake_hub, hub_env,
                                                                               tmp_path):
    source = demo_build / "dataset"
    assert publish(hub_env, demo_build).returncode == 0
    # The same config rebuilt into one file, pushed to a new branch: main's two old files must go there.
    smaller = _as_config(source, tmp_path / "smaller", CONFIG, "0.4.0", keep=1)
    dry = publish(hub_env, smaller, "--revision", "dev", "--dry-run").stdout
    assert f"- {CONFIG}/train-00000-of-00002.parquet" in dry and f"- {CONFIG}/train-00001-of-00002.parquet" in dry
    assert publish(hub_env, smaller, "--revision", "dev").returncode == 0
    assert load_rows(hub_env, "v0.4.0") == local_rows(smaller)
    assert load_rows(hub_env, "v0.1.0") == local_rows(source)

    # A repo whose card lists a config df-hf did not publish: the push would drop it from the card.
    code = textwrap.dedent(f"""
        from huggingface_hub import HfApi
        card = "---\\nconfigs:\\n- config_name: theirs\\n  data_files: theirs/*.parquet\\n---\\n# Theirs\\n"
        HfApi().create_repo("tester/theirs", repo_type="dataset")
        HfApi().upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id="tester/theirs",
                            repo_type="dataset")
    """)
    run_python(code, hub_env)
    refused = run_cli("publish", str(demo_build), "--repo", "tester/theirs", "--no-progress", env=hub_env)
    assert refused.returncode == 1 and "not published by df-hf (theirs" in refused.stderr


def test_build_push_needs_the_publish_stage(demo_build, hub_env):
    result = run_cli("build", str(DEMO_RECIPE), "--workdir", str(demo_build), "--only", "caption", "--push",
                     "--repo", REPO_ID, "--no-progress", env=hub_env)
    assert result.returncode == 1 and "include publish in --only" in result.stderr
