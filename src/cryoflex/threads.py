"""How many CPU threads torch uses: the CPUs this process may use, a fixed count on request, else chosen by timing.

Why: torch's intra-op threads wait for each other by spinning. When the cores are shared (another job, a second run,
a cluster node whose cgroup grants fewer cores than it has), a thread that is descheduled holds up the others at every
parallel operation, and a training step of many small operations can slow down 3-30x. One thread never waits for
another, but alone it is slower on large structures and images. No fixed count is right for both, so by default a
ThreadTuner times the running loop at each candidate count (the usable CPUs, then halving down to 1) and keeps the
fastest, re-checking every minute, so a run adapts when another job starts or ends.

The usable CPUs are the affinity mask (taskset, Slurm's cpuset) capped by the cgroup CPU quota (cgroup v2 cpu.max or
v1 cpu.cfs_quota_us, the container's or job's limit), not the machine's core count.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from pathlib import Path
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=Sized)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _quota_v2(directory: Path) -> float | None:
    """CPUs granted by cpu.max ("QUOTA PERIOD" or "max PERIOD") in one cgroup v2 directory; None = no limit."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(directory: Path) -> float | None:
    """CPUs granted by cpu.cfs_quota_us / cpu.cfs_period_us in one cgroup v1 directory; -1 (or missing) = no limit."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota (in CPUs, may be fractional) of this process's cgroup and its ancestors, the tightest; None if
    there is none or it cannot be read (no cgroup file system, another OS)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        relative = Path(path.strip().lstrip("/"))
        if hierarchy == "0" and controllers == "":  # cgroup v2: one unified hierarchy
            base, read = root, _quota_v2
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's hierarchy
            mount = next((root / name for name in (controllers, "cpu", "cpu,cpuacct") if (root / name).is_dir()), None)
            if mount is None:
                continue
            base, read = mount, _quota_v1
        else:
            continue
        for directory in (base / relative, *(base / parent for parent in relative.parents)):
            quota = read(directory)
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (taskset, cpusets), or the machine's count where there is no such call."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_limit(affinity: int, quota: float | None) -> int:
    """CPUs a process may keep busy: its affinity mask capped by its cgroup quota (rounded down, at least 1)."""
    return max(1, affinity if quota is None else min(affinity, math.floor(quota)))


def usable_cpus() -> int:
    """CPUs this process may keep busy (affinity mask and cgroup quota as read now)."""
    return cpu_limit(affinity_cpus(), cgroup_cpu_quota())


def candidate_counts(max_threads: int) -> list[int]:
    """Thread counts the tuner tries, most first: max_threads, then halving, down to 1."""
    counts = [max(1, max_threads)]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return counts


# Steps after a probe before a slow-down may start another: the first wait, and the most it doubles to.
MIN_COOLDOWN_STEPS = 10
MAX_COOLDOWN_STEPS = 1000
# The next periodic probe waits at least this many times the last probe's duration.
PROBE_SHARE_INVERSE = 10.0
# A probe moves away from the count it started from only to one this much faster (counts within noise of each other
# would otherwise alternate, and each change resets the slow-down back-off).
SWITCH_GAIN = 1.1


class ThreadTuner:
    """Keeps torch's intra-op thread count at whichever candidate runs the wrapped loop fastest.

    A probe runs each candidate (most threads first) for one settling step and `probe_steps` timed steps; a candidate
    that is over `give_up_factor` times slower per image than the best so far is dropped after one timed step. The
    fastest by median time per image is kept until `reprobe_s` seconds later (or PROBE_SHARE_INVERSE times the
    probe's own duration, if longer: probing slow steps never takes over a tenth of the time), or until the median of
    the last `probe_steps` steps is `slowdown_factor` times slower than it measured (another job started), whichever
    comes first. A slow-down probe that keeps the same count doubles the steps before the next one may be triggered
    (up to MAX_COOLDOWN_STEPS): two tuned runs side by side otherwise set each other off, each probe slowing the
    other. A step's time is from handing out an item to being asked for the next (the loop body). clock and
    set_threads are injectable, so the decisions are tested without timing anything.
    """

    def __init__(
        self,
        max_threads: int,
        *,
        reprobe_s: float = 60.0,
        warmup_steps: int = 2,
        probe_steps: int = 3,
        give_up_factor: float = 3.0,
        slowdown_factor: float = 1.5,
        clock: Callable[[], float] = time.perf_counter,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ):
        self.candidates = candidate_counts(max_threads)
        self.reprobe_s = reprobe_s
        self.probe_steps = probe_steps
        self.give_up_factor = give_up_factor
        self.slowdown_factor = slowdown_factor
        self.clock = clock
        self.set_threads = set_threads
        self.threads = self.candidates[0]
        self.set_threads(self.threads)
        self.history: list[dict[int, float]] = []  # every finished probe: candidate -> median seconds per image
        self._warmup_left = warmup_steps  # steps before the first probe (allocations, first-call overheads)
        self._next_probe_s = math.inf
        self._probing = False
        self._untried: list[int] = []  # candidates still to try in the current probe
        self._settling = False  # the first step after a switch is not timed
        self._samples: list[float] = []  # seconds per image of the candidate being tried
        self._results: dict[int, float] = {}
        self._kept_s = math.inf  # seconds per image of the kept count when it was chosen
        self._recent: deque[float] = deque(maxlen=probe_steps)  # seconds per image of the latest steps since then
        self._cooldown_steps = MIN_COOLDOWN_STEPS  # steps after a probe before a slow-down may start another
        self._steps_since_probe = 0
        self._threads_before_probe = self.threads
        self._after_slowdown = False  # whether the current probe was started by a slow-down
        self._probe_started_s = 0.0
        if warmup_steps <= 0:
            self._start_probe()

    def _start_probe(self, after_slowdown: bool = False) -> None:
        self._threads_before_probe, self._after_slowdown = self.threads, after_slowdown
        self._probe_started_s = self.clock()
        self._probing, self._untried, self._results = True, list(self.candidates), {}
        self._try_next()

    def _try_next(self) -> None:
        self.threads = self._untried.pop(0)
        self.set_threads(self.threads)
        self._settling, self._samples = True, []

    def _finish_probe(self) -> None:
        best = min(self._results, key=self._results.__getitem__)
        before = self._threads_before_probe
        if before in self._results and self._results[best] * SWITCH_GAIN > self._results[before]:
            best = before
        changed = best != before
        if not self.history or changed:
            rates = ", ".join(f"{count}: {1.0 / seconds:,.0f}" for count, seconds in self._results.items())
            logger.info("CPU threads: %d, the fastest of the counts tried (threads: images/s %s)", best, rates)
        self.history.append(dict(self._results))
        if changed:
            self._cooldown_steps = MIN_COOLDOWN_STEPS
        elif self._after_slowdown:
            self._cooldown_steps = min(2 * self._cooldown_steps, MAX_COOLDOWN_STEPS)
        self.threads, self._probing = best, False
        self.set_threads(best)
        self._kept_s = self._results[best]
        self._recent.clear()
        self._steps_since_probe = 0
        now = self.clock()
        self._next_probe_s = now + max(self.reprobe_s, PROBE_SHARE_INVERSE * (now - self._probe_started_s))

    def _record(self, seconds_per_image: float) -> None:
        """Account one finished step at the current thread count."""
        if self._warmup_left > 0:
            self._warmup_left -= 1
            if self._warmup_left == 0:
                self._start_probe()
        elif not self._probing:
            self._recent.append(seconds_per_image)
            self._steps_since_probe += 1
            slowed = (
                self._steps_since_probe >= self._cooldown_steps
                and len(self._recent) == self._recent.maxlen
                and statistics.median(self._recent) > self.slowdown_factor * self._kept_s
            )
            if slowed or self.clock() >= self._next_probe_s:
                self._start_probe(after_slowdown=slowed)
        elif self._settling:
            self._settling = False
        else:
            self._samples.append(seconds_per_image)
            too_slow = seconds_per_image > self.give_up_factor * min(self._results.values(), default=math.inf)
            if len(self._samples) >= self.probe_steps or too_slow:
                self._results[self.threads] = statistics.median(self._samples)
                if self._untried:
                    self._try_next()
                else:
                    self._finish_probe()

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Yield the items, timing each step and adjusting the thread count; len(item) is its number of images."""
        for item in items:
            started = self.clock()
            yield item
            elapsed = self.clock() - started
            self._record(elapsed / max(len(item), 1))


def flush_denormals() -> bool:
    """Treat subnormal floats (below 1.2e-38 in float32) as zero in this thread and in the intra-op threads torch
    creates after it, which inherit the setting (threads started before keep theirs). Call it before any parallel
    torch work; returns False where the CPU cannot (only x86 with SSE3 can).

    Why: x86 arithmetic on subnormal numbers is about 100x slower than on normal ones, and the soft segmentation's
    tails hold them (softmax with tau = 20: a residue far from a segment gets 1e-40 of it), so every product with G
    stalls: the deformation's (3 B, M) x (M, n) translation product took 0.8 ms forward and 1.4 ms backward at 256
    structures of 214 residues instead of 0.03-0.05 ms. A result that small is below any coordinate's rounding."""
    return torch.set_flush_denormal(True)


def _requested_threads(requested: int) -> int | None:
    """An explicit count: --threads N, else OMP_NUM_THREADS when set (batch schedulers set it); None = automatic."""
    if requested > 0:
        return requested
    environment = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(environment) if environment.isdigit() and int(environment) > 0 else None


def set_threads(requested: int, *, processes_per_host: int = 1) -> int:
    """Set torch's thread count without tuning (short commands): the explicit count, else the usable CPUs shared
    among the processes of this host, with subnormals flushed (flush_denormals; commands call this before their
    work). Returns the count set."""
    flush_denormals()
    usable = usable_cpus()
    count = _requested_threads(requested)
    if count is None:
        count = max(1, usable // max(1, processes_per_host))
    elif count > usable:
        logger.warning(
            "%d threads is more than the %d CPU(s) this process may use: threads will wait for each other",
            count, usable,
        )  # fmt: skip
    torch.set_num_threads(count)
    return count


def configure_threads(requested: int, device: torch.device, *, processes_per_host: int = 1) -> ThreadTuner | None:
    """Set torch's thread count for a training run; returns a ThreadTuner when the count is to be chosen by timing:
    on one CPU process with no explicit count (--threads, OMP_NUM_THREADS). On a GPU, or with several processes on
    this host, the usable CPUs are shared out and fixed."""
    count = set_threads(requested, processes_per_host=processes_per_host)
    if _requested_threads(requested) is not None or device.type != "cpu" or processes_per_host > 1 or count == 1:
        return None
    return ThreadTuner(count)
