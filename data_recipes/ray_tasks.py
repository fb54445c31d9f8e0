"""Ray for the parallel CPU work of stage jobs (refining prompt shards, tokenizing), hidden here.

Stage jobs never import Ray: they call `as_finished` (a function over many argument tuples, one
Ray task each, results as the tasks finish), and data_recipes.indexed_shards runs its own ordered,
bounded window of tasks. Both start from `init_ray`: the pipeline's cluster (PIPELINE_RAY_ADDRESS)
or a local Ray.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator


def init_ray() -> bool:
    """Connect to PIPELINE_RAY_ADDRESS or start a local Ray, unless one is up; True if started."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("PIPELINE_RAY_ADDRESS")
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
