"""Measurement helpers shared by the benchmark scripts: peak memory of a process, the CPU's name, median times."""

from __future__ import annotations

import math
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

MEMORY_SAMPLE_S = 0.02


def peak_rss_MB() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class AnonymousPeak:
    """Samples RssAnon (/proc/self/status) in a thread: the peak without file pages of memory-mapped files."""

    def __init__(self) -> None:
        self.peak_MB = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current_MB() -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return math.nan

    def _run(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            self.peak_MB = max(self.peak_MB, self.current_MB())

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_MB = max(self.peak_MB, self.current_MB())


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def median_ms(function: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of function() in ms over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times)
