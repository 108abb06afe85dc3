"""Noise spectra per optics group: particles of two groups whose noise differs, one spectrum for all against one each.

Run: .venv/bin/python benchmarks/noise_groups.py --arm both   (or --arm simulate, then --arm one and --arm groups side
by side at one thread each, then --arm table to merge their JSON; --arm cost times the likelihood alone)
Simulates AdK particles (the trajectory of recovery_adk.py, 64 px at 2 A/px, SNR 0.01 by default) twice: half with
white noise, half with noise of real particles' spectrum (benchmarks/results/real_noise_spectrum.csv), each at the
same per-pixel variance, as a dataset merged from two sessions would be. One particle file labels the halves optics
groups 1 and 2 ("groups": the default, a spectrum learned for each); the other labels every particle group 1 ("one":
one spectrum for all, what training did before). Each arm is trained with the defaults (trained at 32 px, 20 epochs)
and scored as recovery_adk.py scores: median RMSD of the posterior-mean structures to the truth, r LID-NMP and the
spread's Spearman, over all particles and per half. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch
from recovery_adk import DATA, LID, NMP, POSTERIOR_SAMPLES
from scipy.stats import spearmanr

from cryoflex.analysis.metrics import recovery_summary, rmsd_A
from cryoflex.analysis.predict import particle_posteriors, posterior_structures
from cryoflex.analysis.run import load_run
from cryoflex.config import load_config
from cryoflex.imaging.noise import n_shells
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.trajectory import read_trajectory
from cryoflex.model.losses import gaussian_image_nll
from cryoflex.simulate import SimulationConfig, read_noise_spectrum, simulate_dataset
from cryoflex.train.loop import train

HALVES = ("white", "real_spectrum")
SPECTRUM = Path(__file__).parent / "results" / "real_noise_spectrum.csv"


def simulate_halves(work: Path, n_images: int, snr: float, seed: int) -> None:
    """Half the images with white noise, half with the real spectrum's (another seed), in work/white and
    work/real_spectrum; then the two merged particle files, work/one.star and work/groups.star."""
    ensemble = read_trajectory(DATA / "adk.psf", DATA / "adk_dims.dcd")
    for k, half in enumerate(HALVES):
        config = SimulationConfig(
            n_images=n_images // 2, box_size_px=64, pixel_size_A=2.0, snr=snr, seed=seed + 1000 * k,
            defocus_min_A=5000.0, defocus_max_A=20000.0,
            noise_spectrum=read_noise_spectrum(SPECTRUM) if half == "real_spectrum" else None,
        )  # fmt: skip
        simulate_dataset(ensemble, config, work / half, progress=False)
    tables = [starfile.read(work / half / "particles.star", always_dict=True) for half in HALVES]
    particles = []
    for k, (half, table) in enumerate(zip(HALVES, tables, strict=True)):
        names = table["particles"]["rlnImageName"]
        stacks = [f"{n.split('@')[0]}@{(work / half / n.split('@')[1]).resolve()}" for n in names]
        particles.append(table["particles"].assign(rlnImageName=stacks, rlnOpticsGroup=k + 1))
    merged = pd.concat(particles, ignore_index=True)
    optics = tables[0]["optics"]
    groups = pd.concat([optics.assign(rlnOpticsGroup=g, rlnOpticsGroupName=f"opticsGroup{g}") for g in (1, 2)])
    starfile.write({"optics": groups, "particles": merged}, work / "groups.star", overwrite=True)
    starfile.write({"optics": optics, "particles": merged.assign(rlnOpticsGroup=1)}, work / "one.star",
                   overwrite=True)  # fmt: skip


def run_arm(work: Path, arm: str, epochs: int, seed: int) -> dict:
    """Train on work/ARM.star and score the posterior-mean structures against the truth, over all particles and per
    half (the halves' particles are in file order: white first)."""
    values = dict(
        particles=str(work / f"{arm}.star"), structure=str(work / HALVES[0] / "nominal.pdb"), epochs=epochs,
        downsample=32, seed=seed, progress=False, device="cpu",
    )  # fmt: skip
    shutil.rmtree(work / f"run_{arm}", ignore_errors=True)  # a fresh run each time
    started = time.perf_counter()
    train(load_config(None, values), work / f"run_{arm}")
    train_s = time.perf_counter() - started
    truths = [np.load(work / half / "truth.npz") for half in HALVES]
    truth_A = np.concatenate([t["conformations_A"][t["conformation_index"]] for t in truths])
    numbers = read_trajectory(DATA / "adk.psf", DATA / "adk_dims.dcd").residue_numbers
    lid = (numbers >= LID[0]) & (numbers <= LID[1])
    nmp = (numbers >= NMP[0]) & (numbers <= NMP[1])
    run = load_run(work / f"run_{arm}", device="cpu")
    model = run.model
    posterior = particle_posteriors(model, run.dataset, weighted=True, samples=POSTERIOR_SAMPLES, seed=seed)
    chunks = list(posterior_structures(model, posterior, samples=POSTERIOR_SAMPLES, seed=seed))
    predicted = np.concatenate([chunk.coords_A for chunk in chunks])
    expected_rmsd_A = np.concatenate([chunk.expected_rmsd_A for chunk in chunks])
    nominal_A = model.nominal_coords_A.numpy()
    row = {"arm": arm, "epoch": run.epoch, "train_s": train_s, "threads": torch.get_num_threads()}
    for name, rows in [("all", slice(None)), *((half, _half_rows(k, len(truth_A))) for k, half in enumerate(HALVES))]:
        summary = recovery_summary(predicted[rows], truth_A[rows], nominal_A, lid, nmp)
        errors_A = rmsd_A(predicted[rows], truth_A[rows])
        row[name] = {
            "median_rmsd_A": summary["median_rmsd_A"],
            "distance_correlation": summary["distance_correlation"],
            "spread_error_spearman": float(spearmanr(expected_rmsd_A[rows], errors_A).statistic),
            "nominal_median_rmsd_A": summary["baseline_median_rmsd_A"],
        }
    spectra = model.log_noise_variance.detach().double().reshape(-1, model.log_noise_variance.shape[-1])
    row["learned_noise_variance_per_shell"] = spectra[:, 1:].exp().tolist()  # per group, lowest frequency first
    return row


def _half_rows(k: int, n: int) -> slice:
    return slice(k * (n // 2), (k + 1) * (n // 2))


def likelihood_cost(rounds: int = 5, repeats: int = 20) -> list[dict]:
    """Forward and backward of the likelihood of 256 images (32 images x 8 draws, as a default step scores them) with
    one spectrum for all, (S,), against one per image, (B, S) of two groups, alternated in `rounds` rounds in this
    process: milliseconds, medians over the rounds (the spectrum per image is what groups add to a step)."""
    rows = []
    for box in (32, 64):
        generator = torch.Generator().manual_seed(0)
        predicted = torch.fft.rfft2(torch.randn(256, box, box, generator=generator))  # the likelihood reads spectra
        observed = torch.fft.rfft2(torch.randn(256, box, box, generator=generator))
        spectra = torch.zeros(2, n_shells(box), requires_grad=True)
        scale = torch.zeros((), requires_grad=True)
        groups = torch.arange(256) % 2
        cases = {"one spectrum": None, "a spectrum per image": groups}  # the rows of `spectra` each image takes
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, spectrum_rows in cases.items():
                for k in range(3 + repeats):
                    if k == 3:
                        started = time.perf_counter()
                    noise = spectra[0] if spectrum_rows is None else spectra[spectrum_rows]
                    gaussian_image_nll(predicted, observed, noise, scale).sum().backward()
                times[name].append((time.perf_counter() - started) / repeats * 1e3)
        row = {"box_px": box, "images": 256, **{f"{name} ms": float(np.median(t)) for name, t in times.items()}}
        row["ratio"] = row["a spectrum per image ms"] / row["one spectrum ms"]
        rows.append(row)
        print(f"{box} px, 256 images: one spectrum {row['one spectrum ms']:.2f} ms, a spectrum per image "
              f"{row['a spectrum per image ms']:.2f} ms ({row['ratio']:.2f}x), forward + backward")  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    print("arm      all: RMSD  r      spread | white half: RMSD  r      spread | real-spectrum half: RMSD  r      "
          "spread | train s")
    for row in rows:
        cells = [
            f"{row[name]['median_rmsd_A']:>9.2f}  {row[name]['distance_correlation']:.3f}  "
            f"{row[name]['spread_error_spearman']:.2f}  "
            for name in ("all", *HALVES)
        ]
        print(f"{row['arm']:<8}" + " |      ".join(cells) + f" | {row['train_s']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=["both", "one", "groups", "simulate", "table", "cost"], default="both")
    parser.add_argument("--snr", type=float, default=0.01)
    parser.add_argument("--n-images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cryoflex_noise_groups"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/noise_groups.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.arm in ("both", "simulate"):
        simulate_halves(args.work, args.n_images, args.snr, args.seed)
    arms = {"both": ["one", "groups"], "one": ["one"], "groups": ["groups"]}.get(args.arm, [])
    for arm in arms:
        row = run_arm(args.work, arm, args.epochs, args.seed)
        row.update(snr=args.snr, n_images=args.n_images, epochs=args.epochs)
        write_text_atomic(args.work / f"{arm}.json", json.dumps(row, indent=1))
    if args.arm == "cost":
        costs = likelihood_cost()
        out = args.out.with_name(args.out.stem + "_cost.json")
        write_text_atomic(out, json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                           "rows": costs}, indent=2))  # fmt: skip
        print(f"wrote {out}")
    if args.arm in ("both", "table"):
        rows = [json.loads((args.work / f"{arm}.json").read_text()) for arm in ("one", "groups")]
        print_table(rows)
        write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
