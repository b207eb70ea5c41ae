"""One progress display for every long phase: a bar on a terminal, a few lines in a log."""

from __future__ import annotations

import io

from tqdm import tqdm

from dmgan.progress import LineProgress, progress


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(log: io.StringIO) -> list[str]:
    return log.getvalue().splitlines()


def test_in_a_log_a_line_at_the_start_each_tenth_and_the_end():
    log, clock = io.StringIO(), Clock()
    with LineProgress(total=100, desc="DM-GAN", file=log, clock=clock) as bar:
        for step in range(100):
            clock.now += 1.0
            bar.update()
            if step == 50:
                bar.set_postfix(D=1.23456, G="2.5")
    out = lines(log)
    assert out[0] == "DM-GAN: 0/100 started"
    assert [line.split(" ")[1] for line in out[1:-1]] == [f"{10 * k}/100" for k in range(1, 10)]
    assert out[1] == "DM-GAN: 10/100 (10%), 10s elapsed, ETA 1m30s, 1 it/s"
    assert out[-2] == "DM-GAN: 90/100 (90%), 1m30s elapsed, ETA 10s, 1 it/s, D=1.235, G=2.5"
    assert out[-1] == "DM-GAN: 100/100 done in 1m40s, 1 it/s, D=1.235, G=2.5"


def test_slow_phases_get_a_line_every_interval_and_fast_ones_no_flood():
    log, clock = io.StringIO(), Clock()
    bar = LineProgress(total=1000, desc="slow", file=log, clock=clock, interval_s=120, min_interval_s=10)
    for _ in range(20):  # 30 s a step: 2% in 10 minutes
        clock.now += 30
        bar.update()
    bar.close()
    counts = [line.split(" ")[1] for line in lines(log)]
    assert counts == ["0/1000", "4/1000", "8/1000", "12/1000", "16/1000", "20/1000", "20/1000"]
    assert "ETA 8h18m" in lines(log)[1] and lines(log)[-1].startswith("slow: 20/1000 stopped after 10m00s")

    log, clock = io.StringIO(), Clock()
    bar = LineProgress(range(1000), desc="fast", file=log, clock=clock)
    for _ in bar:
        clock.now += 0.001  # a second in all: tenths come faster than min_interval_s
    assert lines(log) == ["fast: 0/1000 started", "fast: 1000/1000 done in 1s, 1e+03 it/s"]


def test_an_unknown_total_gives_counts_and_elapsed_time_without_eta():
    log, clock = io.StringIO(), Clock()
    bar = LineProgress(iter(range(10)), total=None, desc="scan", file=log, clock=clock, interval_s=2)
    for _ in bar:
        clock.now += 1
    out = lines(log)
    assert out[0] == "scan: 0 started" and out[1] == "scan: 2, 2s elapsed, 1 it/s"
    assert all("ETA" not in line for line in out) and out[-1] == "scan: 10 done in 10s, 1 it/s"


def test_a_resumed_count_and_a_loop_left_early():
    log, clock = io.StringIO(), Clock()
    bar = LineProgress(range(50), total=100, initial=50, desc="DM-GAN", file=log, clock=clock)
    for i in bar:
        clock.now += 2
        if i == 10:  # items 0 to 9 done
            break
    bar.close()  # a second close writes nothing
    out = lines(log)
    assert out[0] == "DM-GAN: 50/100 started"
    assert out[1] == "DM-GAN: 60/100 (60%), 20s elapsed, ETA 1m20s, 2 s/it"  # this run's rate only
    assert out[-1] == "DM-GAN: 60/100 stopped after 22s, 2.2 s/it" and len(out) == 3


def test_progress_writes_lines_where_stderr_is_no_terminal(capsys):
    with progress(range(5), desc="real features") as bar:
        assert isinstance(bar, LineProgress) and bar.total == 5
        assert sum(1 for _ in bar) == 5
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "real features: 0/5 started" and err[-1].startswith("real features: 5/5 done in 0s")
    assert len(err) == 2


def test_progress_is_a_tqdm_bar_on_a_terminal():
    screen = Terminal()
    bar = progress(total=4, desc="generate", file=screen)
    assert isinstance(bar, tqdm) and bar.dynamic_ncols
    bar.update(2)
    bar.set_postfix(fid=1.0)
    bar.close()
    assert "generate" in screen.getvalue() and "2/4" in screen.getvalue()


def test_disabled_progress_writes_nothing_and_still_iterates(capsys):
    log = io.StringIO()
    for file in (log, Terminal(), None):
        with progress(range(3), desc="other rank", enabled=False, file=file) as bar:
            assert list(bar) == [0, 1, 2]
            bar.update(1)
            bar.set_postfix(loss=1.0)
    assert log.getvalue() == "" and capsys.readouterr() == ("", "")
