"""Start a stage job as a Slurm batch job, watch it, and tell how it ended.

The job is `<output_dir>/sbatch.sh` (see `render_script`): one srun task per node runs torchrun,
which starts `nproc_per_node` workers of `python -m stages.<kind> --spec <output_dir>/spec.json`;
with several nodes torchrun meets on the first node (c10d rendezvous). Output goes, appended, to
`<output_dir>/job.log`, every start of the job into the same file and the same output dir.

Preemption and time limits, the job's side: Slurm sends SIGUSR1 `signal_grace_s` before the time
limit (and SIGTERM on preemption or `scontrol requeue`); torchrun hands it to the workers, which
checkpoint at the next step and exit saying `preempted` in exit.json; the script then requeues its
own job (`scontrol requeue $SLURM_JOB_ID`), which starts again later and resumes from the
checkpoint. Nothing of this needs the driver.

The driver's side (`run_job`): submit with `sbatch --parsable`, keep the job id in
`<output_dir>/slurm_job.json`, poll `scontrol show job` (sacct only when a job has left
slurmctld's memory and accounting exists). Queued, running and requeued jobs are all "running".
A job that ended TIMEOUT / PREEMPTED / NODE_FAIL / BOOT_FAIL, or that checkpointed but could not
requeue itself, is resubmitted (same script, same dir, resumes) up to `max_resubmits` times.
COMPLETED with a manifest is done; anything else fails with the Slurm state and the job's error.
A driver that finds a recorded job still queued or running watches it instead of submitting again.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch import ray_on_slurm
from launch.local import JobResult
from launch.config import LaunchConfig
from stages.configs import stage_module
from stages.contract import EXIT_STATUS, LOG, MANIFEST, SPEC, read_json, write_json_atomic

SCRIPT = "sbatch.sh"
JOB_FILE = "slurm_job.json"

# Slurm job states (squeue/scontrol names). ACTIVE: the job will still run or is running.
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
          "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
# Ended for a reason that is not the job's fault: start it again and it resumes.
RESUBMIT = {"TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL"}
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun forwards these to workers


# --------------------------------------------------------------------------------------------
# The batch script


def render_script(out: Path, kind: str, launcher: LaunchConfig) -> str:
    """The sbatch script of the stage whose output dir is `out` (an absolute path)."""
    L = launcher
    q = shlex.quote
    log = q(str(out / LOG))
    options = [f"--job-name={out.name}", f"--output={log}", f"--error={log}",
               "--open-mode=append", "--requeue", f"--chdir={q(str(out))}",
               f"--nodes={L.nodes}", "--ntasks-per-node=1"]
    if L.cpus_per_node:
        options.append(f"--cpus-per-task={L.cpus_per_node}")
    if L.gpus_per_node:
        options.append(f"--gpus-per-node={L.gpus_per_node}")
    for key in ("mem", "time", "partition", "account", "qos", "constraint"):
        if getattr(L, key) is not None:
            options.append(f"--{key}={getattr(L, key)}")
    if L.signal_grace_s:  # to the job steps (torchrun and its workers), not to this shell
        options.append(f"--signal=USR1@{L.signal_grace_s}")
    options += L.extra_sbatch

    if L.nodes == 1:
        rendezvous = ["--standalone"]
    else:
        rendezvous = ["--nnodes=$SLURM_NNODES", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint=$head:{L.rdzv_port}", "--rdzv-id=$SLURM_JOB_ID"]
    torchrun = [q(L.python or sys.executable), "-m", "torch.distributed.run", *rendezvous,
                f"--nproc-per-node={L.nproc_per_node}", "--max-restarts=0",
                f"--signals-to-handle={TORCHRUN_SIGNALS}",
                # how long torchrun lets its workers finish a checkpoint before SIGKILL
                f"--shutdown-timeout={max(L.signal_grace_s, 30)}",
                "-m", stage_module(kind), "--spec", q(str(out / SPEC))]
    # srun does not take --cpus-per-task from sbatch (Slurm >= 22.05): say it again
    srun = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1",
            *([f"--cpus-per-task={L.cpus_per_node}"] if L.cpus_per_node else []),
            *(["--overlap"] if L.ray_cluster else []), *L.srun_args]

    lines = ["#!/bin/bash",
             f"# Stage job {out.name} ({kind}), written by `pipeline` (launch/slurm.py).",
             *[f"#SBATCH {o}" for o in options],
             "", *L.setup, *([""] if L.setup else []),
             "export PYTHONUNBUFFERED=1",
             # torch threads: each worker's share of the job's CPUs (the environment sbatch
             # copies from the submitting Ray task has OMP_NUM_THREADS=1)
             f"export OMP_NUM_THREADS=$(( SLURM_CPUS_ON_NODE / {L.nproc_per_node} > 1 ? "
             f"SLURM_CPUS_ON_NODE / {L.nproc_per_node} : 1 ))",
             'echo "=== $(date \'+%F %T\') slurm job $SLURM_JOB_ID (restart '
             '${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
             f"rm -f {EXIT_STATUS}"]
    if L.nodes > 1:
        lines.append('head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
    if L.ray_cluster:
        lines += ray_on_slurm.start_lines(L.python or sys.executable, L.ray_port)
    lines += [" ".join(srun + ([L.wrapper] if L.wrapper else []) + torchrun),
              "code=$?",
              *(ray_on_slurm.stop_lines(L.ray_port) if L.ray_cluster else []),
              "# the job checkpointed after SIGUSR1/SIGTERM (exit.json says so): start it again",
              f"if [ $code -ne 0 ] && grep -qs '\"status\": \"preempted\"' {EXIT_STATUS}; then",
              '    echo "=== $(date \'+%F %T\') checkpointed after a signal: requeueing job '
              '$SLURM_JOB_ID"',
              '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
              "fi",
              "exit $code", ""]
    return "\n".join(lines)


def write_script(out: Path, kind: str, launcher: LaunchConfig) -> Path:
    path = out / SCRIPT
    path.write_text(render_script(out, kind, launcher))
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------------------------
# Asking Slurm


@dataclass
class SlurmJob:
    job_id: str
    state: str
    reason: str = ""
    exit_code: str = ""
    restarts: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def describe(self) -> str:
        """e.g. `slurm job 812 pending (BeginTime), 2 restarts` (what `pipeline status` shows)."""
        why = f" ({self.reason})" if self.state == "PENDING" and self.reason not in ("", "None") else ""
        again = f", {self.restarts} restart{'s' * (self.restarts > 1)}" if self.restarts else ""
        return f"slurm job {self.job_id} {self.state.lower()}{why}{again}"


class SlurmUnavailable(RuntimeError):
    """slurmctld did not answer (restarting, overloaded): ask again later."""


def _slurm(cmd: list[str], env: dict[str, str] | None = None,
           clean: bool = False) -> subprocess.CompletedProcess:
    """Run a Slurm client command; `clean`: with exactly `env`, not os.environ + env."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env=env if clean else {**os.environ, **(env or {})})
    except FileNotFoundError:
        raise RuntimeError(f"`{cmd[0]}` not found: the Slurm launcher needs the Slurm client "
                           "commands (sbatch, scontrol, squeue) on PATH") from None
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"`{' '.join(cmd)}` did not answer in 120 s") from None


