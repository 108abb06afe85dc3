"""Progress of long loops: a tqdm bar on a terminal, one plain line every interval in a log file or batch job.

A redrawn bar written to a file leaves thousands of carriage-return frames in it; plain lines keep logs readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0


class Progress:
    """Counts `total` units of work; shows a bar when `stream` is a terminal, else prints a line every interval_s."""

    def __init__(
        self, total: int, description: str, *, unit: str = "it", enabled: bool = True, stream: TextIO | None = None,
        interval_s: float = PLAIN_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
    ):  # fmt: skip
        self.total = total
        self.description = description
        self.unit = unit
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval_s = interval_s
        self.clock = clock
        self.done = 0
        self.started_s = self.last_line_s = clock()
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, desc=description, unit=unit, leave=False, file=self.stream)

    @property
    def plain(self) -> bool:
        """Whether progress is written as plain lines (enabled, not a terminal)."""
        return self.enabled and self.bar is None

    def update(self, count: int = 1) -> None:
        """`count` more units done."""
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.plain and self.clock() - self.last_line_s >= self.interval_s:
            self.last_line_s = self.clock()
            self.write_line()

    def write_line(self) -> None:
        """One plain line: description, count done of the total, and the rate."""
        rate = self.done / max(self.clock() - self.started_s, 1e-9)
        print(f"{self.description}: {self.done:,}/{self.total:,} {self.unit} ({rate:,.0f} {self.unit}/s)",
              file=self.stream, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.plain and self.done:
            self.write_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
