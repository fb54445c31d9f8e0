"""A stage that does nothing but wait (and optionally fail): for DAG tests and orchestration benches.

It goes through the same launcher, spec, manifest and MLflow path as every real stage, so the
runner's behaviour (skip, concurrency, failure isolation, interruption) is tested on real jobs
that take no time to compute anything.
"""

from __future__ import annotations

import os
import time

from stages.engine import job
from stages.configs.base import NoopConfig
from data_recipes.config_fields import from_dict
from stages.contract import StageSpec
from stages.engine.tracking import MetricLogger


def run(spec: StageSpec) -> dict:
    cfg = from_dict(NoopConfig, spec.config)
    log = MetricLogger(spec)
    start = time.monotonic()
    ticks = 0
    while time.monotonic() < start + cfg.seconds:
        if job.preempt_requested():
            raise job.Preempted("asked to stop")
        if cfg.metric_every_s and time.monotonic() >= start + ticks * cfg.metric_every_s:
            log.log(ticks, {"tick": float(ticks)})
            ticks += 1
        time.sleep(0.05)
    if cfg.fail:
        raise RuntimeError(cfg.fail_message)
    log.log(0, {"waited_s": cfg.seconds})
    log.close()
    # the Ray cluster the driver told the job to use (PIPELINE_RAY_ADDRESS) and the threads its
    # launcher gave it: show what a real job would get
    return {"waited_s": cfg.seconds, "inputs": sorted(spec.inputs),
            "ray_address": os.environ.get("PIPELINE_RAY_ADDRESS", ""),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")}


if __name__ == "__main__":
    job.main(run)
