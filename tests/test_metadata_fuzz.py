"""Valid metadata files mutated at random: ingest ends in a UserError naming the file (and the column), or
in kept rows and recorded drops that account for every row, never a traceback."""

import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from densefusion_hf.errors import UserError
from densefusion_hf.recipe import load_recipe
from densefusion_hf.runners.local import build
from densefusion_hf.stages.shards import StageDir
from tests.conftest import write_recipe

ROWS = 6
COLUMNS = ["URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark"]
NUMBERS = ["WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark"]


def valid_columns() -> dict[str, pa.Array]:
    return {
        "URL": pa.array([f"http://images.example/{i}.jpg" for i in range(ROWS)]),
        "TEXT": pa.array([f"a photo of thing {i}" for i in range(ROWS)]),
        "WIDTH": pa.array([640.0, 512.0, 300.0, 1024.0, 800.0, 256.0]),
        "HEIGHT": pa.array([480.0, 512.0, 300.0, 200.0, 600.0, 256.0]),
        "similarity": pa.array([0.31, 0.25, 0.4, 0.33, 0.29, 0.35]),
        "punsafe": pa.array([0.01, 0.2, 0.05, 0.0, 0.9, 0.1]),
        "pwatermark": pa.array([0.02, 0.1, 0.5, 0.3, 0.05, 0.0]),
    }


def not_utf8(values: list[bytes | None]) -> pa.Array:
    """A string column whose bytes are not all UTF-8 (pyarrow writes them as they are)."""
    return pa.array(values, pa.binary()).view(pa.string())


ROW = st.integers(0, ROWS - 1)
ODD_TEXT = st.one_of(st.just(""), st.just("   "), st.text(max_size=30),
                     st.just("http://images.example/a photo with spaces.jpg"),
                     st.just("http://bilder.example/fotoğraf-日本語.jpg"), st.just("not a url at all"))
ODD_NUMBER = st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.just(1e308),
                       st.just(-1e300), st.just(0.0), st.just(-5.0), st.floats(), st.integers(-2**62, 2**62))
BAD_BYTES = st.binary(min_size=1, max_size=12).map(lambda b: b"\xff" + b)  # 0xff never occurs in UTF-8


def mutation():
    column = st.sampled_from(COLUMNS)
    return st.one_of(
        st.tuples(st.just("drop"), column),
        st.tuples(st.just("nulls"), column, st.lists(ROW, min_size=1, max_size=ROWS)),
        st.tuples(st.just("type"), column, st.sampled_from(["int", "float", "bool", "list", "struct", "binary",
                                                            "text", "null", "dictionary", "large_string"])),
        st.tuples(st.just("not_utf8"), st.sampled_from(["URL", "TEXT", "WIDTH"]), ROW, BAD_BYTES),
        st.tuples(st.just("text"), st.sampled_from(["URL", "TEXT"]), ROW, ODD_TEXT),
        st.tuples(st.just("number"), st.sampled_from(NUMBERS), ROW, ODD_NUMBER),
        st.tuples(st.just("truncate"), st.integers(1, 200)),
    )


def retyped(values: pa.Array, kind: str) -> pa.Array:
    items = values.to_pylist()
    if kind == "int":
        return pa.array(list(range(len(items))), pa.int64())
    if kind == "float":
        return pa.array([float(i) + 0.5 for i in range(len(items))])
    if kind == "bool":
        return pa.array([i % 2 == 0 for i in range(len(items))])
    if kind == "list":
        return pa.array([[i, i] for i in range(len(items))])
    if kind == "struct":
        return pa.array([{"value": str(v)} for v in items])
    if kind == "binary":
        return pa.array([None if v is None else str(v).encode() for v in items], pa.binary())
    if kind == "text":
        return pa.array([None if v is None else str(v) for v in items], pa.string())
    if kind == "null":
        return pa.nulls(len(items))
    if kind == "large_string":
        return pa.array([None if v is None else str(v) for v in items], pa.large_string())
    return pa.array([None if v is None else str(v) for v in items]).dictionary_encode()


def mutate(columns: dict[str, pa.Array], action: str, name: str, *args) -> None:
    if action == "drop":
        del columns[name]
    elif action == "type":
        columns[name] = retyped(columns[name], args[0])
    elif action == "not_utf8":
        row, raw = args
        columns[name] = not_utf8([raw if i == row else str(v).encode() for i, v in
                                  enumerate(columns[name].cast(pa.string()).to_pylist())])
    else:
        values = columns[name].to_pylist()
        if action == "nulls":
            columns[name] = pa.array([None if i in args[0] else v for i, v in enumerate(values)],
                                     columns[name].type)
        elif action == "text" and pa.types.is_string(columns[name].type):
            values[args[0]] = args[1]
            columns[name] = pa.array(values, pa.string())
        elif action == "number" and pa.types.is_floating(columns[name].type):
            values[args[0]] = float(args[1])
            columns[name] = pa.array(values, pa.float64())


