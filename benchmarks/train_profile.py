"""Where a training step's time goes: each stage's forward + backward timed on its own, beside the whole step.

Run: .venv/bin/python benchmarks/train_profile.py [--rows 214:64:128 2750:64:32 ...] [--repeats 10] [--threads N]
     [--default-objective] [--out benchmarks/results/train_profile_cpu.json]
Rows are RESIDUES:BOX_PX:BATCH[:SEGMENTS] as in train_throughput.py (same structures and simulated particles).
Stages, each timed with its inputs taken from a real batch and detached, forward then backward of a fixed random
linear functional of its output (so every stage pays its backward pass once):
  data read     one batch from the ParticleDataset (on-disk cache) through particle_loader
  encoder       images -> q(z | image), and the reparametrised sample (the default encoder, which reads the image
                Fourier-cropped to half the box; "encoder, full box" below the table times the original's, which
                reads the whole box, and is not part of the step)
  segmentation  the GMM mixture -> G (n, M)
  decoder       z -> rotation vectors and translations
  deformation   nominal structure, G and motions -> structures (B, n, 3)
  projector     structures -> images without CTF (the floor: ImageFormation's own work)
  CTF           the CTF on the rfft grid and its convolution with the projections (point samples; band-limited
                rendering multiplies the spectrum by it inside the projector stage, and the table shows "-")
  losses        every loss term of LossTerms (neighbour list not rebuilt)
  optimiser     fused Adam step over all parameters
With --default-objective the step is training's own (train_throughput.DEFAULT_OBJECTIVE: 8 draws per image, the
default band-limited rendering): the stages after the encoder see the B x 8 draws, and the projector stage is the
whole image formation, the band-limited half spectra with the CTF that the likelihood reads (no separate CTF stage).
The whole step is train_step as the training loop runs it. "other" = whole step - sum of the stages (autograd
bookkeeping, the read-back of the loss values, what the isolated timings do not see). "x projector" = whole step /
projector time: the issue's target is <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from _measure import cpu_name, median_ms
from train_throughput import DEFAULT_OBJECTIVE, STEP_OBJECTIVE, Row, row_structure, simulate_particles

from cryoflex.config import load_config
from cryoflex.data.dataset import particle_loader
from cryoflex.io.atomic import write_text_atomic
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.model.networks import Encoder
from cryoflex.threads import flush_denormals
from cryoflex.train.distributed import epoch_batches
from cryoflex.train.loop import train_step
from cryoflex.train.objective import LossTerms
from cryoflex.train.setup import build_optimizer, prepare_inputs, prepare_model

DEFAULT_ROWS = ("214:64:128", "214:128:128", "2750:64:32", "2750:128:32")
STAGES = ("data read", "encoder", "segmentation", "decoder", "deformation", "projector", "CTF", "losses", "optimiser")
WARMUP = 2


def forward_backward(
    function: Callable[..., object], *inputs: torch.Tensor, constant: tuple[int, ...] = ()
) -> Callable[[], None]:
    """A call of function(*inputs) and the backward pass of a fixed random linear functional of its outputs; the
    inputs at the `constant` positions get no gradient (as in training: the images, the nominal structure)."""
    leaves = [
        x.detach().requires_grad_(k not in constant and (x.is_floating_point() or x.is_complex()))
        for k, x in enumerate(inputs)
    ]

    def real_outputs(result: object) -> tuple[torch.Tensor, ...]:  # a spectrum as its real and imaginary parts
        results = result if isinstance(result, tuple) else (result,)
        return tuple(torch.view_as_real(r) if r.is_complex() else r for r in results)

    with torch.no_grad():
        outputs = real_outputs(function(*leaves))
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in outputs]

    def run() -> None:
        results = real_outputs(function(*leaves))
        torch.stack([(r * w).sum() for r, w in zip(results, weights, strict=True)]).sum().backward()

    return run


def profile_row(row: Row, data_dir: Path, run_dir: Path, repeats: int, objective: dict) -> dict:
    """Stage and whole-step times (ms) of one row with this objective (STEP_OBJECTIVE or DEFAULT_OBJECTIVE)."""
    config = load_config(None, {
        "particles": str(data_dir / "particles.star"), "structure": str(data_dir / "nominal.pdb"),
        "segments": row.segments, "batch_size": row.batch, "epochs": 1, "progress": False, "cache": True,
        **objective,
    })  # fmt: skip
    device = torch.device("cpu")
    inputs = prepare_inputs(config, run_dir, progress=False)
    model: CryoSphere = prepare_model(config, inputs, device)
    optimizer = build_optimizer(config, model)
    losses = LossTerms(config, model, inputs.structure.chain_ids, len(inputs.dataset))
    batches = epoch_batches(len(inputs.dataset), row.batch, 0, config.seed)
    batches = [b for b in batches if len(b) == row.batch]
    model.train()

    def read() -> object:
        return next(iter(particle_loader(inputs.dataset, batches[:1])))

    batch = read()
    assert not isinstance(batch, type(None))
    for _ in range(WARMUP):  # move the parameters off their zero initialisation, as in training
        train_step(model, optimizer, losses, batch, 0.0, True)
    draws = config.draws_per_image
    with torch.no_grad():
        output = model(batch, draws)
    assignment = output.assignment
    latent = output.latent  # (B draws, L)
    rotation_vectors, translations_A = model.decoder(latent)
    coords_A = output.coords_A
    rows = torch.arange(row.batch).repeat_interleave(draws)
    poses, ctf = batch.poses[rows], batch.ctf[rows]
    formation = model.formation
    band_limited = config.rendering == "band_limited"
    assert model.renders_pseudo_atoms, "the stages render the structures themselves: one Gaussian per residue"

    full_box_encoder = Encoder(row.box_px, config.latent_dim, config.encoder_hidden)

    def encode(images: torch.Tensor, encoder: Encoder = model.encoder) -> torch.Tensor:
        mean, std = encoder(images)
        return mean + std * torch.randn_like(mean)

    def encode_full_box(images: torch.Tensor) -> torch.Tensor:
        return encode(images, full_box_encoder)

    def segment() -> torch.Tensor:
        return model.segmentation(True)

    def convolve(projected: torch.Tensor) -> torch.Tensor:
        from cryoflex.imaging.projector import apply_ctf

        return apply_ctf(projected, formation.ctf_rfft(ctf))

    def project(coords: torch.Tensor) -> torch.Tensor:
        """What the model renders: band-limited, the half spectra with the CTF (the likelihood reads them); else the
        point-sampled images without it (the CTF stage convolves them)."""
        if band_limited:
            return formation.spectra(coords, model.amplitudes_e, poses, ctf, sigma_A=model.sigma_A)
        return formation.images(coords, model.amplitudes_e, poses, None, sigma_A=model.sigma_A)

    def loss_terms(
        predicted: torch.Tensor, coords: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> torch.Tensor:
        fake = replace(
            output, predicted=predicted, coords_A=coords, latent_mean=mean, latent_std=std,
            assignment=assignment, segmentation_kl=model.segmentation.kl_divergence(),
        )  # fmt: skip
        return losses(fake, batch.images, 1.0, False)["total"]

    def segmentation_step() -> None:
        model.segmentation(True).sum().backward()

    stages = {
        "data read": median_ms(read, repeats),
        "encoder": median_ms(forward_backward(encode, batch.images, constant=(0,)), repeats),
        "segmentation": median_ms(segmentation_step, repeats),
        "decoder": median_ms(forward_backward(model.decoder, latent), repeats),
        "deformation": median_ms(
            forward_backward(
                model.deformation, model.nominal_coords_A, assignment, rotation_vectors, translations_A, constant=(0,)
            ),
            repeats,
        ),
        "projector": median_ms(forward_backward(project, coords_A), repeats),
        "CTF": None if band_limited else median_ms(forward_backward(convolve, project(coords_A).detach()), repeats),
        "losses": median_ms(
            forward_backward(loss_terms, output.predicted, coords_A, output.latent_mean, output.latent_std),
            repeats,
        ),
        "optimiser": median_ms(optimizer.step, repeats),
    }

    def whole_step() -> None:
        train_step(model, optimizer, losses, batch, 1.0, False)

    step_ms = median_ms(whole_step, repeats) + stages["data read"]
    full_box_ms = median_ms(forward_backward(encode_full_box, batch.images, constant=(0,)), repeats)
    return dict(
        row.__dict__, label=row.label, likelihood=config.likelihood, draws_per_image=draws, rendering=config.rendering,
        learn_sigma=config.learn_sigma, stages_ms=stages, step_ms=step_ms, encoder_box_px=model.encoder.input_box_px,
        encoder_full_box_ms=full_box_ms,
        other_ms=step_ms - sum(ms for ms in stages.values() if ms is not None),
        images_per_s=1000.0 * row.batch / step_ms,
        x_projector=step_ms / stages["projector"], threads=torch.get_num_threads(),
    )  # fmt: skip


def print_table(results: list[dict]) -> None:
    header = ["stage"] + [r["label"] for r in results]
    print(" | ".join(f"{h:>16}" for h in header))
    for stage in STAGES:
        times = [r["stages_ms"][stage] for r in results]
        print(" | ".join([f"{stage:>16}", *(f"{'-' if ms is None else format(ms, '.1f'):>16}" for ms in times)]))
    keys = (("other_ms", ".1f"), ("step_ms", ".1f"), ("images_per_s", ".0f"), ("x_projector", ".2f"),
            ("encoder_full_box_ms", ".1f"))  # fmt: skip
    for key, fmt in keys:
        print(" | ".join([f"{key:>16}"] + [f"{r[key]:>16{fmt}}" for r in results]))


def main() -> None:
    flush_denormals()  # as cryoflex's commands do, before torch starts its threads
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=Row.parse, default=[Row.parse(r) for r in DEFAULT_ROWS])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--default-objective", action="store_true",
        help="profile training's default objective (8 draws per image, band-limited) instead of the original's",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_profile_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; ms, median of {args.repeats}")
    results = []
    with tempfile.TemporaryDirectory(prefix="cryoflex_profile_") as work_dir:
        work = Path(work_dir)
        for row in args.rows:
            structure = row_structure(row.residues, work)
            n_images = row.batch * 4
            data = simulate_particles(structure, row.box_px, n_images, work / f"data_{row.label.replace(':', '_')}")
            objective = DEFAULT_OBJECTIVE if args.default_objective else STEP_OBJECTIVE
            run_dir = work / f"run_{row.label.replace(':', '_')}"
            results.append(profile_row(row, data, run_dir, args.repeats, objective))
            print(f"{row.label}: step {results[-1]['step_ms']:.1f} ms", flush=True)
    print_table(results)
    write_text_atomic(args.out, json.dumps(dict(
        cpu=cpu_name(), machine=platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
        threads=torch.get_num_threads(), repeats=args.repeats, rows=results,
    ), indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
