"""Training beside other jobs: images/s of `cryoflex train` alone, with a second identical run started at the same
moment, and beside one busy Python loop, for each thread setting.

Run: .venv/bin/python benchmarks/concurrent_runs.py [--rows 214:32:32 2750:64:32] [--settings 2 1 auto]
     [--images 12000] [--out benchmarks/results/concurrent_cpu.json]
Rows are RESIDUES:BOX_PX:BATCH (structures and particles as in train_throughput.py, simulated once per row). A setting
is a --threads value: a number pins the count, auto is the default (threads 0: timed choice, cryoflex.threads).
Every run is a fresh `cryoflex train` process (2 epochs, no validation share, no cache, no progress bar; one draw
per image with the original objective, as the other step figures, or training's default objective with
--default-objective) with OMP_NUM_THREADS unset; its images/s is the training loop's rate in the last epoch
(metrics.jsonl). "kept" = rate when shared / rate alone: the issue asks >= 40% for two runs started together.
Measure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _measure import cpu_name
from train_throughput import Row, row_structure, simulate_particles

from cryoflex.io.atomic import write_text_atomic
from cryoflex.threads import usable_cpus

DEFAULT_ROWS = ("214:32:32",)
DEFAULT_SETTINGS = ("2", "1", "auto")
EPOCHS = 2
BUSY_LOOP = "while True: pass"


def train_command(data: Path, run: Path, row: Row, setting: str, default_objective: bool) -> list[str]:
    """The training command of one run; default_objective keeps training's own objective (8 draws per image) instead
    of the step of the recorded figures (train_throughput.STEP_OBJECTIVE: one draw, the original objective and
    rendering)."""
    threads = "0" if setting == "auto" else setting
    objective = [] if default_objective else [
        "--likelihood", "correlation", "--importance-samples", "1", "--rendering", "point",
    ]  # fmt: skip
    return [
        sys.executable, "-m", "cryoflex", "train", "--particles", str(data / "particles.star"),
        "--structure", str(data / "nominal.pdb"), "--out", str(run), "--segments", str(row.segments),
        "--batch-size", str(row.batch), "--epochs", str(EPOCHS), "--validation-fraction", "0", "--no-cache",
        "--no-progress", "--device", "cpu", "--threads", threads, *objective,
    ]  # fmt: skip


def last_epoch(run: Path) -> dict:
    """The last epoch record of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "epoch"][-1]


def run_together(commands: list[list[str]], with_busy_loop: bool) -> list[str]:
    """Start the commands at the same moment (and a busy loop beside them), wait for all; their logs (stderr).
    A failure raises."""
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if with_busy_loop else None
    try:
        processes = [
            subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for command in commands
        ]
        logs = []
        for process in processes:
            _, stderr = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"training failed (exit {process.returncode}):\n{stderr[-3000:]}")
            logs.append(stderr)
        return logs
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def measure(row: Row, setting: str, data: Path, work: Path, default_objective: bool) -> dict:
    """Images/s alone, each of two runs started together, and beside a busy loop."""
    label = f"{row.label.replace(':', '_')}_{setting}"
    figures: dict = {"row": row.label, "setting": setting, "default_objective": default_objective}
    for scenario, runs, busy in (("alone", 1, False), ("pair", 2, False), ("busy_loop", 1, True)):
        paths = [work / f"{label}_{scenario}_{k}" for k in range(runs)]
        started = time.perf_counter()
        commands = [train_command(data, path, row, setting, default_objective) for path in paths]
        logs = run_together(commands, busy)
        epochs = [last_epoch(path) for path in paths]
        figures[scenario] = {
            "images_per_s": [e["images_per_s"] for e in epochs],
            "threads": [e.get("threads") for e in epochs],
            "wall_s": time.perf_counter() - started,
            "thread_choices": [[line.split(" INFO ", 1)[1] for line in log.splitlines() if "CPU threads:" in line]
                               for log in logs],
        }  # fmt: skip
    alone = figures["alone"]["images_per_s"][0]
    figures["pair_kept"] = [rate / alone for rate in figures["pair"]["images_per_s"]]
    figures["busy_loop_kept"] = figures["busy_loop"]["images_per_s"][0] / alone
    return figures


def print_row(figures: dict) -> None:
    alone = figures["alone"]["images_per_s"][0]
    pair = figures["pair"]["images_per_s"]
    busy = figures["busy_loop"]["images_per_s"][0]
    threads = "/".join(str(t) for t in figures["alone"]["threads"] + figures["pair"]["threads"]
                       + figures["busy_loop"]["threads"])  # fmt: skip
    print(
        f"{figures['row']:>12} {figures['setting']:>7} {alone:>8.0f} {pair[0]:>8.0f} {pair[1]:>8.0f} "
        f"{min(figures['pair_kept']):>6.0%} {busy:>8.0f} {figures['busy_loop_kept']:>6.0%}   {threads}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=Row.parse, default=[Row.parse(r) for r in DEFAULT_ROWS])
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="--threads values or auto")
    parser.add_argument("--images", type=int, default=12000, help="particles per row (default 12000)")
    parser.add_argument("--default-objective", action="store_true",
                        help="train with the default objective (8 draws per image) instead of the recorded step's")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/concurrent_cpu.json"))
    args = parser.parse_args()
    print(f"{cpu_name()}, {os.cpu_count()} CPUs ({usable_cpus()} usable), torch {torch.__version__}")
    print("images/s in the last of 2 epochs; kept = shared / alone; threads: alone / pair / busy loop (last epoch)")
    print(f"{'row':>12} {'setting':>7} {'alone':>8} {'pair 1':>8} {'pair 2':>8} {'kept':>6} {'+busy':>8} {'kept':>6}")
    results = []
    with tempfile.TemporaryDirectory(prefix="cryoflex_concurrent_") as work_dir:
        work = Path(work_dir)
        for row in args.rows:
            data = simulate_particles(row_structure(row.residues, work), row.box_px, args.images, work / "data")
            for setting in args.settings:
                results.append(measure(row, setting, data, work, args.default_objective))
                print_row(results[-1])
            shutil.rmtree(work / "data")
    write_text_atomic(args.out, json.dumps(dict(
        cpu=cpu_name(), cpus=os.cpu_count(), usable_cpus=usable_cpus(), torch=torch.__version__, epochs=EPOCHS,
        images=args.images, rows=results,
    ), indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
