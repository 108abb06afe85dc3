"""Training throughput (images/s of a full step) and peak memory through the real training objects.

Run: .venv/bin/python benchmarks/train_throughput.py [--device cpu|cuda] [--steps 10] [--rows 214:64:32 ...]
     [--precision auto|fp32|bf16] [--compile] [--default-objective] [--quick] [--work DIR]
     [--out benchmarks/results/train_cpu.json]
A step is what one iteration of cryoflex.train.loop._train does: load a batch from the ParticleDataset (cached, memory
mapped), forward, every loss term (correlation, both KLs, continuity, clash from the neighbour list, rebuilt every
neighbour_list_every_steps steps), backward, Adam step, and the loop's read-back of the loss values. The set-up
(simulation, cache build, model build) is not timed; the first WARMUP_STEPS steps are run but not timed.
--precision, --compile and --encoder-downsample set the run's config fields of the same names (bf16 autocast of the
encoder and decoder; torch.compile of the deformation; the Fourier-cropping of the encoder's input, 1 = the full box
as in the original); --default-objective times training's own objective (8 draws per image, the Gaussian likelihood,
band-limited rendering) instead of the original's (one draw, 1 - correlation, point samples). With --work, simulated
datasets already there are reused (a dataset's folder names its residues, box and image count), so that several runs
with other settings share one simulation.

Rows are RESIDUES:BOX_PX:BATCH[:SEGMENTS]. 214 residues = the AdK trajectory's first frame (tests/data); other sizes are
synthetic compact C-alpha chains (self-avoiding 3.8 A random walks inside a sphere of protein density, one chain per
RESIDUES_PER_CHAIN residues, fixed seed) written to PDB and read back, so training reads them as it reads any PDB.
The pixel size makes the box BOX_MARGIN x the structure's diameter. Particles: simulate_dataset of a 2-model ensemble
(the structure and a copy with 1 A Gaussian noise) at SNR 0.1, one dataset per (structure, box).
Each row runs in a fresh subprocess: peak RSS (ru_maxrss) and its increase over the RSS right after imports, plus the
peak anonymous RSS (sampled; excludes file pages of memory-mapped stacks and caches); on CUDA also
torch.cuda.max_memory_allocated. compare_original.py runs the original cryoSPHERE (PyPI cryosphere 0.6.1) beside
cryoflex on the same particles, for its time per step and peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from _measure import AnonymousPeak, cpu_name, peak_rss_MB

from cryoflex.config import load_config
from cryoflex.data.dataset import particle_loader
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.structure import Structure, read_structure, write_structure
from cryoflex.io.trajectory import read_trajectory
from cryoflex.simulate import SimulationConfig, simulate_dataset
from cryoflex.threads import flush_denormals
from cryoflex.train.distributed import epoch_batches, resolve_device
from cryoflex.train.loop import train_step
from cryoflex.train.objective import LossTerms
from cryoflex.train.setup import build_optimizer, prepare_inputs, prepare_model

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
ADK_RESIDUES = 214
WARMUP_STEPS = 2
# The step timed here by default: one draw per image with the original objective and the original's rendering (the
# Gaussians sampled at the pixel centres), the original's step and that of docs/benchmarks.md's throughput tables.
# The default objective draws importance_samples = 8 latents per image, which renders and deforms 8 structures per
# image: 3.0x the one-draw step's time at 214 residues and 32 px, 7.1x at 2,750 and 64 px (draws_cost.py); the
# default band-limited rendering costs 0.95-1.22x per default step (rendering_cost.py, two runs).
STEP_OBJECTIVE = {"likelihood": "correlation", "importance_samples": 1, "rendering": "point"}
# Training's own default objective (the Gaussian likelihood's importance-weighted bound over 8 draws per image), for
# the benchmarks that time the step a user runs (--default-objective); the rendering is then training's default
# (band-limited) too.
DEFAULT_OBJECTIVE = {"likelihood": "gaussian", "importance_samples": 8}
BOX_MARGIN = 1.3
SNR = 0.1
PERTURBATION_A = 1.0  # std of the noise that makes the ensemble's second model
VOLUME_PER_RESIDUE_A3 = 135.0  # protein density: ~1.35 g/cm^3 at ~110 Da per residue
STEP_A = 3.8  # consecutive C-alpha distance
MIN_SEPARATION_A = 4.0  # non-consecutive C-alpha closer than this would clash
RESIDUES_PER_CHAIN = 3500
WALK_CANDIDATES = 32
STRUCTURE_SEED = 0
AMINO_ACIDS = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
               "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL")  # fmt: skip
GRID_ROWS = tuple(f"{n}:{box}:{batch}" for n in (214, 2750, 13941) for box in (64, 128) for batch in (32, 128))
QUICK_ROWS = ("214:32:4", "345:32:4:20", "4000:32:4")
QUICK_STEPS = 2
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class Row:
    residues: int
    box_px: int
    batch: int
    segments: int = 6

    @property
    def label(self) -> str:
        return f"{self.residues}:{self.box_px}:{self.batch}:{self.segments}"

    @staticmethod
    def parse(spec: str) -> Row:
        """'RESIDUES:BOX:BATCH[:SEGMENTS]' -> Row."""
        values = [int(value) for value in spec.split(":")]
        if len(values) not in (3, 4):
            raise argparse.ArgumentTypeError(f"row {spec!r}: use RESIDUES:BOX_PX:BATCH[:SEGMENTS]")
        return Row(*values)


# ---------------------------------------------------------------- structures and particles


def chain_starts(n_residues: int) -> np.ndarray:
    """First residue of each chain of a synthetic structure: one chain per RESIDUES_PER_CHAIN residues."""
    n_chains = math.ceil(n_residues / RESIDUES_PER_CHAIN)
    return np.linspace(0, n_residues, n_chains + 1).astype(int)[:-1]


def compact_chain_A(n_residues: int, starts: np.ndarray, seed: int) -> np.ndarray:
    """(n, 3) C-alpha positions: self-avoiding 3.8 A random walks (one per chain start) inside a sphere of protein
    density.

    Each step takes the first of WALK_CANDIDATES random directions that stays in the sphere and MIN_SEPARATION_A away
    from every earlier residue but the previous one (or, when none does, the candidate farthest from them).
    """
    radius_A = (3.0 * VOLUME_PER_RESIDUE_A3 * n_residues / (4.0 * math.pi)) ** (1.0 / 3.0)
    cell_A = STEP_A + MIN_SEPARATION_A  # one cell around the previous residue holds every possible clash partner
    rng = np.random.default_rng(seed)
    coords = np.zeros((n_residues, 3))
    cells: dict[tuple[int, ...], list[int]] = {}
    first_residues = set(starts.tolist())

    def nearby(point: np.ndarray, exclude: int) -> np.ndarray:
        centre = np.floor(point / cell_A).astype(int)
        found = [
            index
            for offset in np.ndindex(3, 3, 3)
            for index in cells.get(tuple(centre + np.array(offset) - 1), ())
            if index != exclude
        ]
        return coords[found]

    for i in range(n_residues):
        if i in first_residues:
            candidates = rng.uniform(-radius_A, radius_A, size=(WALK_CANDIDATES, 3))
            neighbours = [nearby(candidate, -1) for candidate in candidates]
        else:
            directions = rng.normal(size=(WALK_CANDIDATES, 3))
            candidates = coords[i - 1] + STEP_A * directions / np.linalg.norm(directions, axis=1, keepdims=True)
            neighbours = [nearby(coords[i - 1], i - 1)] * WALK_CANDIDATES
        inside = np.linalg.norm(candidates, axis=1) <= radius_A
        separation = np.array([
            np.linalg.norm(others - candidate, axis=1).min() if len(others) else np.inf
            for candidate, others in zip(candidates, neighbours, strict=True)
        ])  # fmt: skip
        separation[~inside] = -np.inf
        acceptable = np.flatnonzero(separation >= MIN_SEPARATION_A)
        if acceptable.size:
            coords[i] = candidates[acceptable[0]]
        elif inside.any():
            coords[i] = candidates[np.argmax(separation)]
        else:  # at the surface with every candidate outside: step towards the centre
            coords[i] = coords[i - 1] * (1.0 - STEP_A / np.linalg.norm(coords[i - 1]))
        cells.setdefault(tuple(np.floor(coords[i] / cell_A).astype(int)), []).append(i)
    return coords


def synthetic_structure(n_residues: int, work: Path) -> Structure:
    """A compact synthetic C-alpha structure, written as PDB and read back (amplitudes as training reads them)."""
    starts = chain_starts(n_residues)
    coords_A = compact_chain_A(n_residues, starts, STRUCTURE_SEED)
    chain_of = np.searchsorted(starts, np.arange(n_residues), side="right") - 1
    chain_ids = np.array([chr(ord("A") + c) for c in chain_of])
    first_of_chain = starts[chain_of]
    names = np.random.default_rng(STRUCTURE_SEED).choice(AMINO_ACIDS, size=n_residues)
    structure = Structure(
        coords_A=coords_A[None],
        chain_ids=chain_ids,
        residue_numbers=np.arange(n_residues) - first_of_chain + 1,
        insertion_codes=np.full(n_residues, ""),
        residue_names=names,
        atom_names=np.full(n_residues, "CA"),
        amplitudes_e=np.ones(n_residues),  # replaced by the reader's per-residue values
    )
    path = work / f"synthetic_{n_residues}.pdb"
    write_structure(path, structure)
    return read_structure(path)


def row_structure(n_residues: int, work: Path) -> Structure:
    """The one-model structure of a row: AdK's first trajectory frame for 214 residues, else a synthetic chain."""
    if n_residues == ADK_RESIDUES:
        return read_trajectory(DATA / "adk.psf", DATA / "adk_dims.dcd").model(0)
    return synthetic_structure(n_residues, work)


