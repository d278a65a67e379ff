"""Valid recipes mutated at random: each case loads or fails with a RecipeError naming the field, never a traceback."""

import math
import re
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from densefusion_hf.errors import RecipeError
from densefusion_hf.recipe import load_recipe

DEMO = yaml.safe_load((Path(__file__).parent.parent / "builders" / "demo.yaml").read_text())


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, prefix + (key,))
    yield prefix


PATHS = [p for p in _leaves(DEMO) if p]
ODD = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.just(math.nan), st.just(math.inf),
                st.floats(allow_nan=False), st.text(max_size=20), st.just([]), st.lists(st.integers(), max_size=3),
                st.dictionaries(st.text(max_size=5), st.integers(), max_size=2), st.just(-1), st.just(0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), value=ODD, action=st.sampled_from(["set", "delete", "unknown"]))
def test_a_mutated_recipe_loads_or_names_the_field(tmp_path, path, value, action):
    recipe = yaml.safe_load(yaml.safe_dump(DEMO))
    parent = recipe
    for key in path[:-1]:
        parent = parent[key]
    if action == "set":
        parent[path[-1]] = value
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent["no_such_field"] = value
    target = tmp_path / "recipe.yaml"
    target.write_text(yaml.safe_dump(recipe))
    try:
        load_recipe(target)
    except RecipeError as exc:
        message = str(exc)
        named = path[-1] if action != "unknown" else "no_such_field"
        # the message names the file and a field: the mutated one, or the one it makes inconsistent
        # (embed.model: null turns the stage off, and then `stages` is what is wrong)
        assert re.match(rf"{re.escape(str(target))}: [\w.\[\]()' -]+:", message), message
        assert str(named) in message or path[0] in message or "stages" in message, message
