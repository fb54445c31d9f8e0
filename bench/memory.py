"""Peak RSS of every process of a tiny pipeline run (driver, Ray, each stage job).

    python bench/memory.py [recipe] [key=value ...]

Samples the whole process tree of `pipeline run` every 0.1 s with psutil and reports each
process's peak, grouped by role. Stage jobs also record their own peak (getrusage) in exit.json,
which is exact; sampling can miss a spike shorter than the interval.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def role(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "?"
    if "pipeline.cli" in cmd:
        return "driver (pipeline run)"
    for kind in ("tokenizer", "prepare", "pretrain"):
        if f"stages.{kind}" in cmd:
            return f"{kind} job" if "torch.distributed.run" not in cmd else f"{kind} torchrun agent"
    if "ray" in cmd or "raylet" in cmd or "gcs_server" in cmd:
        return "ray (services + workers)"
    return cmd[:40]


def main() -> None:
    recipe = sys.argv[1] if len(sys.argv) > 1 else "recipes/tiny.yaml"
    workdir = Path(tempfile.mkdtemp(prefix="bench-mem-")) / "wd"
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", recipe,
                               f"workdir={workdir}", *sys.argv[2:]], stdout=subprocess.DEVNULL)
    peaks: dict[int, tuple[str, float]] = {}
    root = psutil.Process(driver.pid)
    while driver.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            break
        for p in procs:
            try:
                rss = p.memory_info().rss / 2**20
            except psutil.Error:
                continue
            name, peak = peaks.get(p.pid, (role(p), 0.0))
            peaks[p.pid] = (name, max(peak, rss))
        time.sleep(0.1)
    by_role: dict[str, list[float]] = {}
    for name, peak in peaks.values():
        by_role.setdefault(name, []).append(peak)
    print("| process | count | peak RSS each (max) | sum of peaks |\n|---|---|---|---|")
    for name, values in sorted(by_role.items()):
        print(f"| {name} | {len(values)} | {max(values):.0f} MiB | {sum(values):.0f} MiB |")
    for exit_file in sorted(workdir.glob("*/exit.json")):
        print(f"{exit_file.parent.name}: job's own getrusage peak "
              f"{json.loads(exit_file.read_text()).get('peak_rss_mb')} MiB")


if __name__ == "__main__":
    main()
