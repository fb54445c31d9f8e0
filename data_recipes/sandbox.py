"""Run untrusted Python (model-generated code) in a fresh, locked-down, throw-away process.

RL rewards run thousands of model outputs, so this is built for many small concurrent calls: each
`run_python` is one new interpreter (~25 ms of overhead), safe to call from many threads/processes.

    from data_recipes.sandbox import SandboxLimits, run_python
    run_python("print(sum(range(10)))", SandboxLimits(cpu_seconds=2)).stdout   # '45\\n'

Defence in depth, because we run as root (every layer holds even if another one is missing):

- namespaces (`unshare`): new pid, mount, net, ipc and uts namespaces. No network at all (only a
  down loopback); /proc shows only the sandbox's processes, so ours cannot be seen or signalled;
  /tmp, /var/tmp and /dev/shm are fresh size-capped tmpfs (the working dir is /tmp/work) that
  vanish with the run; a directory other users cannot enter that holds the interpreter (pyenv in
  /root) is replaced by an empty tmpfs with only the interpreter bound back, read-only.
- a fresh unprivileged uid per run (when we are root): file permissions apply again, and
  RLIMIT_NPROC (ignored for root) is enforced and counted per run, not shared between runs.
- rlimits on CPU seconds, address space, file size, processes, open files and core dumps, soft
  and hard, set before the code starts; without CAP_SYS_RESOURCE it cannot raise them back.
- a memory cap for the run as a whole (all its processes together), in a cgroup of its own where
  the machine has one (data_recipes.sandbox_memory): forking does not multiply it.
- no_new_privs, an empty environment, no inherited fds, `python -I -S -B`, a new session, a wall
  clock deadline that kills the namespace's init (and with it every process inside), and
  bounded stdout/stderr.

`isolation()` probes once per process for the strongest mode that works here:
- "namespaces": root with CAP_SYS_ADMIN (our machines and CI): everything above.
- "userns": `unshare --user` as an unprivileged uid (a fresh one if we are root; it must be able
  to run the interpreter, which pyenv under /root is not). Weaker: the code is root of its own
  user namespace, so it can unmount the private /tmp and reach the shared one (with its outer
  uid's rights); when we are not root, that outer uid and its process count are our own.
- "plain": no namespaces, only the uid, rlimits and the rest. Weaker: the network is open
  (localhost services included), every process is visible in /proc, writes to the shared /tmp
  persist (only per-file size is capped), and escaped daemons are swept by uid only when we are
  root. When we are not root, the code also runs as our uid: it can read our files and signal
  our processes; only the rlimits, the clean environment and the timeouts are left.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from data_recipes.sandbox_boot import boot_source
from data_recipes.sandbox_memory import RunCgroup

log = logging.getLogger(__name__)

MODES = ("namespaces", "userns", "plain")
_SETUP_FAILED = 125  # the child's exit code when its own setup (mounts, uid, rlimits) failed
_UID_BASE, _UID_SPAN = 0x7000_0000, 1 << 24  # above the container ranges, below 2**31
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    cpu_seconds: int = 5
    """CPU time per process (RLIMIT_CPU): SIGXCPU at this, SIGKILL one second later."""
    wall_seconds: float = 10.0
    """Wall clock for the whole run, sleeping included; then every process of it is killed."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS)."""
    run_memory_mb: int = 512
    """Memory of all the run's processes together (a cgroup limit, where the machine has one)."""
    file_size_mb: int = 16
    """Largest file a process may write (RLIMIT_FSIZE)."""
    tmpfs_mb: int = 64
    """Size of the private /tmp holding the working dir (namespace modes only)."""
    max_processes: int = 16
    """Processes and threads of the run's uid (RLIMIT_NPROC); a namespace's init counts too."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    output_bytes: int = 64 * 1024
    """stdout and stderr are each kept up to this; more output ends the run (`output_limit`)."""

    def __post_init__(self):
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {value}")


@dataclass(frozen=True)
class SandboxResult:
    status: str
    """ok | error (non-zero exit) | timeout (wall clock or CPU) | killed (another signal) |
    memory_limit (the run's cgroup killed it) | output_limit | sandbox_error (the sandbox itself
    could not start)."""
    exit_code: int | None
    """The code's exit status, -N when a signal N ended it, None when we killed it."""
    stdout: str
    stderr: str
    wall_seconds: float
    isolation: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --- the parent ---

