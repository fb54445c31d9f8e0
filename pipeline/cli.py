"""The `pipeline` command.

    pipeline run    RECIPE [key=value ...] [--ray-address ADDR]   run what is not done yet
                    [--only STAGE[,STAGE]] [--until STAGE] [--dry-run] [--cancel-on-interrupt]
    pipeline plan   RECIPE [key=value ...]                        DAG, budgets, cost; runs nothing
    pipeline status RECIPE [key=value ...]                        each stage's state and run id
    pipeline sync   RECIPE [key=value ...]                        send MLflow what an outage kept
    pipeline submit RECIPE [key=value ...] [--time T] [--partition P] [--cpus N] [--mem M]
                                                      `pipeline run` as a small Slurm CPU job
    pipeline export RECIPE STAGE [key=value ...] [--out DIR] [--dtype D]   a finished stage as
                                                                  a Hugging Face model directory

`--only a,b` runs stages a and b and whatever they need; `--until s` runs every stage up to and
including s in graph order; `pipeline status` shows the stages left out as pending.
`--dry-run` prints how every stage would start (Slurm stages: the sbatch script, also written to
the stage's output dir) and submits nothing. On Ctrl-C, Slurm stage jobs keep running (a rerun
re-attaches to them) unless `--cancel-on-interrupt` is given.

Overrides are OmegaConf dotlists: `stages.pretrain.phases.2.tokens=65536`.
Exit codes: 0 ok, 1 a stage failed, 2 bad recipe, 3 workdir in use, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.graph import build_graph, select_stages
from pipeline.recipe import RecipeError
from pipeline.state import stage_state
from pipeline.validate import load_recipe, probe_teacher_servers

EXIT_BAD_RECIPE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run every stage that is not complete"),
                        ("plan", "print the DAG, token budgets, steps and a GPU-hours estimate"),
                        ("status", "print each stage's state, output dir and MLflow run id"),
                        ("sync", "send MLflow what a tracking-server outage kept back"),
                        ("submit", "sbatch the driver (`pipeline run`) as a small CPU job")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist)")
        if name == "run":
            p.add_argument("--ray-address", help="join this Ray cluster instead of a local one")
            p.add_argument("--only", type=lambda v: [s for s in v.split(",") if s],
                           help="run only these stages (comma-separated) and what they need")
            p.add_argument("--until", help="run the stages up to and including this one")
            p.add_argument("--dry-run", action="store_true",
                           help="print each stage's launch (sbatch script or command); run nothing")
            p.add_argument("--cancel-on-interrupt", action="store_true",
                           help="on Ctrl-C, scancel running Slurm stage jobs (default: leave them)")
        if name == "submit":
            p.add_argument("--time", help="the driver job's time limit (it requeues itself at it)")
            p.add_argument("--partition", help="default: the recipe's launcher.partition")
            p.add_argument("--cpus", type=int, default=2, help="CPUs of the driver job (2)")
            p.add_argument("--mem", default="4G", help="memory of the driver job (4G)")
    p = sub.add_parser("export", help="write a finished stage's checkpoint as a Hugging Face dir")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("stage", help="the stage whose latest checkpoint is exported")
    p.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist)")
    p.add_argument("--out", help="output dir (default: <workdir>/exports/<stage dir name>)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        graph = build_graph(recipe)
        if args.command == "run" and (args.only or args.until):
            graph = select_stages(graph, args.only, args.until)
        if args.command == "run" and not args.dry_run:  # served teachers of the stages to run
            todo = {n for n, node in graph.items() if stage_state(node.output_dir).state != "done"}
            if problems := probe_teacher_servers(recipe, todo):
                raise RecipeError(problems)
    except RecipeError as e:
        for key, msg in e.problems:
            print(f"error: {key}: {msg}" if key else f"error: {msg}", file=sys.stderr)
        return EXIT_BAD_RECIPE

    if args.command == "plan":
        from pipeline.plan import render_plan

        print(render_plan(recipe, graph))
        _print_slurm_scripts(graph)
        return 0
    if args.command == "status":
        return _status(graph)
    if args.command == "sync":
        return _sync(recipe, graph)
    if args.command == "submit":
        return _submit(recipe, args)
    if args.command == "export":
        from pipeline.export import export_stage

        try:
            return export_stage(graph, args.stage, args.out, args.dtype)
        except RecipeError as e:
            print("\n".join(f"error: {k}: {m}" if k else f"error: {m}" for k, m in e.problems),
                  file=sys.stderr)
            return EXIT_BAD_RECIPE
    return _run(recipe, graph, args)


def _run(recipe, graph, args) -> int:
    from pathlib import Path

    from pipeline.runner import EXIT_BUSY, run_graph
    from pipeline.state import LockedError
    from pipeline.tracking import Tracker

    chosen = " selected by --only/--until" if args.only or args.until else ""
    print(f"pipeline {recipe.name!r}: {len(graph)} stages{chosen}, workdir {recipe.workdir}",
          flush=True)
    if args.dry_run:
        from pipeline.runner import dry_run

        return dry_run(graph)
    try:
        return run_graph(graph, lambda: Tracker(recipe), ray_address=args.ray_address,
                         workdir=Path(recipe.workdir),
                         cancel_on_interrupt=args.cancel_on_interrupt)
    except LockedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUSY


def _submit(recipe, args) -> int:
    from pathlib import Path

    from launch import slurm

    workdir = Path(recipe.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "driver.sbatch.sh"
    script.write_text(slurm.render_driver_script(
        [str(Path(args.recipe).resolve()), *args.overrides], workdir, recipe.launcher,
        cpus=args.cpus, mem=args.mem, time_limit=args.time, partition=args.partition))
    try:
        job_id = slurm.submit_script(script)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"submitted the driver as slurm job {job_id}; log {workdir / 'driver.log'}; "
          f"`pipeline status {args.recipe}` shows the stages")
    return 0


def _print_slurm_scripts(graph) -> None:
    from pipeline.runner import launch_text

    for name, node in graph.items():
        if node.launcher.kind == "slurm":
            print(f"== {name}: sbatch script ({node.output_dir}/sbatch.sh when run)")
            print(launch_text(node, graph))


def _sync(recipe, graph) -> int:
    from pathlib import Path

    from pipeline.runner import EXIT_BUSY
    from pipeline.state import LockedError, WorkdirLock
    from pipeline.tracking import Tracker

    try:
        with WorkdirLock(Path(recipe.workdir)):  # a live run's jobs are still sending
            tracker = Tracker(recipe)
            if not tracker.sync(graph):
                print(f"error: {tracker.uri} cannot be reached; nothing was lost, try again later",
                      file=sys.stderr)
                return 1
    except LockedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUSY
    print(f"MLflow at {tracker.uri} has everything of {recipe.name!r}")
    return 0


def _status(graph) -> int:
    from pipeline.state import stage_state

    w = max(len(n) for n in graph) + 2
    print(f"{'stage':<{w}}{'kind':<11}{'state':<13}{'mlflow run':<34}output")
    for name, node in graph.items():
        st = stage_state(node.output_dir)
        print(f"{name:<{w}}{node.kind:<11}{st.state:<13}{st.run_id or '-':<34}{node.output_dir}")
        if st.detail and st.state != "done":
            print(f"{'':<{w}}{st.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
