"""Recipe validation: every kind of mistake names the file, the field, what was found and what is allowed."""

from pathlib import Path

import pytest

from densefusion_hf.errors import RecipeError
from densefusion_hf.recipe import STAGE_ORDER, load_recipe, recipe_fields
from tests.conftest import DEMO_RECIPE, write_recipe

MINIMAL = {"name": "tiny", "source": {"metadata": ["meta/*.parquet"]}}


def load(tmp_path: Path, recipe: dict):
    return load_recipe(write_recipe(tmp_path / "builders" / "r.yaml", recipe))


def error_of(tmp_path: Path, recipe: dict) -> str:
    with pytest.raises(RecipeError) as info:
        load(tmp_path, recipe)
    return str(info.value)


def test_minimal_recipe_gets_defaults_and_resolves_paths_against_its_folder(tmp_path):
    recipe = load(tmp_path, MINIMAL)
    assert recipe.source.metadata == [tmp_path / "builders" / "meta" / "*.parquet"]
    assert recipe.stages == [s for s in STAGE_ORDER if s not in ("embed", "semdedup", "caption")]
    assert recipe.source.columns.url == "URL" and recipe.fetch.resize.max_side is None
    assert recipe.filters.min_short_side is None
    assert len(recipe.sha256) == 64


def test_absolute_paths_stay_absolute(tmp_path):
    recipe = load(tmp_path, {"name": "tiny", "source": {"metadata": ["/data/laion/*.parquet"]}})
    assert recipe.source.metadata == [Path("/data/laion/*.parquet")]


def test_unknown_key_names_path_and_suggests(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "fetch": {"timout": 3}})
    assert "r.yaml" in message and "fetch.timout" in message
    assert "unknown field" in message and "Did you mean 'timeout'" in message
    assert "retries" in message  # the allowed fields are listed


def test_unknown_top_level_key(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "sorce": {}})
    assert "sorce: unknown field" in message and "Did you mean 'source'" in message


def test_wrong_type_says_found_and_expected(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "fetch": {"resize": {"max_side": "big"}}})
    assert "fetch.resize.max_side" in message
    assert "'big' (str)" in message and "an integer" in message


def test_bool_is_not_an_integer(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "fetch": {"retries": True}})
    assert "fetch.retries: expected an integer, found True (bool)" in message


def test_missing_required_field(tmp_path):
    message = error_of(tmp_path, {"source": {"sample": True}})
    assert "name: required field is missing" in message


def test_limits_are_checked(tmp_path):
    assert "must be <= 1" in error_of(tmp_path, {**MINIMAL, "filters": {"max_punsafe": 1.5}})
    assert "must be >= 1" in error_of(tmp_path, {**MINIMAL, "source": {"sample": True, "rows_per_shard": 0}})
    assert "must match the pattern" in error_of(tmp_path, {**MINIMAL, "name": "Bad Name"})


def test_literal_choices_are_listed(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "fetch": {"encode_format": "gif"}})
    assert "one of 'jpg', 'png', 'webp'" in message


def test_list_items_are_checked_with_their_index(tmp_path):
    message = error_of(tmp_path, {"name": "x", "source": {"metadata": ["ok.parquet", 3]}})
    assert "source.metadata[1]" in message


def test_source_needs_exactly_one_of_metadata_or_sample(tmp_path):
    assert "exactly one" in error_of(tmp_path, {"name": "x", "source": {}})
    assert "exactly one" in error_of(tmp_path, {"name": "x", "source": {"sample": True, "metadata": ["a"]}})


def test_filter_without_its_column_is_an_error(tmp_path):
    recipe = {**MINIMAL, "source": {"metadata": ["m"], "columns": {"punsafe": None}}, "filters": {"max_punsafe": 0.5}}
    assert "source.columns.punsafe is null" in error_of(tmp_path, recipe)


def test_stages_must_be_known_and_in_order(tmp_path):
    assert "one of 'ingest'" in error_of(tmp_path, {**MINIMAL, "stages": ["ingest", "captions"]})
    assert "build order" in error_of(tmp_path, {**MINIMAL, "stages": ["fetch", "ingest"]})
    assert "starts with ingest, then fetch" in error_of(tmp_path, {**MINIMAL, "stages": ["ingest", "publish"]})


def test_not_a_mapping_and_bad_yaml(tmp_path):
    assert "expected a mapping" in error_of(tmp_path, ["a", "list"])
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_shipped_recipes_are_valid():
    recipe = load_recipe(DEMO_RECIPE)
    assert recipe.source.sample and recipe.name == "densefusion-demo"


def test_paper_recipes_carry_the_papers_numbers():
    builders = DEMO_RECIPE.parent
    full = load_recipe(builders / "densefusion-1m.yaml")
    assert full.filters.min_short_side == full.select.min_short_side == 448
    assert (full.semdedup.clusters, full.semdedup.eps) == (50_000, 0.4)
    assert (full.select.top_per_cluster, full.select.target_size) == (20, 1_000_000)
    assert full.select.subset is None
    subset = load_recipe(builders / "densefusion-4v-100k.yaml")
    assert subset.name == "densefusion-4v-100k" and (subset.select.subset.size, subset.select.subset.seed) == (100_000, 0)
    # Everything else is inherited from the 1M recipe.
    assert subset.semdedup == full.semdedup and subset.embed == full.embed and subset.source == full.source
    assert subset.select.top_per_cluster == 20 and subset.sha256 != full.sha256


def test_extends_merges_sections_and_reports_cycles(tmp_path):
    write_recipe(tmp_path / "base.yaml", {**MINIMAL, "fetch": {"timeout": 3, "retries": 2}})
    child = load(tmp_path, {"extends": "../base.yaml", "name": "child", "fetch": {"retries": 5}})
    assert child.name == "child" and (child.fetch.timeout, child.fetch.retries) == (3.0, 5)
    write_recipe(tmp_path / "a.yaml", {"extends": "b.yaml", "name": "a"})
    write_recipe(tmp_path / "b.yaml", {"extends": "a.yaml", "name": "b"})
    with pytest.raises(RecipeError, match="extends itself"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match="not found .extended by"):
        load(tmp_path, {"extends": "missing.yaml"})


def test_every_field_is_documented():
    rows = recipe_fields()
    paths = [path for path, _, _ in rows]
    assert "fetch.resize.max_side" in paths and "source.columns.url" in paths
    assert all(text for _, kind, text in rows), [p for p, _, t in rows if not t]
