"""Synthetic particle datasets from a structure ensemble, with known conformations, poses, CTF and noise.

SNR = signal variance / noise variance, where the signal variance is the mean over the first (up to) 512 clean images of
each image's variance over the whole box (after the CTF). The noise is Gaussian: white, or coloured by a given
radial power spectrum (noise_spectrum; its variance per pixel is the same either way). Particles are protein-white
(RELION's convention): the projected density is positive and the CTF has RELION's sign.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryoflex.errors import CryoflexInputError
from cryoflex.geometry.rotations import uniform_random_rotations
from cryoflex.geometry.superposition import superpose_A
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.imaging.noise import multiplicity
from cryoflex.io.atomic import atomic_path
from cryoflex.io.metadata import CTFParameters, ParticleMetadata, write_relion_star
from cryoflex.io.particles import StackWriter
from cryoflex.io.structure import Structure, write_structure
from cryoflex.progress import Progress

logger = logging.getLogger(__name__)
_N_PILOT_IMAGES = 512


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that defines a synthetic dataset; the same config and seed give the same files."""

    n_images: int
    box_size_px: int = 64
    pixel_size_A: float = 2.0
    snr: float = 0.1
    sigma_A: float = 2.0
    defocus_min_A: float = 10000.0
    defocus_max_A: float = 25000.0
    astigmatism_max_A: float = 0.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    shift_std_A: float = 0.0
    images_per_file: int = 10000
    batch_size: int = 256
    nominal_frame: int = 0
    seed: int = 0
    save_clean: bool = False
    # the noise's relative power against spatial frequency: (frequency in 1/A, power) points, frequencies increasing,
    # interpolated linearly and flat beyond the ends; None = white
    noise_spectrum: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        """Refuse settings that would write blank or NaN images, or none, naming the flag and the fix."""
        finite = {name: math.isfinite(value) for name, value in vars(self).items() if isinstance(value, int | float)}
        checks = [
            ("n_images", self.n_images >= 1, "simulate at least 1 image"),
            ("box_size_px", self.box_size_px >= 8, "use a box of at least 8 pixels"),
            ("pixel_size_A", finite["pixel_size_A"] and self.pixel_size_A > 0, "use a positive pixel size in A"),
            ("snr", finite["snr"] and self.snr > 0, "use a positive SNR, e.g. 0.1 (signal variance / noise variance)"),
            ("sigma_A", finite["sigma_A"] and self.sigma_A > 0, "use a positive Gaussian width in A, e.g. 2"),
            ("defocus_min_A", finite["defocus_min_A"] and self.defocus_min_A >= 0,
             "use an underfocus of 0 A or more (RELION's sign: positive is underfocus)"),
            ("defocus_max_A", finite["defocus_max_A"] and self.defocus_max_A >= self.defocus_min_A,
             f"use a largest defocus of at least the smallest ({self.defocus_min_A:g} A)"),
            ("astigmatism_max_A", finite["astigmatism_max_A"] and self.astigmatism_max_A >= 0,
             "use 0 (no astigmatism) or a positive difference in A"),
            ("voltage_kV", finite["voltage_kV"] and self.voltage_kV > 0, "use the acceleration voltage, e.g. 300"),
            ("cs_mm", finite["cs_mm"] and self.cs_mm >= 0, "use the spherical aberration in mm, e.g. 2.7"),
            ("amplitude_contrast", finite["amplitude_contrast"] and 0 <= self.amplitude_contrast < 1,
             "use a fraction from 0 to under 1, e.g. 0.1"),
            ("shift_std_A", finite["shift_std_A"] and self.shift_std_A >= 0, "use 0 (centred) or a positive spread"),
            ("images_per_file", self.images_per_file >= 1, "use at least 1 image per stack file"),
            ("batch_size", self.batch_size >= 1, "project at least 1 image at once"),
            ("nominal_frame", self.nominal_frame >= 0, "use a 0-based model number"),
        ]  # fmt: skip
        for name, ok, fix in checks:
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise CryoflexInputError(None, f"invalid {flag} {getattr(self, name)!r}", fix, field=name)


