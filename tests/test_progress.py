"""Progress reports: a tqdm bar on a terminal, a plain line every interval in a log file, nothing when disabled."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sslsky.progress import INTERVAL_ENV, progress, track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_have_rate_eta_and_a_final_done_line():
    stream, clock = io.StringIO(), FakeClock()
    with progress(100, "pack (rank 0 of 2)", "cutout", stream=stream, interval=10, clock=clock) as bar:
        for _ in range(100):
            clock.now += 0.5  # 2 cutout/s, 50 s in all
            bar.update(1)
            bar.set_postfix(loss="0.125")
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "pack (rank 0 of 2): 20/100 cutout (20%), 2.0 cutout/s, elapsed 0:00:10, ETA 0:00:40, loss=0.125"
    assert lines[-1] == "pack (rank 0 of 2): done 100 cutout in 0:00:50, 2.0 cutout/s"
    assert all(re.search(r"\d+/100 cutout \(\d+%\), 2\.0 cutout/s, elapsed \S+, ETA \S+", line) for line in lines[:-1])
    assert len(lines) <= 50 // 10 + 1


@pytest.mark.parametrize("interval", [0.0, 0.2, 3.0, 60.0])
def test_lines_are_bounded_by_elapsed_over_interval(interval):
    stream, clock = io.StringIO(), FakeClock()
    bar = progress(1000, "search", "chunk", stream=stream, interval=interval, clock=clock)
    for _ in range(1000):
        clock.now += 0.01  # 10 s in all
        bar.update()
    bar.close()
    periodic = len(stream.getvalue().splitlines()) - 1
    assert periodic <= (1000 if interval == 0 else 10 / interval)
    assert periodic >= (1 if interval <= 10 else 0)


def test_resume_rate_counts_only_this_run_and_an_unfinished_close_says_stopped():
    stream, clock = io.StringIO(), FakeClock()
    bar = progress(100, "pretrain", initial=40, stream=stream, interval=0, clock=clock)
    clock.now += 20
    bar.update(10)  # 10 steps in 20 s: 2 s/it, 50 left
    bar.close()
    bar.close()  # closing twice writes once
    assert stream.getvalue().splitlines() == [
        "pretrain: 50/100 it (50%), 2.0 s/it, elapsed 0:00:20, ETA 0:01:40",
        "pretrain: stopped at 50/100 it after 0:00:20, 2.0 s/it",
    ]


def test_track_wraps_an_iterable_and_takes_its_length():
    stream, clock = io.StringIO(), FakeClock()
    seen = []
    for item in track(range(5), "evaluate", "pass", stream=stream, interval=0, clock=clock):
        clock.now += 1
        seen.append(item)
    assert seen == list(range(5))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("evaluate: 1/5 pass (20%)")
    assert lines[-1] == "evaluate: done 5 pass in 0:00:05, 1.0 pass/s"


def test_environment_sets_the_default_interval(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0.2")
    stream, clock = io.StringIO(), FakeClock()
    bar = progress(10, "mock", "gal", stream=stream, clock=clock)
    for _ in range(10):
        clock.now += 0.1
        bar.update()
    bar.close()
    assert 4 <= len(stream.getvalue().splitlines()) - 1 <= 5


def test_a_terminal_gets_a_tqdm_bar():
    stream = Terminal()
    with progress(5, "pack", "cutout", stream=stream) as bar:
        for _ in range(5):
            bar.update()
            bar.set_postfix({"loss": "1.5"})
    text = stream.getvalue()
    assert "\r" in text and "5/5" in text and "cutout/s" in text and "loss=1.5" in text


def test_disabled_writes_nothing():
    for stream in (io.StringIO(), Terminal()):
        with progress(5, "pack", stream=stream, enabled=False, interval=0) as bar:
            bar.update(5)
        assert list(track(range(3), "search", stream=stream, enabled=False, interval=0)) == [0, 1, 2]
        assert stream.getvalue() == ""


def test_mock_cli_log_file_has_a_few_plain_lines(tmp_path):
    """The real CLI with stderr in a file, as under SLURM: no carriage returns, no per-galaxy lines."""
    env = {k: v for k, v in os.environ.items() if k != INTERVAL_ENV}
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.run([str(Path(sys.executable).with_name("sslsky")), "mock", "--survey", "sdss", "--n", "8",
                               "--seed", "0", "--out", str(tmp_path / "mock")],
                              stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("mock sdss")]
    assert 1 <= len(lines) <= 3, text
    assert re.fullmatch(r"mock sdss \(rank 0 of 1\): done 8 gal in \d+:\d\d:\d\d, [\d.]+ (gal/s|s/gal)", lines[-1])