_mode: str | None = None
_mode_error = ""
_detect_lock, _uid_lock = threading.Lock(), threading.Lock()
_uids_in_use: set[int] = set()


def isolation() -> str:
    """The strongest mode that works on this machine; probed once per process (~0.1 s)."""
    global _mode, _mode_error
    with _detect_lock:
        if _mode is None and not _mode_error:
            failures = []
            for mode in MODES if os.geteuid() == 0 else MODES[1:]:
                r = run_python("import math, os; print(math.isqrt(49), os.getuid())",
                               SandboxLimits(wall_seconds=20), mode=mode)
                words = r.stdout.split()
                # as root, "namespaces" must also have left uid 0 behind
                if r.ok and words[:1] == ["7"] and (mode != "namespaces" or words[1:] != ["0"]):
                    _mode = mode
                    break
                failures.append(f"{mode}: {r.status} {r.stderr.strip()[-300:]}")
            else:
                _mode_error = "no sandbox isolation works here: " + "; ".join(failures)
            if _mode == "plain":
                log.warning("sandbox: no namespaces (%s); untrusted code runs with a uid, "
                            "rlimits and a clean environment only", "; ".join(failures))
        if _mode is None:
            raise RuntimeError(_mode_error)
        return _mode


def run_python(code: str, limits: SandboxLimits | None = None, stdin: str = "", *,
               mode: str | None = None) -> SandboxResult:
    """Run `code` as a fresh `__main__` in the sandbox; never raises for anything the code does.

    mode: one of MODES to force it (probing, tests); by default the strongest that works here.
    """
    limits = limits or SandboxLimits()
    mode = mode or isolation()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    start = time.monotonic()
    deadline = start + limits.wall_seconds
    with _fresh_uid() as uid, _workdir(mode, uid) as cwd, _run_cgroup(limits, uid) as cgroup:
        drop = {"user": uid, "group": uid, "extra_groups": []} \
            if uid >= 0 and mode != "namespaces" else {}  # there the child drops it itself
        try:
            proc = subprocess.Popen(cgroup.command(_command(mode, uid, limits)),
                                    stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=dict(_ENV), cwd=cwd, close_fds=True,
                                    start_new_session=True, **drop)
        except (OSError, subprocess.SubprocessError) as e:
            return SandboxResult("sandbox_error", None, "", repr(e), 0.0, mode)
        with proc:
            data = code.encode()
            out, err, reason = _pump(proc, b"%016d" % len(data) + data + stdin.encode(),
                                     deadline, limits.output_bytes)
            if reason is None:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    reason = "timeout"
            if reason is not None:
                # the namespace's init is in this group: SIGKILL from outside is the one signal
                # it cannot ignore, and its death ends every process inside (setsid() or not)
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if mode == "plain" and uid >= 0:
            _sweep_uid(uid)  # daemons that left our process group
        reason = reason or ("memory_limit" if cgroup.oom_killed() else None)
    return _result(proc.returncode, reason, out, err, limits, time.monotonic() - start, mode)


@contextmanager
def _run_cgroup(limits: SandboxLimits, uid: int):
    cgroup = RunCgroup(limits.run_memory_mb, uid)
    try:
        yield cgroup
    finally:
        cgroup.remove()


@functools.cache
def _static() -> tuple[str, str, str, tuple[str, ...]]:
    """(the child's bootstrap source, the interpreter's prefix, its hidden ancestor or '', and
    a launcher that kills `unshare` when we die, taking the namespace with it)."""
    prefix = os.path.realpath(sys.base_prefix)
    launcher = ("setpriv", "--pdeathsig", "KILL", "--") if shutil.which("setpriv") else ()
    return boot_source(), prefix, _hidden_ancestor(prefix), launcher


