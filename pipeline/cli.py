"""The `pipeline` command.

    pipeline run    RECIPE [key=value ...] [--ray-address ADDR]   run what is not done yet
    pipeline plan   RECIPE [key=value ...]                        DAG, budgets, cost; runs nothing
    pipeline status RECIPE [key=value ...]                        each stage's state and run id

Overrides are OmegaConf dotlists: `stages.pretrain.phases.2.tokens=65536`.
Exit codes: 0 ok, 1 a stage failed, 2 bad recipe, 3 workdir in use, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.recipe import RecipeError, load_recipe

EXIT_BAD_RECIPE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run every stage that is not complete"),
                        ("plan", "print the DAG, token budgets, steps and a GPU-hours estimate"),
                        ("status", "print each stage's state, output dir and MLflow run id")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist)")
        if name == "run":
            p.add_argument("--ray-address", help="join this Ray cluster instead of a local one")
    args = parser.parse_args(argv)

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        from pipeline.graph import build_graph

        graph = build_graph(recipe)
    except RecipeError as e:
        for key, msg in e.problems:
            print(f"error: {key}: {msg}" if key else f"error: {msg}", file=sys.stderr)
        return EXIT_BAD_RECIPE

    if args.command == "plan":
        from pipeline.plan import render_plan

        print(render_plan(recipe, graph))
        return 0
    if args.command == "status":
        return _status(graph)
    return _run(recipe, graph, args)


def _run(recipe, graph, args) -> int:
    from pathlib import Path

    from pipeline.runner import EXIT_BUSY, run_graph
    from pipeline.state import LockedError
    from pipeline.tracking import Tracker

    slurm = [name for name, node in graph.items() if node.launcher.kind == "slurm"]
    if slurm:  # planned (issue: Slurm launcher); refuse before anything starts rather than half-run
        print(f"error: stages {', '.join(slurm)} use launcher.kind=slurm, which this version cannot "
              "launch yet; use `pipeline plan`, or set launcher.kind=local", file=sys.stderr)
        return EXIT_BAD_RECIPE
    print(f"pipeline {recipe.name!r}: {len(graph)} stages, workdir {recipe.workdir}", flush=True)
    try:
        return run_graph(graph, lambda: Tracker(recipe), ray_address=args.ray_address,
                         workdir=Path(recipe.workdir))
    except LockedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUSY


def _status(graph) -> int:
    from pipeline.state import stage_state

    print(f"{'stage':<14}{'kind':<11}{'state':<13}{'mlflow run':<34}output")
    for name, node in graph.items():
        st = stage_state(node.output_dir)
        print(f"{name:<14}{node.kind:<11}{st.state:<13}{st.run_id or '-':<34}{node.output_dir}")
        if st.detail and st.state != "done":
            print(f"{'':<14}{st.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
