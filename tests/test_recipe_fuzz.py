"""Recipe validation is total, shown by fuzzing the shipped recipes with hypothesis.

Each example mutates `recipes/tiny.yaml` or the flagship `recipes/nanbeige3b.yaml` at a random
path (delete a key, change a type, empty a list or map, a negative / zero / huge number, an
unknown key, a reference pointed at another stage) and runs `pipeline plan` on it. Every mutation
must end as one of two things: a valid plan (exit 0), or exit 2 with one-line errors that each
name a key path. Never a traceback, never a stage dir created.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = {name: yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
           for name in ("tiny", "nanbeige3b")}
EXAMPLES = 40  # per recipe, 0.3-1.4 s each; a wider sweep ran while fixing (see the note)
ERROR_LINE = re.compile(r"error: [A-Za-z_][\w.\[\]-]*: \S")

MUTATIONS = ("delete", "string", "list", "map", "bool", "null", "negative", "zero", "huge",
             "empty", "unknown_key", "other_stage")


def all_paths(node, prefix=()):
    if prefix:
        yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from all_paths(value, prefix + (key,))


def mutate(doc: dict, path: tuple, how: str, other_stage: str) -> None:
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if how == "delete":
        del parent[key]
    elif how == "unknown_key":
        target = value if isinstance(value, dict) else parent if isinstance(parent, dict) else None
        if target is None:
            parent[key] = {"no_such_key": 1}
        else:
            target["no_such_key"] = 1
    else:
        parent[key] = {
            "string": "not-a-value", "list": [1, "x"], "map": {"x": 1}, "bool": True, "null": None,
            "negative": -abs(value) - 1 if number else -1, "zero": 0,
            "huge": 10 ** 30 if not isinstance(value, float) else 1e300,
            "empty": {} if isinstance(value, dict) else [] if isinstance(value, list) else "",
            "other_stage": other_stage}[how]


def plan(doc: dict, root: Path) -> tuple[int, str]:
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["plan", str(recipe)])
    return code, err.getvalue()


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_mutation_is_a_valid_plan_or_key_path_errors(name):
    base = copy.deepcopy(RECIPES[name])
    paths = [p for p in all_paths(base) if p[0] != "workdir"]
    stages = list(base["stages"])

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],  # inputs are drawn from lists: no shrinking
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(paths), st.sampled_from(MUTATIONS), st.sampled_from(stages))
    def check(path, how, other_stage):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            doc = copy.deepcopy(base)
            doc["workdir"] = str(root / "work")
            mutate(doc, path, how, other_stage)
            code, err = plan(doc, root)  # an exception here is the traceback a user would see
            where = f"{how} at {'.'.join(map(str, path))}"
            assert code in (0, 2), f"{where}: exit {code}\n{err}"
            if code == 2:
                lines = err.strip().splitlines()
                assert lines, f"{where}: exit 2 with no error line"
                bad = [line for line in lines if not ERROR_LINE.match(line)]
                assert not bad, f"{where}: error lines without a key path: {bad}"
            assert not (root / "work").exists(), f"{where}: plan created {root / 'work'}"

    check()
