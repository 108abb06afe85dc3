"""The original cryoSPHERE (PyPI cryosphere 0.6.1) and cryoflex, side by side: training ms/step and peak memory.

Run: .venv/bin/python benchmarks/compare_original.py [--rows 214:64:128:6 2750:64:32:20] [--steps 10] [--rounds 2]
     [--threads N] [--original-clash full|pairs] [--venv DIR] [--work DIR]
     [--out benchmarks/results/compare_original_cpu.json]
Both programs train on the same simulated particles (train_throughput.py's structures and simulation: 214 residues =
AdK, other sizes synthetic chains), with the same batch, segments, latent size, network widths, segmentation
temperature, Gaussian width, learning rates, loss weights (as constant schedules in the original; cryoflex ramps
its latent KL), seed and data-loader workers: cryoflex's defaults. cryoflex runs twice: with the original's encoder,
which reads the full box (encoder_downsample 1: equal work), and with its default, which reads the image
Fourier-cropped to half the box (never below 32 px). Each row and each program runs in a fresh process:
WARMUP_STEPS untimed steps, then --steps timed ones, a step counting from the batch's loading to the optimizer step.
Rows are RESIDUES:BOX_PX:BATCH[:SEGMENTS]. Each row alternates the programs --rounds times (original, cryoflex
full-box, cryoflex default, original, ...) and reports each one's median ms/step over the rounds: on a shared
machine, timings of one process can drift by 1.4x from one minute to the next, and alternating spreads that drift
over every side.

The original runs in a virtual environment of its own (--venv; made on first use and re-used while it imports):
torch==2.13.0 first (a CPU build on this project's machines), then cryosphere==0.6.1 without its declared
dependencies (they name CUDA packages and triton) and ORIGINAL_DEPENDENCIES, the packages its modules import, with
the wandb pin it declares. Its `import torchvision` gets a stand-in package (_torchvision_standin.py: resize only).
_original_step.py times the original's own set-up and loop body there (see its docstring for what a step calls and
the deviations a single CPU process forces). The original's clash loss is its full one (all pairs, as in its example
parameters.yaml) or, with --original-clash pairs, its light one (pairs 4-10 A apart in the base structure);
cryoflex's is its neighbour list. The original reads the base structure with force-field residue names made
standard (its reader drops e.g. CHARMM's HSD histidines of AdK), so both models have every residue.
cryoflex's side is train_throughput.py's time_steps and run_single_row, in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _measure import cpu_name
from train_throughput import (
    RESULT_PREFIX,
    WARMUP_STEPS,
    Row,
    encoder_flags,
    row_structure,
    run_single_row,
    simulate_particles,
)

from cryoflex.config import CORRELATION_WEIGHTS, TrainConfig
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.structure import read_structure, write_structure

BENCHMARKS = Path(__file__).resolve().parent
DRIVER = BENCHMARKS / "_original_step.py"
TORCHVISION_STANDIN = BENCHMARKS / "_torchvision_standin.py"
DEFAULT_ROWS = ("214:64:128:6", "2750:64:32:20")
DEFAULT_STEPS = 10
ORIGINAL_SPEC = "cryosphere==0.6.1"
DEFAULT_VENV = Path.home() / ".cache" / "cryoflex" / "original-cryosphere-0.6.1"
TORCH_SPEC = "torch==2.13.0"  # on this project's machines a local CPU build; any other spec pulls CUDA packages
# What the modules that the step imports (cryosphere.model.*) import, wandb at the version cryosphere pins.
ORIGINAL_DEPENDENCIES = (
    "numpy", "scipy", "pandas", "matplotlib", "PyYAML", "tqdm", "einops", "roma", "mrcfile", "starfile", "gemmi",
    "biotite", "wandb==0.18.3",
)  # fmt: skip
ORIGINAL_IMPORT_CHECK = (
    "import torch, cryosphere.model.utils; "
    f"assert torch.__version__.split('+')[0] == {TORCH_SPEC.split('==')[1]!r}, torch.__version__"
)
ORIGINAL_ENV = {"WANDB_MODE": "disabled", "WANDB_SILENT": "true"}  # never log anywhere, even if asked
MIN_ORIGINAL_IMAGES = 100  # the original estimates its normalisation from every (n // 100)-th image: n >= 100
STANDARD_NAMES = {  # force-field amino-acid names that biotite's amino-acid filter (the original's reader) drops
    "HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "HID": "HIS", "HIE": "HIS", "HIP": "HIS",
    "CYX": "CYS", "CYM": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS",
}  # fmt: skip
STANDIN_INIT = '"""Stand-in written by cryoflex\'s benchmarks/compare_original.py, not torchvision: see {}."""\n'


# ---------------------------------------------------------------- the original's environment