def diameter_A(coords_A: np.ndarray) -> float:
    """Twice the largest distance from the centroid (the sphere about the centroid that holds the structure)."""
    return 2.0 * float(np.linalg.norm(coords_A - coords_A.mean(axis=0), axis=1).max())


def simulate_particles(structure: Structure, box_px: int, n_images: int, out_dir: Path) -> Path:
    """Simulate n_images particles of the structure and a perturbed copy; returns the data directory."""
    coords_A = structure.coords_A[0]
    noise_A = np.random.default_rng(STRUCTURE_SEED + 1).normal(0.0, PERTURBATION_A, size=coords_A.shape)
    ensemble = structure.with_coords(np.stack([coords_A, coords_A + noise_A]))
    pixel_size_A = BOX_MARGIN * diameter_A(coords_A) / box_px
    config = SimulationConfig(n_images=n_images, box_size_px=box_px, pixel_size_A=pixel_size_A, snr=SNR, batch_size=32)
    simulate_dataset(ensemble, config, out_dir, progress=False)
    return out_dir


# ---------------------------------------------------------------- one row, in its own process


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    row: Row, data_dir: Path, run_dir: Path, steps: int, device_name: str, compile_: bool = False,
    precision: str = "auto", objective: dict | None = None, encoder_downsample: int | None = None,
) -> dict:  # fmt: skip
    """Run WARMUP_STEPS + steps training steps of the row and time each; seconds per step and the loader's share.
    objective: the objective's settings (default STEP_OBJECTIVE); encoder_downsample: None = the training default."""
    config = load_config(None, {
        "particles": str(data_dir / "particles.star"), "structure": str(data_dir / "nominal.pdb"),
        "segments": row.segments, "batch_size": row.batch, "epochs": 1, "progress": False, "cache": True,
        "device": device_name, "compile": compile_, "precision": precision, "encoder_downsample": encoder_downsample,
        **(STEP_OBJECTIVE if objective is None else objective),
    })  # fmt: skip
    device = resolve_device(config.device)
    inputs = prepare_inputs(config, run_dir, progress=False)
    dataset, structure = inputs.dataset, inputs.structure
    model = prepare_model(config, inputs, device)  # with compile: compiled during the warm-up steps
    optimizer = build_optimizer(config, model)
    losses = LossTerms(config, model, structure.chain_ids, len(dataset))
    batches = epoch_batches(len(dataset), config.batch_size, 0, config.seed)[: WARMUP_STEPS + steps]
    if len(batches) < WARMUP_STEPS + steps or len(batches[-1]) != row.batch:
        raise RuntimeError(f"{data_dir} holds {len(dataset)} particles: too few for {WARMUP_STEPS + steps} batches")
    loader = particle_loader(dataset, batches, num_workers=config.num_workers, pin_memory=device.type == "cuda")
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s, load_s = [], []
    synchronise(device)
    started = time.perf_counter()
    for k, batch in enumerate(loader):
        batch = batch.to(device, non_blocking=True)
        synchronise(device)
        loaded = time.perf_counter()
        values, _ = train_step(
            model, optimizer, losses, batch, k / len(batches), k % config.neighbour_list_every_steps == 0
        )
        if not math.isfinite(values["total"]):
            raise RuntimeError(f"non-finite loss at step {k + 1}")
        synchronise(device)
        finished = time.perf_counter()
        step_s.append(finished - started)
        load_s.append(loaded - started)
        started = finished
    timed = step_s[WARMUP_STEPS:]
    result = dict(
        asdict(row),
        label=row.label,
        chains=len(set(structure.chain_ids.tolist())),
        pixel_size_A=dataset.pixel_size_A,
        network_bf16=model.network_bf16,
        encoder_downsample=config.encoder_downsample,
        encoder_box_px=model.encoder.input_box_px,
        likelihood=config.likelihood,
        draws_per_image=config.draws_per_image,
        rendering=config.rendering,
        steps=steps,
        ms_per_step=1000.0 * sum(timed) / len(timed),
        median_ms_per_step=1000.0 * float(np.median(timed)),
        images_per_s=row.batch * len(timed) / sum(timed),
        load_ms_per_step=1000.0 * sum(load_s[WARMUP_STEPS:]) / len(timed),
        neighbour_rebuilds_timed=sum(
            k % config.neighbour_list_every_steps == 0 for k in range(WARMUP_STEPS, WARMUP_STEPS + steps)
        ),
        clash_pairs=int(len(losses.neighbours.pairs)),
        last_loss=values,
        step_s=step_s,
    )
    if device.type == "cuda":
        result["cuda_peak_allocated_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def alternated_ms_per_step(
    row: Row, data_dir: Path, work: Path, variants: dict[str, dict], steps: int, rounds: int
) -> dict[str, list[float]]:
    """Median ms per step of each variant (keyword arguments of time_steps), `rounds` times in turn in this one
    process, so that ratios between variants compare like with like on a shared machine."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds):
        for k, (name, settings) in enumerate(variants.items()):
            run_dir = work / f"run_{row.label.replace(':', '_')}_{round_}_{k}"
            times[name].append(time_steps(row, data_dir, run_dir, steps, "cpu", **settings)["median_ms_per_step"])
    return times


def run_single_row(args: argparse.Namespace) -> None:
    """Child process: measure one row and print its figures as one JSON line."""
    baseline_MB = peak_rss_MB()
    with AnonymousPeak() as anonymous:
        result = time_steps(
            args.single_row, args.data_dir, args.run_dir, args.steps, args.device, args.compile, args.precision,
            objective=DEFAULT_OBJECTIVE if args.default_objective else None, encoder_downsample=args.encoder_downsample,
        )
    peak_MB = peak_rss_MB()
    result.update(
        baseline_rss_MB=baseline_MB, peak_rss_MB=peak_MB, rss_increase_MB=peak_MB - baseline_MB,
        peak_anonymous_rss_MB=anonymous.peak_MB, threads=torch.get_num_threads(),
    )  # fmt: skip
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------- all rows


def encoder_flags(encoder_downsample: int | None) -> list[str]:
    """--encoder-downsample for a measuring process, when given."""
    return [] if encoder_downsample is None else ["--encoder-downsample", str(encoder_downsample)]


def measure_in_subprocess(row: Row, data_dir: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--single-row", row.label, "--data-dir", str(data_dir),
        "--run-dir", str(run_dir), "--steps", str(args.steps), "--device", args.device, "--precision", args.precision,
        *(["--compile"] if args.compile else []), *(["--default-objective"] if args.default_objective else []),
        *encoder_flags(args.encoder_downsample),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"row {row.label} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def device_description(device_name: str) -> str:
    if device_name.startswith("cuda"):
        return torch.cuda.get_device_name(resolve_device(device_name))
    return cpu_name()


def print_row(row: dict) -> None:
    cuda = f" {row['cuda_peak_allocated_MB']:>9.0f}" if "cuda_peak_allocated_MB" in row else ""
    print(
        f"{row['residues']:>8} {row['box_px']:>4} {row['batch']:>5} {row['segments']:>4} {row['ms_per_step']:>9.1f} "
        f"{row['images_per_s']:>8.1f} {row['peak_rss_MB']:>8.0f} {row['rss_increase_MB']:>7.0f} "
        f"{row['peak_anonymous_rss_MB']:>8.0f}{cuda}",
        flush=True,
    )


def row_dataset(row: Row, n_images: int, work: Path, structures: dict[int, Structure]) -> Path:
    """The row's simulated dataset under work: reused when a complete one (truth.npz is written last) is there."""
    data_dir = work / f"data_{row.residues}_{row.box_px}_{n_images}"
    if (data_dir / "truth.npz").exists():
        return data_dir
    if row.residues not in structures:
        structures[row.residues] = row_structure(row.residues, work)
    return simulate_particles(structures[row.residues], row.box_px, n_images, data_dir)


