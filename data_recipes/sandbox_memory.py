"""A memory cap for a whole sandbox run, not per process: a cgroup holding every process of it.

RLIMIT_AS caps each process, so code that forks N children may take N times the cap. A cgroup's
memory limit counts them all together (the kernel OOM-kills inside the run past it). We use the
cgroup v2 memory controller where this process may make child cgroups with it, else cgroup v1's
memory hierarchy, else nothing (rlimits stay the only cap; `cgroup_mode()` says "none").

The sandbox's first process joins the run's cgroup itself before it execs anything (a tiny shell
prefix writes its pid to cgroup.procs), so everything it forks is inside from the start.
"""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path

_CGROUP_FS = Path("/sys/fs/cgroup")


@functools.cache
def cgroup_root() -> tuple[str, Path | None]:
    """("v2" | "v1" | "none", the cgroup under which runs get their own), probed once."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    own = {fields[1]: fields[2] for fields in (line.split(":", 2) for line in lines)}
    v2 = ("v2", _v2_root(own.get("", "")))
    v1 = ("v1", _CGROUP_FS / "memory" / own.get("memory", "/").lstrip("/"))
    for mode, root in (v2, v1):
        if root is not None and _can_limit(root, mode):
            return mode, root
    return "none", None


def cgroup_mode() -> str:
    return cgroup_root()[0]


def _v2_root(own: str) -> Path | None:
    for mount in (_CGROUP_FS, _CGROUP_FS / "unified"):
        if "memory" in _read(mount / "cgroup.controllers").split():
            return mount / own.lstrip("/")
    return None


def _can_limit(root: Path, mode: str) -> bool:
    """Try it: make a child cgroup, set a limit, remove it."""
    probe = root / f"sandbox-probe-{os.getpid()}"
    try:
        if mode == "v2" and "memory" not in _read(root / "cgroup.subtree_control").split():
            (root / "cgroup.subtree_control").write_text("+memory")
        probe.mkdir()
        try:
            (probe / ("memory.max" if mode == "v2" else "memory.limit_in_bytes")).write_text(
                str(64 << 20))
        finally:
            probe.rmdir()
        return True
    except OSError:
        return False


class RunCgroup:
    """The cgroup of one run, with its memory limit; `None`-like (inactive) where there is none."""

    def __init__(self, limit_mb: int, uid: int):
        self.mode, root = cgroup_root()
        self.path = None if root is None else root / f"sandbox-{os.getpid()}-{secrets.token_hex(4)}"
        if self.path is None:
            return
        self.path.mkdir()
        limit = str(limit_mb << 20)
        if self.mode == "v2":
            (self.path / "memory.max").write_text(limit)
            _write_if_present(self.path / "memory.swap.max", "0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(limit)
            _write_if_present(self.path / "memory.memsw.limit_in_bytes", limit)  # no swapping out
        if uid >= 0:  # the run's first process may drop to its uid before it joins
            os.chown(self.path / "cgroup.procs", uid, uid)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` prefixed so that its process joins this cgroup before it execs anything."""
        if self.path is None:
            return argv
        # sh exports PWD to what it execs; the sandbox's environment must stay exactly its own
        return ["/bin/sh", "-c", 'echo $$ > "$0" && unset PWD && exec "$@"',
                str(self.path / "cgroup.procs"), *argv]

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the run for going over the limit."""
        if self.path is None:
            return False
        events = _read(self.path / ("memory.events" if self.mode == "v2" else "memory.oom_control"))
        for line in events.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and int(value or 0) > 0:
                return True
        return False

    def remove(self) -> None:
        """Called once every process of the run is gone (an empty cgroup can be removed)."""
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write_if_present(path: Path, value: str) -> None:
    if path.exists():
        try:
            path.write_text(value)
        except OSError:
            pass