def query(job_id: str) -> SlurmJob | None:
    """The job's state; None when Slurm no longer knows it."""
    done = _slurm(["scontrol", "show", "job", "-o", job_id])
    if done.returncode == 0 and "JobState=" in done.stdout:
        fields = dict(re.findall(r"(\w+)=(\S*)", done.stdout))
        return SlurmJob(job_id, fields["JobState"], fields.get("Reason", ""),
                        fields.get("ExitCode", ""), int(fields.get("Restarts", 0) or 0))
    if "Invalid job id" not in done.stderr:
        raise SlurmUnavailable(f"scontrol show job {job_id}: {done.stderr.strip()}")
    # purged from slurmctld's memory (MinJobAge): accounting knows, where there is one
    acct = _slurm(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode"])
    rows = [r.split("|") for r in acct.stdout.splitlines() if "|" in r]
    if acct.returncode == 0 and rows:
        state, exit_code = rows[-1][0].split()[0], rows[-1][1]
        return SlurmJob(job_id, state, exit_code=exit_code)
    return None


def submit_script(script: Path, env: dict[str, str] | None = None) -> str:
    """sbatch a script; returns the job id. The job inherits `env` (sbatch's --export=ALL)."""
    # a driver that runs in a Slurm job (`pipeline submit`) must not pass its own job's SLURM_*
    # settings on to the stage jobs (srun would mix them up with theirs)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    done = _slurm(["sbatch", "--parsable", str(script)], {**inherited, **(env or {})}, clean=True)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def read_record(out: Path) -> dict:
    try:
        return read_json(out / JOB_FILE)
    except (OSError, ValueError):
        return {}


def live_job(out: Path) -> SlurmJob | None:
    """This stage dir's recorded Slurm job if it is still queued or running."""
    record = read_record(out)
    if not record:
        return None
    try:
        job = query(record["job_id"])
    except (SlurmUnavailable, RuntimeError):
        return None
    return job if job and job.active else None


def cancel(out: Path) -> str | None:
    """scancel this stage dir's job (it gets SIGTERM: checkpoints, then stops); its id or None."""
    job = live_job(out)
    if job:
        _slurm(["scancel", job.job_id])
    return job.job_id if job else None


# --------------------------------------------------------------------------------------------
# The launcher


def run_job(spec, launcher: LaunchConfig, env: dict[str, str] | None = None) -> JobResult:
    """Submit the job (or re-attach to the recorded one) and wait until it has really ended."""
    out = spec.out
    started = time.monotonic()
    record = read_record(out)
    job = _ask(out, record["job_id"], launcher) if record else None
    if job and job.active:
        _note(out, f"re-attaching to slurm job {job.job_id} ({job.state})")
    else:
        write_script(out, spec.kind, launcher)
        record = _submit(out, env, {"jobs": record.get("jobs", []), "resubmits": 0})
    while True:
        job = _ask(out, record["job_id"], launcher)
        if job and job.active:
            time.sleep(launcher.poll_s)
            continue
        result = _ended(out, record["job_id"], job)
        state = job.state if job else "gone"
        if result is None and record["resubmits"] < launcher.max_resubmits:
            _note(out, f"slurm job {record['job_id']} ended {state}: resubmitting to resume "
                       f"({record['resubmits'] + 1} of at most {launcher.max_resubmits})")
            record = _submit(out, env, {**record, "resubmits": record["resubmits"] + 1})
            continue
        if result is None:
            result = JobResult("failed", 1, str(out / LOG),
                               f"slurm job {record['job_id']} ended {state} after "
                               f"{record['resubmits']} resubmissions (max_resubmits)")
        result.seconds = time.monotonic() - started
        return result


def _ask(out: Path, job_id: str, launcher: LaunchConfig) -> SlurmJob | None:
    """query(), waiting out a slurmctld that does not answer (never guess: that could duplicate)."""
    while True:
        try:
            return query(job_id)
        except SlurmUnavailable as e:
            _note(out, f"{e}; asking again")
            time.sleep(max(launcher.poll_s, 5.0))


def _submit(out: Path, env: dict[str, str] | None, record: dict) -> dict:
    (out / EXIT_STATUS).unlink(missing_ok=True)  # only this job's own end may be read
    job_id = submit_script(out / SCRIPT, env)
    record = {**record, "job_id": job_id, "jobs": [*record.get("jobs", []), job_id],
              "script": str(out / SCRIPT), "submitted": time.time()}
    write_json_atomic(out / JOB_FILE, record)
    _note(out, f"submitted slurm job {job_id} ({out / SCRIPT})")
    return record


def _ended(out: Path, job_id: str, job: SlurmJob | None) -> JobResult | None:
    """How an ended job maps to the stage; None: resubmit it (it resumes from its checkpoint)."""
    log = str(out / LOG)
    status = read_json(out / EXIT_STATUS) if (out / EXIT_STATUS).exists() else {}
    state = job.state if job else "gone"
    if (out / MANIFEST).exists() and status.get("status") == "done":
        return JobResult("done", 0, log)
    if state in RESUBMIT or (state != "CANCELLED" and status.get("status") == "preempted"):
        return None
    exit_code = int(job.exit_code.split(":")[0]) if job and job.exit_code[:1].isdigit() else 1
    if job is None:
        what = "is no longer known to Slurm (purged, and no accounting to ask)"
    else:
        what = f"ended {state}" + (f" (exit code {job.exit_code})" if job.exit_code else "") + \
               (f", reason {job.reason}" if job.reason not in ("", "None") else "")
    detail = status.get("error") or "see its log"
    return JobResult("failed", exit_code or 1, log, f"slurm job {job_id} {what}: {detail}")


def _note(out: Path, line: str) -> None:
    """A driver line in the job's log (the job appends to the same file)."""
    with open(out / LOG, "a") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} driver: {line}\n")