def noise_colouring(spectrum: np.ndarray, box_size_px: int, pixel_size_A: float) -> np.ndarray:
    """(N, N//2 + 1) factor on the rfft2 grid that turns white noise into noise of the relative power `spectrum`
    ((points, 2): frequency in 1/A, power), with its variance per pixel unchanged: sqrt(power(|k|) / mean power),
    the mean taken over the full spectrum."""
    frequency_per_A, power = np.asarray(spectrum, dtype=np.float64).T
    ky = np.fft.fftfreq(box_size_px)[:, None] / pixel_size_A
    kx = np.fft.rfftfreq(box_size_px)[None, :] / pixel_size_A
    relative = np.interp(np.hypot(ky, kx), frequency_per_A, power)
    counts = multiplicity(box_size_px, torch.float64, torch.device("cpu")).numpy().copy()
    counts[0, 0] = 1.0  # the frequency 0 is noise too
    mean = (relative * counts).sum() / box_size_px**2
    return np.sqrt(relative / mean)


def read_noise_spectrum(path: Path) -> tuple[tuple[float, float], ...]:
    """A noise spectrum CSV (columns frequency_per_A and power, one row per point) as SimulationConfig takes it."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise CryoflexInputError(path, f"cannot read it as CSV ({error})", "give a CSV file with a header row",
                                 field="noise_spectrum") from error  # fmt: skip
    missing = {"frequency_per_A", "power"} - set(table.columns)
    if missing:
        raise CryoflexInputError(
            path, f"no column {', '.join(sorted(missing))} (columns: {', '.join(map(str, table.columns))})",
            "name the columns frequency_per_A (1/A) and power", field="noise_spectrum",
        )  # fmt: skip
    spectrum = table[["frequency_per_A", "power"]].to_numpy(dtype=np.float64)
    check_noise_spectrum(spectrum, path)
    return tuple((float(f), float(p)) for f, p in spectrum)


def check_noise_spectrum(spectrum: np.ndarray, source: Path | None) -> None:
    """Refuse a noise spectrum that cannot colour noise, naming the file and the fix."""
    spectrum = np.asarray(spectrum, dtype=np.float64)
    problem = None
    if spectrum.ndim != 2 or spectrum.shape[1] != 2 or len(spectrum) < 2:
        problem = f"need at least 2 rows of (frequency_per_A, power), got shape {spectrum.shape}"
    elif not np.all(np.isfinite(spectrum)) or np.any(np.diff(spectrum[:, 0]) <= 0):
        problem = "the frequencies must be finite and increasing"
    elif np.any(spectrum[:, 1] <= 0):
        problem = "every power must be positive"
    if problem:
        raise CryoflexInputError(
            source, problem, "give a CSV with columns frequency_per_A (1/A, increasing) and power (> 0)",
            field="noise_spectrum",
        )  # fmt: skip


def centre_ensemble(ensemble: Structure, nominal_frame: int) -> Structure:
    """Kabsch-superpose every model onto the nominal one, then put the nominal centroid at the origin (model frame)."""
    reference = ensemble.coords_A[nominal_frame] - ensemble.coords_A[nominal_frame].mean(axis=0)
    return ensemble.with_coords(superpose_A(ensemble.coords_A, reference))


def simulate_dataset(
    ensemble: Structure,
    config: SimulationConfig,
    out_dir: Path,
    weights: np.ndarray | None = None,
    progress: bool = True,
) -> Path:
    """Write stacks, particles.star, nominal.pdb and truth.npz under out_dir; return the star file's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensemble = centre_ensemble(ensemble, config.nominal_frame)
    n, n_conf = config.n_images, ensemble.n_models
    rng = np.random.default_rng(config.seed)
    probabilities = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    conformation = rng.choice(n_conf, size=n, p=probabilities)
    rotations = uniform_random_rotations(n, rng)
    shifts_A = rng.normal(0.0, config.shift_std_A, size=(n, 2)) if config.shift_std_A > 0 else np.zeros((n, 2))
    defocus_u_A = rng.uniform(config.defocus_min_A, config.defocus_max_A, size=n)
    defocus_v_A = defocus_u_A - rng.uniform(0.0, config.astigmatism_max_A, size=n)
    defocus_angle_deg = rng.uniform(0.0, 180.0, size=n)
    ctf = CTFParameters(
        defocus_u_A=defocus_u_A,
        defocus_v_A=defocus_v_A,
        defocus_angle_deg=defocus_angle_deg,
        voltage_kV=np.full(n, config.voltage_kV),
        cs_mm=np.full(n, config.cs_mm),
        amplitude_contrast=np.full(n, config.amplitude_contrast),
        phase_shift_deg=np.zeros(n),
        bfactor_A2=np.zeros(n),
        scale=np.ones(n),
    )

    colouring = None
    if config.noise_spectrum is not None:
        check_noise_spectrum(np.asarray(config.noise_spectrum), None)
        colouring = noise_colouring(np.asarray(config.noise_spectrum), config.box_size_px, config.pixel_size_A)
    formation = ImageFormation(config.box_size_px, config.pixel_size_A, config.sigma_A)
    coords = torch.as_tensor(ensemble.coords_A, dtype=torch.float32)
    amplitudes = torch.as_tensor(ensemble.amplitudes_e, dtype=torch.float32)
    poses = PoseBatch(torch.as_tensor(rotations, dtype=torch.float32), torch.as_tensor(shifts_A, dtype=torch.float32))
    ctf_batch = CTFBatch.from_record(ctf, dtype=torch.float32)

    def clean_images(start: int, stop: int) -> np.ndarray:
        with torch.no_grad():
            images = formation.images(
                coords[conformation[start:stop]], amplitudes, poses[start:stop], ctf_batch[start:stop]
            )
        return images.numpy()

    n_pilot = min(n, _N_PILOT_IMAGES)
    pilot_variances = [
        clean_images(start, min(n_pilot, start + config.batch_size)).var(axis=(1, 2))
        for start in range(0, n_pilot, config.batch_size)
    ]  # in batches: memory stays that of one batch whatever the structure size
    signal_variance = float(np.concatenate(pilot_variances).mean())
    noise_std = float(np.sqrt(signal_variance / config.snr))
    logger.info("signal variance %.4g, noise std %.4g for SNR %g", signal_variance, noise_std, config.snr)

    stack_dir = out_dir / "stacks"
    image_paths, image_indices = [], []
    bar = Progress(n, "simulate", unit="img", enabled=progress)
    for file_start in range(0, n, config.images_per_file):
        file_stop = min(n, file_start + config.images_per_file)
        name = f"particles_{file_start // config.images_per_file:05d}.mrcs"
        writers = [StackWriter(stack_dir / name, file_stop - file_start, config.box_size_px, config.pixel_size_A)]
        if config.save_clean:
            writers.append(
                StackWriter(out_dir / "clean" / name, file_stop - file_start, config.box_size_px, config.pixel_size_A)
            )
        with writers[0] as noisy, writers[1] if config.save_clean else _NullWriter() as clean:
            for start in range(file_start, file_stop, config.batch_size):
                stop = min(file_stop, start + config.batch_size)
                images = clean_images(start, stop)
                clean.write(start - file_start, images)
                noise_rng = np.random.default_rng([config.seed, 1, start])
                noise = noise_rng.standard_normal(images.shape, dtype=np.float32) * noise_std
                if colouring is not None:
                    noise = np.fft.irfft2(np.fft.rfft2(noise) * colouring, s=images.shape[-2:]).astype(np.float32)
                noisy.write(start - file_start, images + noise)
                bar.update(stop - start)
        image_paths += [f"stacks/{name}"] * (file_stop - file_start)
        image_indices += list(range(file_stop - file_start))
    bar.close()

    names = np.array([f"{i + 1:06d}@{p}" for i, p in zip(image_indices, image_paths, strict=True)])
    metadata = ParticleMetadata(
        source_path=out_dir / "particles.star",
        format="relion3.1",
        names=names,
        pixel_size_A=np.full(n, config.pixel_size_A),
        box_size_px=config.box_size_px,
        optics_group=np.ones(n, int),
        rotations=rotations,
        shifts_A=shifts_A,
        ctf=ctf,
        image_paths=np.array(image_paths),
        image_indices=np.array(image_indices),
        particles_table=None,
        optics_table=None,
    )
    write_relion_star(out_dir / "particles.star", metadata)
    write_structure(out_dir / "nominal.pdb", ensemble.model(config.nominal_frame))
    with atomic_path(out_dir / "truth.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            conformation_index=conformation,
            conformations_A=ensemble.coords_A.astype(np.float32),
            rotations=rotations,
            shifts_A=shifts_A,
            defocus_u_A=defocus_u_A,
            defocus_v_A=defocus_v_A,
            defocus_angle_deg=defocus_angle_deg,
            amplitudes_e=ensemble.amplitudes_e,
            names=names,
            noise_std=noise_std,
            snr=config.snr,
            sigma_A=config.sigma_A,
            pixel_size_A=config.pixel_size_A,
            nominal_frame=config.nominal_frame,
            noise_spectrum=np.zeros((0, 2)) if config.noise_spectrum is None else np.asarray(config.noise_spectrum),
        )
    return out_dir / "particles.star"


class _NullWriter:
    """Stands in for the clean-image writer when clean images are not saved."""

    def __enter__(self) -> _NullWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, start: int, images: np.ndarray) -> None:
        return None
