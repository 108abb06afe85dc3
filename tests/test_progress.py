"""Progress: a bar on a terminal, a few plain lines in a log (never thousands of redraws)."""

import io

from cryoflex.progress import Progress


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_plain_line_per_interval_and_one_at_the_end() -> None:
    stream, clock = io.StringIO(), _Clock()
    with Progress(10_000, "simulate", unit="img", stream=stream, interval_s=30.0, clock=clock) as progress:
        for _ in range(100):
            clock.now_s += 1.0
            progress.update(100)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "simulate: 3,000/10,000 img (100 img/s)",
        "simulate: 6,000/10,000 img (100 img/s)",
        "simulate: 9,000/10,000 img (100 img/s)",
        "simulate: 10,000/10,000 img (100 img/s)",
    ]
    assert "\r" not in stream.getvalue()


def test_a_terminal_gets_a_bar_and_disabled_progress_writes_nothing() -> None:
    terminal = _Terminal()
    with Progress(5, "cache images", stream=terminal) as progress:
        progress.update(5)
    assert "cache images" in terminal.getvalue() and "\r" in terminal.getvalue()
    quiet = io.StringIO()
    with Progress(5, "cache images", enabled=False, stream=quiet) as progress:
        progress.update(5)
    assert quiet.getvalue() == ""
