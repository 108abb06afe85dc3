"""`cryoflex demo`: the method end to end on a shipped adenylate kinase (AdK) closed -> open ensemble.

Simulates particle images with CTF and noise from 98 C-alpha frames of an MD transition (adk_closed_to_open.npz, see
ATTRIBUTION.md), trains cryoflex with the closed state as the nominal structure, analyses the run, evaluates it against
the known truth, and summarises: the learned segments against the known domains (LID 122-159, NMP 30-59, CORE the
rest), the per-image C-alpha RMSD against predicting the closed structure for every image, and the correlation of the
predicted and true LID-NMP distances. Every figure is computed from this run: another seed gives other numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from cryoflex.io.structure import Structure

logger = logging.getLogger(__name__)

ENSEMBLE_FILE = "adk_closed_to_open.npz"
LID = "A:122-159"
NMP = "A:30-59"


def adk_ensemble() -> Structure:
    """The shipped AdK ensemble: 98 frames x 214 C-alpha, frame 0 closed, frame 97 open."""
    with resources.files(__package__).joinpath(ENSEMBLE_FILE).open("rb") as stream:
        data = np.load(stream)
        n = data["residue_numbers"].size
        return Structure(
            coords_A=data["coords_A"], chain_ids=data["chain_ids"], residue_numbers=data["residue_numbers"],
            insertion_codes=np.full(n, ""), residue_names=data["residue_names"], atom_names=np.full(n, "CA"),
            amplitudes_e=data["amplitudes_e"], source_path=f"cryoflex.demo/{ENSEMBLE_FILE}",
        )  # fmt: skip


@dataclass(frozen=True)
class DemoSettings:
    """The dataset and training of a demo run."""

    n_images: int
    box_size_px: int
    pixel_size_A: float
    snr: float
    downsample: int | None
    epochs: int
    segments: int = 6
    sigma_A: float = 3.0
    # One latent draw per image: at the demos' SNR (0.02, 0.1) it trains ~3x faster than the default 8 for 0.04-0.07 A
    # of accuracy on the AdK benchmark (docs/low_snr.md), which a demo can spare.
    importance_samples: int = 1


FULL = DemoSettings(n_images=10_000, box_size_px=64, pixel_size_A=2.0, snr=0.02, downsample=32, epochs=25)
QUICK = DemoSettings(n_images=1_500, box_size_px=32, pixel_size_A=4.0, snr=0.1, downsample=None, epochs=6)


@dataclass
class DemoSummary:
    report_path: Path
    eval_path: Path
    settings: DemoSettings
    seed: int
    train_seconds: float
    device: str
    segment_ranges: list[str]
    nmp_f1: float
    lid_f1: float
    median_rmsd_A: float
    baseline_median_rmsd_A: float
    best_fixed_median_rmsd_A: float
    distance_correlation: float

    def lines(self) -> list[str]:
        s = self.settings
        return [
            f"cryoflex demo: AdK closed -> open, {s.n_images:,} images at SNR {s.snr:g} (seed {self.seed}), "
            f"trained {s.epochs} epochs in {self.train_seconds:.0f} s on {self.device}",
            f"  learned segments: {'; '.join(self.segment_ranges)}",
            f"  against the known domains: NMP (30-59) F1 {self.nmp_f1:.2f}, LID (122-159) F1 {self.lid_f1:.2f}",
            f"  per-image C-alpha RMSD to the true structure: median {self.median_rmsd_A:.2f} A "
            f"(predicting the closed structure for every image: {self.baseline_median_rmsd_A:.2f} A; the single best "
            f"frame of the trajectory for every image: {self.best_fixed_median_rmsd_A:.2f} A)",
            f"  LID-NMP distance, predicted vs true: correlation {self.distance_correlation:.3f}",
            f"  report: {self.report_path}",
            f"  scores against the truth: {self.eval_path}",
        ]


def run_demo(out_dir: Path, *, quick: bool = False, seed: int = 0, device: str = "auto") -> DemoSummary:
    """Simulate, train, analyse and evaluate under out_dir; returns the summary."""
    from cryoflex.analysis.analyze import AnalyzeOptions, analyze_run
    from cryoflex.analysis.evaluate import evaluate, figure_captions
    from cryoflex.analysis.metrics import domain_f1
    from cryoflex.analysis.report import ReportSection
    from cryoflex.analysis.run import load_run
    from cryoflex.analysis.structures import model_assignment, segment_ids, segment_table
    from cryoflex.config import load_config
    from cryoflex.simulate import SimulationConfig, simulate_dataset
    from cryoflex.threads import flush_denormals
    from cryoflex.train.loop import train

    flush_denormals()  # before the simulation starts torch's threads (train's own call would come too late for them)
    settings = QUICK if quick else FULL
    out_dir = Path(out_dir)
    ensemble = adk_ensemble()
    simulation = SimulationConfig(
        n_images=settings.n_images, box_size_px=settings.box_size_px, pixel_size_A=settings.pixel_size_A,
        snr=settings.snr, seed=seed, defocus_min_A=5000.0, defocus_max_A=20000.0,
    )  # fmt: skip
    star = simulate_dataset(ensemble, simulation, out_dir / "data")
    config = load_config(None, dict(
        particles=str(star), structure=str(out_dir / "data" / "nominal.pdb"), epochs=settings.epochs,
        segments=settings.segments, downsample=settings.downsample, sigma_A=settings.sigma_A, seed=seed, device=device,
        importance_samples=settings.importance_samples,
    ))  # fmt: skip
    started = time.perf_counter()
    train(config, out_dir / "run")
    train_seconds = time.perf_counter() - started

    run = load_run(out_dir / "run", device=device)
    result = evaluate(run, out_dir / "data" / "truth.npz", distance_groups=[(LID, NMP)], out_dir=out_dir / "eval",
                      progress=True)  # fmt: skip
    assignment = model_assignment(run.model)
    rows = segment_table(assignment, run.structure)
    ids = segment_ids(assignment)
    numbers = run.structure.residue_numbers
    domains = np.where((numbers >= 122) & (numbers <= 159), 2, np.where((numbers >= 30) & (numbers <= 59), 1, 0))
    rmsd = result["rmsd_A"]
    headline = {
        "median RMSD (A)": rmsd["prediction"]["direct"]["median"],
        "baseline median RMSD (A)": rmsd["nominal_baseline"]["direct"]["median"],
        "best single frame median RMSD (A)": rmsd["best_fixed_baseline"]["direct"]["median"],
        "LID-NMP distance correlation": result["distances"][0]["pearson"],
        "NMP F1": domain_f1(ids, domains, 1),
        "LID F1": domain_f1(ids, domains, 2),
    }
    truth_section = ReportSection("Comparison with the truth", [
        (caption, out_dir / "eval" / name) for name, caption in figure_captions(result)
    ])  # fmt: skip
    report_path = analyze_run(
        run, out_dir / "analysis", AnalyzeOptions(seed=seed),
        extra_sections=[truth_section], extra_tables={"Against the truth": [headline]},
    )  # fmt: skip
    return DemoSummary(
        report_path=report_path, eval_path=out_dir / "eval" / "eval.json", settings=settings, seed=seed,
        train_seconds=train_seconds, device=str(run.device),
        segment_ranges=[f"{r.segment}: {r.first_residue}-{r.last_residue}" for r in rows],
        nmp_f1=headline["NMP F1"], lid_f1=headline["LID F1"], median_rmsd_A=headline["median RMSD (A)"],
        baseline_median_rmsd_A=headline["baseline median RMSD (A)"],
        best_fixed_median_rmsd_A=headline["best single frame median RMSD (A)"],
        distance_correlation=headline["LID-NMP distance correlation"],
    )  # fmt: skip
