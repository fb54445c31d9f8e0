"""What checkpoint checksums cost: SHA-256 of every file at save, and again at resume.

    python bench/checkpoint_verify.py            # tiny test model + a 254M-parameter-sized one

The tiny case is a real checkpoint of the pretrain tests' model (hidden 32, 2 layers, with Adam
state). The 254M case is a directory of the same byte count as a real one would have (254M fp32
weights + two fp32 Adam moments = 3.05 GB in 4 files), filled with random bytes: SHA-256's cost
depends only on the bytes, and a real 254M model plus its optimizer does not fit beside a test
run on this 24 GiB machine without swapping. Times are per save (write_checksums) and per load
(verify), cold page cache not forced (the save just wrote the files, so that is realistic).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.engine.checkpoint_integrity import dir_bytes, verify, write_checksums  # noqa: E402


def synthetic(root: Path, total: int, files: int = 4) -> Path:
    ckpt = root / "step-000001"
    ckpt.mkdir(parents=True)
    block = os.urandom(1 << 24)
    for i in range(files):
        with open(ckpt / f"__0_{i}.distcp", "wb") as f:
            left = total // files
            while left > 0:
                f.write(block[:min(left, len(block))])
                left -= len(block)
    return ckpt


def timed(ckpt: Path) -> tuple[float, float]:
    (ckpt / "checksums.json").unlink(missing_ok=True)
    t = time.perf_counter()
    write_checksums(ckpt)
    save = time.perf_counter() - t
    t = time.perf_counter()
    assert verify(ckpt, "complete.json") is None
    return save, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", help="a real checkpoint dir to time (default: make none)")
    parser.add_argument("--big-gb", type=float, default=3.05, help="bytes of the large case")
    args = parser.parse_args()
    rows = []
    if args.tiny:
        ckpt = Path(args.tiny)
        rows.append(("tiny test model (real checkpoint)", dir_bytes(ckpt), *timed(ckpt)))
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        ckpt = synthetic(Path(tmp), int(args.big_gb * 1e9))
        rows.append(("254M params + Adam, fp32 (synthetic bytes)", dir_bytes(ckpt), *timed(ckpt)))
        shutil.rmtree(ckpt)
    print("| checkpoint | bytes | checksums at save | verify at load |")
    print("|---|---|---|---|")
    for name, size, save, load in rows:
        print(f"| {name} | {size / 1e6:,.1f} MB | {save:.3f} s | {load:.3f} s |")


if __name__ == "__main__":
    main()