# --------------------------------------------------------------------------------------------
# The driver itself as a Slurm job (`pipeline submit`)


def render_driver_script(argv: list[str], workdir: Path, launcher: LaunchConfig, *, cpus: int,
                         mem: str, time_limit: str | None, partition: str | None) -> str:
    """A small CPU job running `pipeline run <argv>` from the current directory.

    It requeues itself shortly before its time limit; the new driver re-attaches to the stage
    jobs still queued or running, so a pipeline can outlive any one driver job."""
    q = shlex.quote
    log = q(str(workdir / "driver.log"))
    options = [f"--job-name=pipeline-{workdir.name}", f"--output={log}", f"--error={log}",
               "--open-mode=append", "--requeue", f"--chdir={q(os.getcwd())}", "--nodes=1",
               "--ntasks=1", f"--cpus-per-task={cpus}", f"--mem={mem}", "--signal=B:USR1@120"]
    if time_limit:
        options.append(f"--time={time_limit}")
    for key, value in (("partition", partition or launcher.partition),
                       ("account", launcher.account), ("qos", launcher.qos)):
        if value:
            options.append(f"--{key}={value}")
    run = " ".join(q(a) for a in [launcher.python or sys.executable, "-m", "pipeline.cli", "run",
                                   *argv])
    return "\n".join([
        "#!/bin/bash",
        "# The `pipeline run` driver as a Slurm job, written by `pipeline submit` (launch/slurm.py).",
        *[f"#SBATCH {o}" for o in options], "", *launcher.setup, *([""] if launcher.setup else []),
        'echo "=== $(date \'+%F %T\') driver job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})"',
        "# near the time limit: requeue; the next driver re-attaches to the stage jobs",
        "trap 'scontrol requeue \"$SLURM_JOB_ID\"' USR1",
        f"{run} &",
        "wait $!; code=$?",
        "while [ $code -gt 128 ] && kill -0 $! 2>/dev/null; do wait $!; code=$?; done",
        "exit $code", ""])
