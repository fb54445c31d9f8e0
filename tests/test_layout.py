"""The layout rules of ARCHITECTURE.md, checked on the source tree.

- The import contracts in pyproject.toml (`[tool.importlinter]`: the layers pipeline > launch >
  stages > data_recipes | schedulers, no torch/megatron in the driver, of `stages` the driver may
  use only `stages.configs` and `stages.contract`, no import cycles, ...) hold: `lint-imports`
  exits 0. Run it by hand with `lint-imports` in the repo root.
- Every stage entry module (`stages/<kind>.py`) is in that contract's forbidden list, so a new
  stage kind cannot slip past it.
- Module size (the layout issue's rule): no module of pipeline/, launch/, stages/, data_recipes/ or
  schedulers/ is over 400 lines, and their median is under 200. A module is every `.py` file in
  those folders, subpackages included, and its size is its number of lines as `wc -l` counts them
  (blank lines, comments and docstrings included). Empty files (package markers such as an empty
  `__init__.py`) are left out of the median: they hold no code and would only pull it down.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tomllib

from conftest import REPO

PACKAGES = ("pipeline", "launch", "stages", "data_recipes", "schedulers")
MAX_LINES = 400
MEDIAN_BELOW = 200


def _module_sizes() -> dict[str, int]:
    sizes = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            sizes[str(path.relative_to(REPO))] = len(path.read_text().splitlines())
    return {path: n for path, n in sizes.items() if n > 0}


def _lint_imports() -> list[str]:
    """The `lint-imports` script installed beside this Python (the `test` extra), else on PATH."""
    here = os.path.dirname(sys.executable)
    exe = shutil.which("lint-imports", path=here + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "lint-imports not found: pip install -e '.[test]' (import-linter)"
    return [exe, "--no-cache"]


def test_import_contracts_hold():
    run = subprocess.run(_lint_imports(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"lint-imports failed:\n{run.stdout}\n{run.stderr}"


def test_driver_contract_forbids_every_stage_entry_module():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    forbidden = set()
    for contract in config["contracts"]:
        if contract["type"] == "forbidden" and set(contract["source_modules"]) == {"pipeline",
                                                                                    "launch"}:
            forbidden |= set(contract["forbidden_modules"])
    job_side = {"stages.engine"} | {f"stages.{p.stem}" for p in (REPO / "stages").glob("*.py")
                                    if p.stem not in ("__init__", "contract")}
    assert job_side <= forbidden, ("add to the driver's forbidden stages modules in "
                                   f"pyproject.toml: {sorted(job_side - forbidden)}")


def test_no_module_over_400_lines():
    over = {path: n for path, n in _module_sizes().items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_median_module_under_200_lines():
    sizes = _module_sizes()
    median = statistics.median(sizes.values())
    assert median < MEDIAN_BELOW, (f"median module size {median} lines over {len(sizes)} modules "
                                   f"(must be under {MEDIAN_BELOW})")