def _command(mode: str, uid: int, limits: SandboxLimits) -> list[str]:
    boot, prefix, hide, launcher = _static()
    nums = (uid if mode == "namespaces" else -1, limits.cpu_seconds, limits.memory_mb << 20,
            limits.file_size_mb << 20, limits.tmpfs_mb, limits.max_processes,
            limits.max_open_files)
    argv = [sys.executable, "-I", "-S", "-B", "-c", boot, mode,
            hide if mode == "namespaces" else "", prefix, *map(str, nums)]
    if mode == "plain":
        return argv
    user = ["--user", "--map-root-user"] if mode == "userns" else []
    return [*launcher, "unshare", *user, "--pid", "--fork", "--kill-child", "--mount",
            "--mount-proc", "--net", "--ipc", "--uts", "--", *argv]


def _result(rc: int, reason: str | None, out: bytes, err: bytes, limits: SandboxLimits,
            wall: float, mode: str) -> SandboxResult:
    # a namespace's init relays a signal death as 128 + N (it cannot die of the signal itself)
    sig = -rc if rc < 0 else rc - 128 if mode != "plain" and 128 < rc < 160 else 0
    if reason:
        status = reason
    elif rc == 0:
        status = "ok"
    elif rc == _SETUP_FAILED:
        status = "sandbox_error"
    elif sig:
        status = "timeout" if sig == signal.SIGXCPU else "killed"
    else:
        status = "error"
    text = lambda b: b[:limits.output_bytes].decode("utf-8", "replace")  # noqa: E731
    return SandboxResult(status, None if reason else -sig if sig else rc, text(out), text(err),
                         wall, mode)


def _pump(proc: subprocess.Popen, payload: bytes, deadline: float,
          limit: int) -> tuple[bytes, bytes, str | None]:
    """Feed stdin and collect stdout/stderr, never holding more than limit + 64 KiB of each.

    reason is 'timeout' or 'output_limit' when the run must be killed, None when both streams
    reached EOF (or the code exited and left them to a daemon).
    """
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    pending, reason = memoryview(payload), None
    os.set_blocking(proc.stdin.fileno(), False)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and not reason:
            now, exited = time.monotonic(), proc.poll() is not None
            if exited:  # a plain-mode daemon may still hold the pipes: give it 0.2 s, not more
                deadline = min(deadline, now + 0.2)
            if now >= deadline:
                reason = None if exited else "timeout"
                break
            for key, _ in sel.select(min(deadline - now, 0.1)):
                if key.fd in bufs:
                    chunk = os.read(key.fd, 65536)
                    bufs[key.fd] += chunk
                    if not chunk:
                        sel.unregister(key.fd)
                    elif len(bufs[key.fd]) > limit:
                        reason = "output_limit"
                    continue
                with suppress(BlockingIOError):
                    try:
                        pending = pending[os.write(key.fd, pending[:65536]):]
                    except BrokenPipeError:  # the code does not read its stdin: fine
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(key.fd)
                        proc.stdin.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), reason


def _sweep_uid(uid: int) -> None:
    """Plain mode as root: kill whatever still runs as this run's uid (nobody else has it)."""
    assert uid >= _UID_BASE, uid  # never a real user's, let alone root's
    for _ in range(3):  # again, in case one forked meanwhile
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _real_uid(p) == uid]
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not pids:
            return


def _real_uid(pid: str) -> int:
    try:
        return int(Path("/proc", pid, "status").read_text().split("\nUid:\t")[1].split("\t")[0])
    except (OSError, IndexError, ValueError):
        return -1


@contextmanager
def _fresh_uid():
    """As root, a uid that no other run is using (random across processes); else -1."""
    if os.geteuid() != 0:
        yield -1
        return
    with _uid_lock:
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        while uid in _uids_in_use:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        _uids_in_use.add(uid)
    try:
        yield uid
    finally:
        with _uid_lock:
            _uids_in_use.discard(uid)


@contextmanager
def _workdir(mode: str, uid: int):
    """Plain mode works in a private temp dir, removed after; the others make their own tmpfs."""
    if mode != "plain":
        yield "/"
        return
    path = tempfile.mkdtemp(prefix="sandbox-")
    try:
        if uid >= 0:
            os.chown(path, uid, uid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _hidden_ancestor(path: str) -> str:
    """The topmost directory on `path` that other users cannot enter, '' if there is none."""
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        if not os.stat(os.path.join(*parts[:i])).st_mode & 0o001:
            return os.path.join(*parts[:i])
    return ""
