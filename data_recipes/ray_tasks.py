"""Ray for the parallel CPU work of stage jobs (refining prompt shards, tokenizing), hidden here.

Stage jobs never import Ray: they call `as_finished` (a function over many argument tuples, one
Ray task each, results as the tasks finish), and data_recipes.indexed_shards runs its own ordered,
bounded window of tasks. Both start from `init_ray`: the pipeline's cluster (PIPELINE_RAY_ADDRESS)
or a local Ray.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator


WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}
"""The environment of every Ray worker, set once on the cluster (its processes inherit it from
the process that starts it) instead of per task: a task with a runtime_env cannot use a job's
prestarted or idle workers, so every job waited for fresh ones (bench/orchestration.py).
MALLOC_ARENA_MAX: Ray runs tasks off the main thread, glibc then gives each thread its own malloc
arena and the freed token lists fragment them (2x the worker memory without this cap). A cluster
started by hand (`ray start`, --ray-address) should be started with it exported."""


def set_worker_env() -> None:
    """Put WORKER_ENV into os.environ (values already set win), before a local cluster starts:
    glibc reads it at process start, so this process is unaffected and the cluster's are not."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)


def init_ray() -> bool:
    """Connect to PIPELINE_RAY_ADDRESS or start a local Ray, unless one is up; True if started."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("PIPELINE_RAY_ADDRESS")
    if not address:
        set_worker_env()
    ray.init(address=address or "local", num_cpus=None if address else os.cpu_count(),
             include_dashboard=False, logging_level="WARNING")
    return True


def as_finished(fn: Callable[..., Any], arg_tuples: Iterable[tuple], *,
                num_cpus: float = 1) -> Iterator[Any]:
    """fn(*args) for every args as a Ray task (`num_cpus` each, all submitted at once), each
    result yielded as soon as its task finishes (so not in the order of `arg_tuples`)."""
    import ray

    init_ray()
    task = ray.remote(num_cpus=num_cpus)(fn)
    pending = [task.remote(*args) for args in arg_tuples]
    while pending:
        ready, pending = ray.wait(pending)
        yield from ray.get(ready)