def run_all(args: argparse.Namespace, work: Path) -> list[dict]:
    rows = args.rows
    structures: dict[int, Structure] = {}
    results = []
    cuda = " cuda MB" if args.device.startswith("cuda") else ""
    print(f"residues  box batch segs   ms/step    img/s  peak MB  +RSS MB  anon MB{cuda}")
    for row in rows:
        key = (row.residues, row.box_px)
        n_images = max(r.batch for r in rows if (r.residues, r.box_px) == key) * (WARMUP_STEPS + args.steps)
        data_dir = row_dataset(row, n_images, work, structures)
        try:
            result = measure_in_subprocess(row, data_dir, work / f"run_{row.label.replace(':', '_')}", args)
        except RuntimeError as error:  # a row out of memory must not cost the others (on a GPU lent for minutes)
            print(error, file=sys.stderr, flush=True)
            results.append(dict(residues=row.residues, box_px=row.box_px, batch=row.batch, segments=row.segments,
                                error=str(error)[-2000:]))  # fmt: skip
            continue
        results.append(result)
        print_row(result)
    return results


def main() -> None:
    flush_denormals()  # as cryoflex's commands do, before torch starts its threads
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true", help=f"tiny rows {' '.join(QUICK_ROWS)}, {QUICK_STEPS} steps")
    parser.add_argument(
        "--rows", nargs="+", type=Row.parse, help="RESIDUES:BOX_PX:BATCH[:SEGMENTS] (default: the grid)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the deformation (config compile)")
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="config precision: bf16 autocast of the encoder and decoder (auto: bf16 on CUDA only)",
    )  # fmt: skip
    parser.add_argument(
        "--encoder-downsample", type=int, metavar="FACTOR",
        help="config encoder_downsample: 1 = the encoder reads the full box, as the original's (default: the default)",
    )  # fmt: skip
    parser.add_argument(
        "--default-objective", action="store_true",
        help="time training's default objective (8 draws per image, band-limited) instead of the original's",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, help="timed steps after the warm-up steps (default 10; --quick 2)")
    parser.add_argument("--work", type=Path, help="keep and reuse simulated data and runs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_cpu.json"))
    parser.add_argument("--single-row", type=Row.parse, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (QUICK_STEPS if args.quick else 10)
    if args.single_row is not None:
        run_single_row(args)
        return
    args.rows = args.rows or [Row.parse(spec) for spec in (QUICK_ROWS if args.quick else GRID_ROWS)]
    print(
        f"device {args.device} ({device_description(args.device)}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {args.steps} timed steps after {WARMUP_STEPS}"
    )
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        rows = run_all(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="cryoflex_train_bench_") as work:
            rows = run_all(args, Path(work))
    result = dict(
        device=args.device, device_name=device_description(args.device), machine=platform.machine(),
        cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(), steps=args.steps,
        warmup_steps=WARMUP_STEPS, quick=args.quick, precision=args.precision, compile=args.compile,
        encoder_downsample=args.encoder_downsample, default_objective=args.default_objective, rows=rows,
    )  # fmt: skip
    write_text_atomic(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    failed = [row for row in rows if "error" in row]
    if failed:
        labels = [":".join(str(row[key]) for key in ("residues", "box_px", "batch", "segments")) for row in failed]
        sys.exit(f"rows that failed (their errors are in {args.out}): {' '.join(labels)}")


if __name__ == "__main__":
    main()