def write_mutated(path: Path, mutations) -> None:
    columns = valid_columns()
    truncate = None
    for action, *args in mutations:
        if action == "truncate":
            truncate = args[0]
        elif args[0] in columns:
            try:
                mutate(columns, action, *args)
            except (pa.ArrowException, UnicodeDecodeError, TypeError, ValueError):
                pass  # a mutation that cannot apply to what an earlier one left (bytes of a list column)
    pq.write_table(pa.table(columns) if columns else pa.table({"other": pa.array(range(ROWS))}), path)
    if truncate is not None:
        data = path.read_bytes()
        path.write_bytes(data[: max(0, len(data) - truncate)])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(mutations=st.lists(mutation(), min_size=1, max_size=3), second=st.lists(mutation(), max_size=2))
def test_a_mutated_metadata_file_is_ingested_or_refused_by_name(mutations, second):
    """Two files (shards span both): the first mutated, the second mutated otherwise or left valid."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        meta, other = folder / "meta-0.parquet", folder / "meta-1.parquet"
        write_mutated(meta, mutations)
        write_mutated(other, second)
        recipe = load_recipe(write_recipe(folder / "recipe.yaml", {
            "name": "fuzz", "stages": ["ingest"], "source": {"metadata": ["meta-*.parquet"], "rows_per_shard": 4},
            "filters": {"min_short_side": 256, "max_aspect_ratio": 4.0, "max_punsafe": 0.5,
                        "min_similarity": 0.2, "max_pwatermark": 0.4}}))
        try:
            build(recipe, folder / "work", show_progress=False)
        except UserError as exc:
            message = str(exc)
            assert str(meta) in message or str(other) in message, message
            assert "Parquet" in message or any(repr(c) in message for c in COLUMNS + ["other"]), message
            event("refused with a UserError")
            return
        out = StageDir(folder / "work", "ingest")
        kept = [row for shard in out.done_shards() for row in out.read(shard).to_pylist()]
        drops = out.read_dropped().to_pylist()
        event("ingested, bad_metadata drops" if any(d["reason"] == "bad_metadata" for d in drops) else "ingested")
        assert len(kept) + len(drops) == 2 * ROWS
        for row in kept:
            assert isinstance(row["url"], str) and row["url"].strip() == row["url"] != ""
            assert row["width"] is None or abs(row["width"]) <= 2 ** 31
        for drop in drops:
            assert drop["reason"] and drop["detail"], drop
            if drop["reason"] == "bad_metadata":
                assert f"({meta})" in drop["detail"] or f"({other})" in drop["detail"], drop
                assert any(drop["detail"].startswith(c + " ") for c in COLUMNS), drop


def test_the_known_bad_values_are_drops_named_by_column(tmp_path):
    columns = valid_columns()
    columns["TEXT"] = not_utf8([b"fine", b"\xff\xfe broken", b"ok", b"ok", b"ok", b"ok"])
    columns["WIDTH"] = pa.array([640.0, 512.0, math.inf, 1e300, math.nan, 256.0])
    columns["URL"] = pa.array(["http://images.example/0.jpg", "http://images.example/1.jpg",
                               "http://images.example/2.jpg", "http://images.example/3.jpg",
                               " http://images.example/ünï cödé 4.jpg ", ""])
    pq.write_table(pa.table(columns), tmp_path / "meta.parquet")
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", {
        "name": "bad", "stages": ["ingest"], "source": {"metadata": ["meta.parquet"]}}))
    build(recipe, tmp_path / "work", show_progress=False)
    out = StageDir(tmp_path / "work", "ingest")
    kept = [row for shard in out.done_shards() for row in out.read(shard).to_pylist()]
    assert [r["url"] for r in kept] == ["http://images.example/0.jpg", "http://images.example/ünï cödé 4.jpg"]
    assert kept[1]["width"] is None  # NaN: an unknown size, which the filters let through
    drops = {d["url"]: d for d in out.read_dropped().to_pylist()}
    assert drops["http://images.example/1.jpg"]["reason"] == "bad_metadata"
    meta = tmp_path / "meta.parquet"
    assert drops["http://images.example/1.jpg"]["detail"] == f"TEXT is not UTF-8 text: b'\\xff\\xfe broken' ({meta})"
    assert drops["http://images.example/2.jpg"]["detail"] == f"WIDTH inf is not a pixel count ({meta})"
    assert drops["http://images.example/3.jpg"]["detail"] == f"WIDTH 1e+300 is not a pixel count ({meta})"
    assert drops[""]["reason"] == "no_url"

    pq.write_table(pa.table(dict(valid_columns(), URL=pa.array([[i] for i in range(ROWS)]))), meta)
    with pytest.raises(UserError, match=r"meta.parquet: column 'URL' \(source.columns.url\) holds list<"):
        build(recipe, tmp_path / "work2", show_progress=False)
    (tmp_path / "meta.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match=r"meta.parquet: not a readable Parquet metadata file"):
        build(recipe, tmp_path / "work3", show_progress=False)
