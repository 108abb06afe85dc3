"""The CPU thread choice: usable CPUs from affinity and cgroup quotas (on fixture files), the timing tuner's
decisions (with a fake clock), and --threads reaching torch. Nothing here measures time."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cryoflex.threads import (
    ThreadTuner,
    candidate_counts,
    cgroup_cpu_quota,
    configure_threads,
    cpu_limit,
)


def _cgroup_v2(tmp_path: Path, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 tree under tmp_path: this process in /job/step; limits maps a relative directory to cpu.max."""
    root = tmp_path / "cgroup"
    (root / "job" / "step").mkdir(parents=True)
    for directory, value in limits.items():
        (root / directory / "cpu.max").write_text(value + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job/step\n")
    return root, proc


def test_cgroup_v2_quota_is_the_tightest_of_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    root, proc = _cgroup_v2(tmp_path, {"job": "300000 100000", "job/step": "max 100000"})
    assert cgroup_cpu_quota(root, proc) == pytest.approx(3.0)
    root, proc = _cgroup_v2(tmp_path / "b", {"job": "400000 100000", "job/step": "150000 100000"})
    assert cgroup_cpu_quota(root, proc) == pytest.approx(1.5)


def test_cgroup_v2_without_limit_and_unreadable_files_give_none(tmp_path: Path) -> None:
    root, proc = _cgroup_v2(tmp_path, {"job/step": "max 100000"})
    assert cgroup_cpu_quota(root, proc) is None
    assert cgroup_cpu_quota(tmp_path / "absent", tmp_path / "absent_proc") is None
    root, proc = _cgroup_v2(tmp_path / "bad", {"job/step": "garbage"})
    assert cgroup_cpu_quota(root, proc) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    controller = root / "cpu,cpuacct" / "slurm" / "job_7"
    controller.mkdir(parents=True)
    (controller / "cpu.cfs_quota_us").write_text("200000\n")
    (controller / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # the root: no limit
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:memory:/slurm/job_7\n4:cpu,cpuacct:/slurm/job_7\n1:name=systemd:/init.scope\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(2.0)


def test_cpu_limit_caps_affinity_by_quota_and_never_goes_below_one() -> None:
    assert cpu_limit(16, None) == 16
    assert cpu_limit(16, 4.0) == 4
    assert cpu_limit(2, 8.0) == 2
    assert cpu_limit(8, 2.5) == 2  # a fractional quota rounds down: 3 threads would be throttled
    assert cpu_limit(8, 0.5) == 1


def test_candidates_halve_down_to_one() -> None:
    assert candidate_counts(16) == [16, 8, 4, 2, 1]
    assert candidate_counts(6) == [6, 3, 1]
    assert candidate_counts(1) == [1]


class _FakeMachine:
    """A clock that advances by the step time of the current thread count: seconds_per_image[threads] x images."""

    def __init__(self, seconds_per_image: dict[int, float]):
        self.seconds_per_image = seconds_per_image
        self.now = 0.0
        self.threads = 0
        self.settings: list[int] = []

    def clock(self) -> float:
        return self.now

    def set_threads(self, count: int) -> None:
        self.threads = count
        self.settings.append(count)

    def run(self, tuner: ThreadTuner, steps: int, images: int = 32) -> list[int]:
        """Run `steps` steps through the tuner; the thread count each one ran with."""
        used = []
        for batch in tuner.wrap([[0] * images for _ in range(steps)]):
            used.append(self.threads)
            self.now += self.seconds_per_image[self.threads] * len(batch)
        return used


def test_tuner_keeps_the_fastest_count_and_rechecks_later() -> None:
    machine = _FakeMachine({4: 1e-3, 2: 2e-3, 1: 3e-3})  # alone: more threads are faster
    tuner = ThreadTuner(4, reprobe_s=10.0, clock=machine.clock, set_threads=machine.set_threads)
    used = machine.run(tuner, 30)
    assert tuner.threads == 4 and used[-1] == 4
    assert set(tuner.history[0]) == {4, 2, 1}  # (1 is 3x slower than 4: dropped after one timed step)
    # another job starts: more threads now wait for each other and are slowest
    machine.seconds_per_image = {4: 30e-3, 2: 10e-3, 1: 1.5e-3}
    used = machine.run(tuner, 400)
    assert tuner.threads == 1 and used[-1] == 1
    assert len(tuner.history) >= 2
    # ... and ends: the next probe goes back to all threads
    machine.seconds_per_image = {4: 1e-3, 2: 2e-3, 1: 3e-3}
    machine.run(tuner, 400)
    assert tuner.threads == 4


def test_tuner_drops_a_collapsed_candidate_after_one_timed_step() -> None:
    machine = _FakeMachine({2: 50e-3, 1: 1e-3})
    tuner = ThreadTuner(2, warmup_steps=0, probe_steps=3, clock=machine.clock, set_threads=machine.set_threads)
    used = machine.run(tuner, 20)
    # the probe tries 2 first (1 settling + 3 timed), then 1 (1 settling + 3 timed), then keeps 1
    assert used[:8] == [2, 2, 2, 2, 1, 1, 1, 1]
    assert used[8:] == [1] * 12
    machine2 = _FakeMachine({2: 1e-3, 1: 50e-3})
    tuner2 = ThreadTuner(2, warmup_steps=0, probe_steps=3, clock=machine2.clock, set_threads=machine2.set_threads)
    used2 = machine2.run(tuner2, 20)
    assert used2[:6] == [2, 2, 2, 2, 1, 1]  # 1 thread: one settling step, one timed step 50x slower, dropped
    assert used2[6:] == [2] * 14


def test_explicit_threads_reach_torch_and_disable_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(1, torch.device("cpu")) is None
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_threads(0, torch.device("cpu")) is None  # a scheduler's OMP_NUM_THREADS is respected
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr("cryoflex.threads.usable_cpus", lambda: 4)
        tuner = configure_threads(0, torch.device("cpu"))
        assert tuner is not None and tuner.candidates == [4, 2, 1]
        assert configure_threads(0, torch.device("cpu"), processes_per_host=2) is None
        assert torch.get_num_threads() == 2  # 4 usable CPUs shared by two processes
    finally:
        torch.set_num_threads(before)


def test_train_threads_option_reaches_the_config() -> None:
    from cryoflex.cli import build_parser
    from cryoflex.cli.train import resolve_config

    args = build_parser().parse_args(
        ["train", "--particles", "p.star", "--structure", "s.pdb", "--out", "run", "--threads", "3"]
    )
    assert resolve_config(args).threads == 3


@pytest.mark.parametrize("command", ["simulate", "analyze", "eval", "reconstruct"])
def test_other_commands_take_a_fixed_thread_count(command: str) -> None:
    from cryoflex.cli import apply_threads, build_parser

    required = {
        "simulate": ["--out", "o", "--n-images", "1"], "eval": ["run1", "--truth", "t.npz"]
    }.get(command, ["run1"])
    args = build_parser().parse_args([command, *required, "--threads", "1"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        apply_threads(args)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_tuner_reprobes_at_once_when_steps_slow_down() -> None:
    """A job that starts beside the run makes the kept count slow: the next probe comes within a few steps, long
    before the periodic one."""
    machine = _FakeMachine({2: 1e-3, 1: 1.5e-3})
    tuner = ThreadTuner(2, reprobe_s=1e6, clock=machine.clock, set_threads=machine.set_threads)
    machine.run(tuner, 20)
    assert tuner.threads == 2 and len(tuner.history) == 1
    machine.seconds_per_image = {2: 20e-3, 1: 1.6e-3}
    used = machine.run(tuner, 20)
    assert len(tuner.history) == 2 and tuner.threads == 1
    assert used[-8:] == [1] * 8


def test_slowdown_probes_that_change_nothing_back_off() -> None:
    """Bursts of slow steps (a neighbour's own probes) in which no other count is faster: the slow-down probes come
    ever further apart instead of after every burst."""
    machine = _FakeMachine({2: 1e-3, 1: 3e-3})
    tuner = ThreadTuner(2, reprobe_s=1e6, clock=machine.clock, set_threads=machine.set_threads)
    machine.run(tuner, 20)
    for step, batch in enumerate(tuner.wrap([[0] * 32 for _ in range(600)])):
        burst = step % 12 < 4  # 4 slow steps in every 12
        machine.now += machine.seconds_per_image[machine.threads] * len(batch) * (4.0 if burst else 1.0)
    probes = len(tuner.history) - 1
    assert tuner.threads == 2
    assert 2 <= probes <= 8, probes  # one per burst (50) without the back-off


def test_probes_of_slow_steps_take_at_most_a_tenth_of_the_time() -> None:
    machine = _FakeMachine({4: 10e-3, 2: 20e-3, 1: 40e-3})  # 32 images: 0.3-1.3 s steps
    tuner = ThreadTuner(4, reprobe_s=1.0, clock=machine.clock, set_threads=machine.set_threads)
    used = machine.run(tuner, 300)
    probing_steps = sum(count != 4 for count in used)
    assert tuner.threads == 4 and probing_steps <= 0.1 * len(used)


def test_counts_within_ten_percent_do_not_alternate() -> None:
    machine = _FakeMachine({2: 1.00e-3, 1: 1.05e-3})
    tuner = ThreadTuner(2, reprobe_s=0.05, clock=machine.clock, set_threads=machine.set_threads)
    machine.run(tuner, 20)
    assert tuner.threads == 2
    machine.seconds_per_image = {2: 1.05e-3, 1: 1.00e-3}  # now 1 is faster, but only by 5%
    machine.run(tuner, 100)
    assert len(tuner.history) >= 2 and tuner.threads == 2  # probed again in this regime, and kept 2
    machine.seconds_per_image = {2: 1.5e-3, 1: 1.00e-3}  # 1 is 50% faster: switch
    machine.run(tuner, 100)
    assert tuner.threads == 1


def _nonzero_subnormal_products(setup: str) -> tuple[int, int]:
    """In a fresh process with 2 torch threads: run setup, then a (1024, 64) x (64, 1024) matrix product of entries
    1e-20, whose every term and sum (6.4e-39) is subnormal, split between the threads; returns how many entries
    stayed non-zero, and of how many."""
    script = "\n".join([
        "import torch", "from cryoflex.threads import flush_denormals, set_threads", "torch.set_num_threads(2)", setup,
        "x = torch.full((1024, 64), 1e-20) @ torch.full((64, 1024), 1e-20)",
        "print(int(torch.count_nonzero(x)), x.numel())",
    ])  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    nonzero, total = result.stdout.split()
    return int(nonzero), int(total)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="subnormal flushing is x86's (SSE3)")
def test_commands_flush_subnormals_in_every_thread() -> None:
    assert _nonzero_subnormal_products("pass") == (1 << 20, 1 << 20)  # torch's default keeps them
    # set_threads (every command's first step) flushes before torch starts its threads: all of them inherit it
    assert _nonzero_subnormal_products("set_threads(2)")[0] == 0
    # flushed only after the threads started, the other thread keeps its subnormals: the order matters
    nonzero, total = _nonzero_subnormal_products("torch.randn(1024, 64) @ torch.randn(64, 1024); flush_denormals()")
    assert 0 < nonzero < total


def test_training_flushes_subnormals_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cryoflex.train import loop

    calls = []
    monkeypatch.setattr(loop, "flush_denormals", lambda: calls.append("flush"))

    def start_processes(device: str) -> None:
        calls.append("start")
        raise RuntimeError("stopped before any work")

    monkeypatch.setattr(loop, "start_processes", start_processes)
    with pytest.raises(RuntimeError, match="stopped before any work"):
        loop.train(SimpleNamespace(device="cpu"), tmp_path)  # type: ignore[arg-type]
    assert calls == ["flush", "start"]
