"""A work directory damaged by hand: found on resume with the file named; only the damaged shard is redone."""

import json

import pytest

from densefusion_hf.errors import UserError
from densefusion_hf.recipe import load_recipe
from densefusion_hf.runners.local import build
from densefusion_hf.stages.shards import StageDir
from tests.conftest import write_metadata, write_recipe


@pytest.fixture
def ingested(tmp_path):
    """An ingest-only build of 3 shards (no downloads), and a function that reruns it."""
    write_metadata(tmp_path / "meta.parquet", [{"URL": f"http://images.example/{i}.jpg"} for i in range(9)])
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", {
        "name": "damage", "stages": ["ingest"],
        "source": {"metadata": ["meta.parquet"], "rows_per_shard": 3}}))
    workdir = tmp_path / "work"
    build(recipe, workdir, show_progress=False)
    out = StageDir(workdir, "ingest")
    return out, lambda: build(recipe, workdir, show_progress=False)


def _snapshot(out):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.path.glob("shard-*"))}


DAMAGE = {
    "truncated shard": (lambda out: out.shard_path("00001").write_bytes(out.shard_path("00001").read_bytes()[:-40]),
                        "shard-00001.parquet is .* bytes; its done marker recorded"),
    "shard removed": (lambda out: out.shard_path("00001").unlink(), "shard-00001.parquet is missing"),
    "dropped rows removed": (lambda out: out.dropped_path("00001").unlink(), "shard-00001.dropped.parquet is missing"),
    "stats not JSON": (lambda out: out.stats_path("00001").write_text("{not json" + " " * 400),
                       "shard-00001.stats.json"),
    "stats edited": (lambda out: out.stats_path("00001").write_text(
        out.stats_path("00001").read_text().replace('"rows_in": 3', '"rows_in": 4')), "checksum"),
    "marker garbled": (lambda out: out.done_path("00001").write_text("oops"), "shard-00001.done is not a done marker"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_shard_is_named_and_redone_and_nothing_else_is_touched(ingested, capfd, case):
    out, rerun = ingested
    before = _snapshot(out)
    damage, message = DAMAGE[case]
    damage(out)
    capfd.readouterr()
    assert out.verify("00001") is not None
    rerun()
    err = capfd.readouterr().err
    assert "ingest: shard 00001 is damaged" in err and __import__("re").search(message, err), err
    after = _snapshot(out)
    for name, (data, mtime) in before.items():
        if "00001" not in name:
            assert after[name] == (data, mtime), f"{name} was rewritten"
        elif name.endswith(".parquet"):
            assert after[name][0] == data, name  # the redone shard has the same rows as before
    timeless = [{k: v for k, v in json.loads(b).items() if k != "seconds"}
                for b in (before["shard-00001.stats.json"][0], after["shard-00001.stats.json"][0])]
    assert timeless[0] == timeless[1]
    assert out.verify("00001", checksums=True) is None


def test_a_clean_resume_verifies_every_shard_and_rewrites_nothing(ingested, capfd):
    out, rerun = ingested
    before = _snapshot(out)
    rerun()
    assert "damaged" not in capfd.readouterr().err
    assert _snapshot(out) == before
    assert all(out.verify(s, checksums=True) is None for s in out.done_shards())


def test_a_same_size_edit_of_a_data_file_is_found_by_the_checksum(ingested):
    out, _ = ingested
    path = out.shard_path("00002")
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert out.verify("00002") is None  # the cheap check: size and footer are right
    assert "checksum" in out.verify("00002", checksums=True)


def test_a_manifest_edited_by_hand_is_refused_with_its_name(ingested):
    out, rerun = ingested
    manifest = out.path.parent / "manifest.json"
    data = json.loads(manifest.read_text())
    data["stages"]["ingest"]["fingerprint"] = "0" * 16
    manifest.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"manifest\.json was edited by hand"):
        rerun()
    manifest.write_text(json.dumps({"created": "x"}))
    with pytest.raises(UserError, match=r"manifest\.json has no 'stages'"):
        rerun()