def site_packages(python: Path) -> Path:
    """The purelib folder of the environment whose interpreter is `python`."""
    command = [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    return Path(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip())


def original_imports(python: Path) -> bool:
    """Whether the environment imports the original's modules on the expected torch."""
    if not python.exists():
        return False
    check = subprocess.run(
        [str(python), "-c", ORIGINAL_IMPORT_CHECK], capture_output=True, env={**os.environ, **ORIGINAL_ENV}
    )
    return check.returncode == 0


def install_torchvision_standin(python: Path) -> None:
    """Write the torchvision stand-in package (transforms.functional.resize only) into the environment."""
    package = site_packages(python) / "torchvision"
    (package / "transforms").mkdir(parents=True, exist_ok=True)
    for init in (package / "__init__.py", package / "transforms" / "__init__.py"):
        init.write_text(STANDIN_INIT.format(TORCHVISION_STANDIN.name))
    (package / "transforms" / "functional.py").write_text(TORCHVISION_STANDIN.read_text())


def pip_install(python: Path, packages: list[str]) -> None:
    """pip install into the environment; its output only on failure (pip also reports cryosphere's declared
    dependencies left out on purpose)."""
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *packages]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stdout[-2000:]}{completed.stderr[-4000:]}")


def ensure_original_env(venv: Path) -> Path:
    """The Python of a virtual environment that runs the original; made (or repaired) unless it already imports."""
    python = venv / "bin" / "python"
    if original_imports(python):
        return python
    print(f"installing {ORIGINAL_SPEC} into {venv} (once)", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for packages in ([TORCH_SPEC], ["--no-deps", ORIGINAL_SPEC], list(ORIGINAL_DEPENDENCIES)):
        pip_install(python, packages)
    install_torchvision_standin(python)
    if not original_imports(python):
        raise RuntimeError(f"{venv}: the original still does not import; run {python} -c {ORIGINAL_IMPORT_CHECK!r}")
    return python


# ---------------------------------------------------------------- one row, each program in its own process


def original_settings(row: Row, clash: str) -> dict[str, Any]:
    """The settings the driver gives the original: the row and cryoflex's defaults where the two have the same."""
    defaults = TrainConfig()
    return dict(
        batch_size=row.batch, segments=row.segments, latent_dim=defaults.latent_dim, tau=defaults.tau,
        sigma_A=defaults.sigma_A, encoder_hidden=defaults.encoder_hidden, decoder_hidden=defaults.decoder_hidden,
        learning_rate=defaults.learning_rate, segmentation_learning_rate=defaults.segmentation_learning_rate,
        num_workers=defaults.num_workers, seed=defaults.seed, segmentation_kl_weight=defaults.segmentation_kl_weight,
        clash_cutoff_A=defaults.clash_cutoff_A, full_clash=clash == "full",
        **CORRELATION_WEIGHTS,  # the original's loss is 1 - correlation: cryoflex's weights for that loss
    )  # fmt: skip


def standard_names_structure(data_dir: Path, work_dir: Path) -> Path:
    """nominal.pdb with force-field amino-acid names made standard, written for the original's reader."""
    structure = read_structure(data_dir / "nominal.pdb")
    names = np.array([STANDARD_NAMES.get(name, name) for name in structure.residue_names.tolist()])
    path = work_dir / "nominal_standard_names.pdb"
    write_structure(path, replace(structure, residue_names=names))
    return path


def thread_flags(args: argparse.Namespace) -> list[str]:
    """--threads for a measuring process, when given."""
    return ["--threads", str(args.threads)] if args.threads else []


def measured(command: list[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a measuring process and return the figures of its RESULT line."""
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return dict(json.loads(lines[-1][len(RESULT_PREFIX) :]))


def measure_original(
    python: Path, row: Row, settings: dict[str, Any], data_dir: Path, work_dir: Path, args: argparse.Namespace
) -> dict:
    """The original's figures for the row, from _original_step.py in its environment."""
    work_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(python), str(DRIVER), "--data-dir", str(data_dir), "--structure",
        str(standard_names_structure(data_dir, work_dir)), "--work-dir", str(work_dir),
        "--settings", json.dumps(settings), "--warmup", str(WARMUP_STEPS), "--steps", str(args.steps),
        *thread_flags(args),
    ]  # fmt: skip
    result = measured(command, f"original cryoSPHERE, row {row.label}", {**os.environ, **ORIGINAL_ENV})
    if result["residues"] != row.residues:
        raise RuntimeError(f"row {row.label}: the original read {result['residues']} residues")
    return result


def measure_cryoflex(
    row: Row, data_dir: Path, run_dir: Path, args: argparse.Namespace, encoder_downsample: int | None
) -> dict:
    """cryoflex's figures for the row, from this script's --cryoflex-row mode in a fresh process; encoder_downsample
    1 is the original's full-box encoder (equal work), None cryoflex's default."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--cryoflex-row", row.label, "--data-dir", str(data_dir),
        "--run-dir", str(run_dir), "--steps", str(args.steps), *thread_flags(args), *encoder_flags(encoder_downsample),
    ]  # fmt: skip
    return measured(command, f"cryoflex, row {row.label}")


def run_cryoflex_row(args: argparse.Namespace) -> None:
    """Child process: train_throughput's single-row measurement on CPU, with --threads torch threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    row_args = argparse.Namespace(
        single_row=args.cryoflex_row, data_dir=args.data_dir, run_dir=args.run_dir, steps=args.steps, device="cpu",
        compile=False, precision="fp32", encoder_downsample=args.encoder_downsample,
    )  # fmt: skip
    run_single_row(row_args)


# ---------------------------------------------------------------- all rows


def print_row(label: str, original: dict, equal: dict, default: dict) -> None:
    """One line of the table (cryoflex with the original's full-box encoder, then with its default encoder); notes the
    original's steps whose loss was NaN or infinite (it is not stopped)."""
    nonfinite = original["nonfinite_loss_steps"]
    note = f"  (original: {nonfinite} non-finite losses)" if nonfinite else ""
    print(
        f"{label:>14} {original['ms_per_step']:>9.1f} {equal['ms_per_step']:>9.1f} "
        f"{original['ms_per_step'] / equal['ms_per_step']:>8.2f} {default['ms_per_step']:>9.1f} "
        f"{original['ms_per_step'] / default['ms_per_step']:>8.2f} {original['peak_anonymous_rss_MB']:>8.0f} "
        f"{equal['peak_anonymous_rss_MB']:>8.0f}{note}",
        flush=True,
    )


def run_all(args: argparse.Namespace, python: Path, work: Path) -> list[dict]:
    """Simulate each (structure, box) once, then measure every row with both programs; prints the table."""
    datasets: dict[tuple[int, int], Path] = {}
    results = []
    print("               ------------------ ms/step ------------------  -- anon RSS MB --")
    print("                          cryoflex, full-box encoder  default")
    print("row            original  cryoflex speed-up  cryoflex speed-up original cryoflex")
    for row in args.rows:
        key = (row.residues, row.box_px)
        if key not in datasets:
            n_images = max(
                MIN_ORIGINAL_IMAGES,
                max(r.batch for r in args.rows if (r.residues, r.box_px) == key) * (WARMUP_STEPS + args.steps),
            )
            datasets[key] = simulate_particles(
                row_structure(row.residues, work), row.box_px, n_images, work / f"data_{row.residues}_{row.box_px}"
            )
        name = row.label.replace(":", "_")
        settings = original_settings(row, args.original_clash)
        rounds = [
            (
                measure_original(python, row, settings, datasets[key], work / f"original_{name}_{k}", args),
                measure_cryoflex(row, datasets[key], work / f"cryoflex_{name}_{k}", args, encoder_downsample=1),
                measure_cryoflex(row, datasets[key], work / f"cryoflex_default_{name}_{k}", args, None),
            )
            for k in range(args.rounds)
        ]
        original, equal, default = (
            dict(rounds[0][side], ms_per_step=statistics.median(r[side]["ms_per_step"] for r in rounds))
            for side in range(3)
        )
        print_row(row.label, original, equal, default)
        result = dict(
            label=row.label, residues=row.residues, box_px=row.box_px, batch=row.batch, segments=row.segments,
            speed_up=original["ms_per_step"] / equal["ms_per_step"],
            speed_up_default_encoder=original["ms_per_step"] / default["ms_per_step"], original_settings=settings,
            original_ms_per_round=[r[0]["ms_per_step"] for r in rounds],
            cryoflex_ms_per_round=[r[1]["ms_per_step"] for r in rounds],
            cryoflex_default_encoder_ms_per_round=[r[2]["ms_per_step"] for r in rounds],
            original=original, cryoflex=equal, cryoflex_default_encoder=default,
        )  # fmt: skip
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows", nargs="+", type=Row.parse, help=f"RESIDUES:BOX_PX:BATCH[:SEGMENTS] (default {' '.join(DEFAULT_ROWS)})"
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"timed steps (default {DEFAULT_STEPS})")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two programs per row (default 2)")
    parser.add_argument("--threads", type=int, help="torch threads in both processes (default: torch's default)")
    parser.add_argument(
        "--original-clash", choices=("full", "pairs"), default="full",
        help="the original's clash loss: full (all pairs, its example default) or pairs (its light version)",
    )  # fmt: skip
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"the original's environment ({DEFAULT_VENV})")
    parser.add_argument("--work", type=Path, help="keep the simulated data and runs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_original_cpu.json"))
    parser.add_argument("--cryoflex-row", type=Row.parse, help=argparse.SUPPRESS)
    parser.add_argument("--encoder-downsample", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cryoflex_row is not None:
        run_cryoflex_row(args)
        return
    args.rows = args.rows or [Row.parse(spec) for spec in DEFAULT_ROWS]
    python = ensure_original_env(args.venv.expanduser())
    print(
        f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {args.threads or 'default'}, "
        f"{args.steps} timed steps after {WARMUP_STEPS}, original clash loss: {args.original_clash}"
    )
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        rows = run_all(args, python, args.work.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="cryoflex_compare_original_") as work:
            rows = run_all(args, python, Path(work))
    result = dict(
        cpu=cpu_name(), machine=platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
        threads=args.threads, steps=args.steps, warmup_steps=WARMUP_STEPS, original=ORIGINAL_SPEC,
        original_venv=str(args.venv), original_clash=args.original_clash, rows=rows,
    )  # fmt: skip
    write_text_atomic(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
