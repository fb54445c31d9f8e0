"""Checksums of a checkpoint's files, and a clear stop when the disk fills during a save.

A checkpoint's completion marker said only that its write had finished; a file truncated or
bit-flipped later (a bad disk, a copy cut short: open-instruct users lost runs to garbled
checkpoints) was still loaded. Now every file's SHA-256 and size go into `checksums.json`, written
before the marker; a load verifies them, and a resume skips a checkpoint that fails, with a
WARNING naming it, for the previous complete one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

CHECKSUMS = "checksums.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(ckpt: Path) -> None:
    """Record every file of checkpoint dir `ckpt` (call before its completion marker)."""
    from stages.contract import write_json_atomic

    write_json_atomic(ckpt / CHECKSUMS, {str(p.relative_to(ckpt)): {
        "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in _files(ckpt)})


def verify(ckpt: Path, marker: str) -> str | None:
    """What is wrong with checkpoint dir `ckpt` (None: every recorded file is intact). A checkpoint
    written before checksums were kept has none to check and passes."""
    listed = ckpt / CHECKSUMS
    if not listed.exists():
        return None
    try:
        expected = json.loads(listed.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{CHECKSUMS} is unreadable ({e})"
    for name, want in expected.items():
        path = ckpt / name
        if name == marker:
            continue
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written"
        if file_sha256(path) != want["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in an exception's chain (dist_checkpointing's writer processes re-raise
    their OSError wrapped, with the text kept)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class CheckpointDiskFull(OSError):
    """A checkpoint write ran out of space; the partial write was removed."""


def disk_full(root: Path, name: str, needed: int) -> CheckpointDiskFull:
    free = shutil.disk_usage(root).free
    return CheckpointDiskFull(
        errno.ENOSPC, f"no space left for checkpoint {name} in {root}: {free / 2**20:.1f} MiB "
        f"free, it needs about {needed / 2**20:.1f} MiB (the size of the last one); the partial "
        f"write was removed: free space, then rerun to resume from the last complete checkpoint")
