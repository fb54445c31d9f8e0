"""A bounded thread pool for checks that mostly wait on a sandbox process."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


def parallel(fn: Callable, items: list, max_workers: int | None) -> list:
    """fn over items, in order, on a bounded thread pool (each call mostly waits on a sandbox)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    workers = max_workers or min(len(items), 32, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))
