"""Progress of a stage's loop with an ETA: one helper for every training and sampling loop.

    progress = Progress(total_steps, done=step, every=cfg.log_every, enabled=info.rank == 0)
    ...
        progress.update(step, f"loss {loss:.4f} | lr {lr:.3e}")
    progress.close()

On a terminal it draws a live tqdm bar (the fields as its postfix). Otherwise (a job's stdout goes
to its job.log) it prints plain lines, `step 12/40 | loss 2.3012 | lr 1.000e-03 | ETA 31s`, every
`every` units, at the last one, and no more often than every `min_interval_s`. The ETA is the mean
time per unit done since this process started the loop times the units left (a resumed run does
not count the steps an earlier run did).
"""

from __future__ import annotations

import math
import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "step", done: int = 0, every: int = 1,
                 min_interval_s: float = 0.0, enabled: bool = True):
        self.total, self.label, self.done, self.every = total, label, done, max(every, 1)
        self.min_interval_s, self.enabled = min_interval_s, enabled
        self.t0, self.first, self.last_line = time.time(), done, -math.inf
        self.bar = None
        if enabled and (sys.stderr.isatty() or sys.stdout.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=label, dynamic_ncols=True,
                            file=sys.stderr if sys.stderr.isatty() else sys.stdout)

    def eta(self) -> float:
        """Seconds left at the pace of this run so far (nan before its first unit)."""
        if self.done >= self.total:
            return 0.0
        if self.done <= self.first:
            return math.nan
        return (time.time() - self.t0) / (self.done - self.first) * (self.total - self.done)

    def update(self, done: int, fields: str = "") -> None:
        """`done` units of `total` are finished; `fields` says how it goes (loss, rates, ...)."""
        self.done = done
        if not self.enabled:
            return
        if self.bar is not None:
            if fields:
                self.bar.set_postfix_str(fields, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        now = time.time()
        due = done % self.every == 0 and now - self.last_line >= self.min_interval_s
        if due or done >= self.total:
            self.last_line = now
            eta = self.eta()
            print(f"{self.label} {done}/{self.total}" + (f" | {fields}" if fields else "")
                  + (f" | ETA {eta:,.0f}s" if math.isfinite(eta) else ""), flush=True)

    def advance(self, n: int = 1, fields: str = "") -> None:
        self.update(self.done + n, fields)

    def write(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
