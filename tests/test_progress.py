"""The one progress helper (stages.engine.progress): plain lines with an ETA in a job log."""

from __future__ import annotations

from stages.engine.progress import Progress


def test_plain_lines_at_the_cadence_and_at_the_end_with_an_eta(capsys):
    progress = Progress(10, done=2, every=4)  # resumed at step 2: the ETA counts this run's steps
    for step in range(3, 11):
        progress.update(step, f"loss {step:.1f}")
    progress.write("held out: 1.0")
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ETA ")[0] for line in lines] == [
        "step 4/10 | loss 4.0", "step 8/10 | loss 8.0", "step 10/10 | loss 10.0", "held out: 1.0"]
    assert all(line.endswith("s") for line in lines[:3]) and lines[2].endswith("| ETA 0s")


def test_other_ranks_print_nothing_and_counts_advance(capsys):
    quiet = Progress(4, enabled=False)
    quiet.update(4, "x")
    quiet.write("y")
    assert capsys.readouterr().out == ""
    answers = Progress(6, "answers", min_interval_s=3600)
    answers.advance(2)
    answers.advance(2)  # within the interval: no line
    answers.advance(2)  # the last: always a line
    assert [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()] == [
        "answers 2/6", "answers 6/6"]
