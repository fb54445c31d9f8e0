"""The common body of every stage job: run the stage, then say how it ended.

    if __name__ == "__main__":
        job.main(run)          # run(spec) -> dict of what was produced (goes into the manifest)

Preemption: SIGTERM / SIGUSR1 set a flag (`preempt_requested()`); a training loop checks it at step
boundaries, checkpoints, and raises `Preempted`. The job then exits with EXIT_PREEMPTED. Under
Slurm its batch script (launch/slurm.py) then requeues the job, which resumes from the checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Any, Callable

from stages.contract import (EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, StageSpec, parse_spec_arg,
                             write_exit_status, write_manifest)
from stages.engine import ownership


class Preempted(Exception):
    """Raised after a checkpoint was written in answer to a preemption signal."""


_preempt_signal: int | None = None


def _on_signal(signum, _frame) -> None:
    global _preempt_signal
    if _preempt_signal is None:
        print(f"got {signal.Signals(signum).name}: will checkpoint at the next step boundary",
              flush=True)
    _preempt_signal = signum


def install_preemption_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _on_signal)


def preempt_requested() -> bool:
    return _preempt_signal is not None


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(run: Callable[[StageSpec], dict[str, Any]], argv: list[str] | None = None) -> None:
    spec = parse_spec_arg(argv)
    if ownership.started_by_torchrun():  # a worker must not outlive its torchrun agent
        if not ownership.torchrun_is_parent():
            print(f"{spec.name}: torchrun is gone before the worker started; exiting", flush=True)
            sys.exit(EXIT_FAILED)
        ownership.follow_parent()
    ownership.record_worker(spec.out, rank())
    install_preemption_handlers()
    if rank() == 0:  # before anything in the stage dir is read or written
        try:
            ownership.hold_stage_dir(spec.out)
        except ownership.StageDirBusy as e:  # no exit.json: that is the running job's to write
            print(f"{spec.name}: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_FAILED)
    if "SLURM_JOB_ID" in os.environ and rank() == 0:  # which start of a requeued job this is
        print(f"{spec.name}: slurm job {os.environ['SLURM_JOB_ID']}, SLURM_RESTART_COUNT="
              f"{os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
    try:
        produced = run(spec)
    except Preempted as e:
        if rank() == 0:
            write_exit_status(spec, "preempted", detail=str(e))
        print(f"{spec.name}: preempted ({e}); exiting with {EXIT_PREEMPTED}", flush=True)
        sys.exit(EXIT_PREEMPTED)
    except BaseException as e:  # noqa: BLE001 - every failure must be recorded before exiting
        traceback.print_exc()
        if rank() == 0:
            write_exit_status(spec, "failed", error=f"{type(e).__name__}: {e}")
        sys.exit(EXIT_FAILED)
    if rank() == 0:
        write_manifest(spec, produced)
        write_exit_status(spec, "done")
    sys.exit(EXIT_OK)
