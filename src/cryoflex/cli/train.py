"""Train cryoSPHERE: learn segments of the structure and one rigid motion per segment for every particle image.

Inputs: particles with poses and CTF (RELION .star, cryoSPARC .cs, or cryoDRGN poses .pkl with --ctf and --stack) and
the nominal structure (PDB/mmCIF) in the particles' frame: give the consensus map it is fitted into (--consensus-map),
or the box centre in its coordinates (--box-centre-A), or --centre-structure when the particles are centred on its
centroid.
Settings: defaults < --config YAML < flags; the full configuration is saved as RUN/config.yaml. Every epoch writes an
atomic checkpoint to RUN/checkpoints; --resume continues a stopped run exactly, and --resume --epochs N extends it
(the cosine learning-rate decay then spans the N epochs). A fixed share of the particles (--validation-fraction, by
particle name) is never trained on: its loss terms and, with the Gaussian likelihood, its log evidence are logged
every epoch (val_*); the best epoch by the evidence (else by the loss) is RUN/checkpoints/best.pt (analyze, eval
and reconstruct load it with --checkpoint best; the last epoch by default), and --early-stopping-patience N stops
after N epochs without improvement. Logs: RUN/metrics.jsonl and TensorBoard (tensorboard --logdir RUN/tensorboard).
Several GPUs (or CPU processes):
  torchrun --nproc-per-node K -m cryoflex train ...

examples:
  cryoflex train --particles particles.star --structure model.pdb --consensus-map consensus.mrc --out run1
  cryoflex train --particles sim/particles.star --structure sim/nominal.pdb --out run1 --segments 4 --epochs 30
  cryoflex train --particles poses.pkl --ctf ctf.pkl --stack stack.mrcs --structure m.pdb --centre-structure --out run2
  cryoflex train --out run1 --resume --epochs 40
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cryoflex.cli import DEVICE_HELP, THREADS_HELP, check_output_directory
from cryoflex.config import (
    DENSITIES,
    DUPLICATE_IMAGES,
    LIKELIHOODS,
    LR_SCHEDULES,
    NOISE_MODELS,
    PRECISIONS,
    RENDERINGS,
    TrainConfig,
    load_config,
    load_run_config,
    requested_settings,
)
from cryoflex.errors import CryoflexInputError
from cryoflex.run_dir import RunDir

logger = logging.getLogger(__name__)

# settings that may change when a run is resumed (they do not change what is learned; datadir: the stacks moved)
_RESUMABLE = (
    "epochs", "device", "num_workers", "threads", "progress", "compile", "early_stopping_patience", "datadir",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run directory (created)")
    parser.add_argument("--config", type=Path, help="YAML file of settings (names as in RUN/config.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--particles", help="particle file: .star, .cs, or cryoDRGN poses .pkl")
    inputs.add_argument("--structure", help="nominal structure: PDB or mmCIF")
    inputs.add_argument("--ctf", help="cryoDRGN ctf.pkl (with a poses .pkl)")
    inputs.add_argument("--stack", help="image stack (.mrcs) when the particle file names no images (cryoDRGN .pkl)")
    inputs.add_argument("--duplicate-images", choices=DUPLICATE_IMAGES,
                        help="rows naming the same image (symmetry expansion): refuse (default), keep the first "
                             "row per image, or train on every row as a distinct particle")
    inputs.add_argument("--datadir", help="directory of the particle stacks, if not where the particle file says")
    inputs.add_argument("--amplitude-contrast", type=float, help="for RELION 3.0 files without rlnAmplitudeContrast")
    placement = inputs.add_mutually_exclusive_group()
    placement.add_argument("--consensus-map", help="map the structure is fitted into (its centre = box centre)")
    placement.add_argument("--box-centre-A", type=float, nargs=3, metavar=("X", "Y", "Z"),
                           help="box centre in the structure's coordinates (A)")
    placement.add_argument("--centre-structure", action="store_true", default=None,
                           help="the particles are centred on the structure's centroid")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--segments", type=int,
        help="the most segments (default 0: 40 where the images hold enough signal, else 20; the log says which)",
    )  # fmt: skip
    model.add_argument("--parts", nargs="+", metavar="PART",
                       help="segment only these parts, each CHAIN:SEGMENTS or CHAIN:START-END:SEGMENTS")
    model.add_argument("--latent-dim", type=int, help="latent dimension (default 8)")
    model.add_argument("--sigma-A", type=float,
                       help="Gaussian width of a residue's density (default 2 A): where the learned width starts")
    model.add_argument("--fixed-sigma", dest="learn_sigma", action="store_false", default=None,
                       help="keep --sigma-A fixed instead of learning the width from the images")
    model.add_argument("--density", choices=DENSITIES,
                       help="where each residue's density is rendered, when the structure file has its atoms: "
                            "residue_centroid (default: one Gaussian at the electron centroid of its heavy atoms), "
                            "backbone_side_chain (two, at the centroids of the backbone and of the side chain: more "
                            "accurate at SNR 0.01-0.1, for a 1.4-2.2x longer step) or pseudo_atom (one at its "
                            "C-alpha / C1')")
    model.add_argument("--rendering", choices=RENDERINGS,
                       help="band_limited (default: each image's spectrum up to the box's Nyquist frequency, as a "
                            "Fourier-cropped particle holds it) or point (the Gaussians' values at the pixel "
                            "centres, the original's; these alias where the pixels are coarse against sigma)")
    model.add_argument("--encoder-dropout", type=float, metavar="P",
                       help="drop each of the encoder's hidden units with probability P in training (default 0.5; "
                            "0 = none, the original's): on the AdK benchmark at SNR 0.1, 0.85-0.87 A against "
                            "0.89-0.90 A without; the same at 0.01 and 0.001 (docs/low_snr.md)")
    model.add_argument("--mean-segmentation", dest="sample_segmentation", action="store_false", default=None,
                       help="train with the segmentation's posterior mean, the one analysis decodes with, instead of "
                            "a draw from its posterior each step (the default, the original's): better at SNR 0.003 "
                            "and below on 10,000 C-alpha particles, worse on particles of every atom at SNR 0.01-0.1")
    run = parser.add_argument_group("training")
    run.add_argument("--likelihood", choices=LIKELIHOODS,
                     help="gaussian (default: the evidence bound, in nats, with the noise variance learned) or "
                          "correlation (the original cryoSPHERE loss, 1 - correlation with a hand-set KL weight)")
    run.add_argument("--noise-model", choices=NOISE_MODELS,
                     help="the Gaussian likelihood's noise: shells (default: one variance per Fourier shell, learned, "
                          "as RELION's noise spectra; real images have several times more noise at low frequencies "
                          "than at high) or white (one variance for every frequency)")
    run.add_argument("--importance-samples", type=int, metavar="K",
                     help="latent draws per image in the evidence bound (default 8; 1 = the plain ELBO, 0.04-0.07 A "
                          "worse at SNR 0.01-0.1 on the AdK benchmark and 3x (214 residues) to 7x (2,750 "
                          "residues, 64 px) faster per step; the correlation loss always takes 1)")
    run.add_argument("--sleep-phase", dest="sleep_phase", action="store_true", default=None,
                     help="also train the encoder on images simulated from the model (the sleep phase of reweighted "
                          "wake-sleep; needs the Gaussian likelihood and --importance-samples above 1): measured "
                          "without encoder dropout, on the AdK benchmark at SNR 0.1 r 0.992 against 0.987 and "
                          "held-out particles 0.90-0.94 against 0.98 A, as dropout now gives; no gain at SNR 0.01 "
                          "or 0.001; 1.16-1.25x the step (docs/low_snr.md)")
    run.add_argument("--epochs", type=int, help="(default 20)")
    run.add_argument("--batch-size", type=int, help="images per step and process (default 32)")
    run.add_argument("--learning-rate", type=float, help="Adam learning rate (default 3e-4)")
    run.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                     help="cosine (default): down to 10%% of the learning rates by the last epoch; or constant")
    run.add_argument("--validation-fraction", type=float,
                     help="share of the particles held out for validation, fixed by particle name (default 0.05; "
                          "0 = none); the best epoch by its score (the held-out evidence, or the loss) is "
                          "RUN/checkpoints/best.pt")
    run.add_argument("--early-stopping-patience", type=int, metavar="N",
                     help="stop after N epochs without a better validation score (default 0: never)")
    run.add_argument("--downsample", type=int, help="Fourier-crop the images to this box (pixels)")
    run.add_argument("--invert-contrast", action="store_true", default=None, help="multiply the images by -1")
    run.add_argument("--device", help=DEVICE_HELP)
    run.add_argument("--precision", choices=PRECISIONS, help="auto: on CUDA, bf16 networks, TF32 projections")
    run.add_argument("--compile", action="store_true", default=None,
                     help="torch.compile the deformation, for GPUs (slower on a CPU; ~1 min to compile)")
    run.add_argument("--num-workers", type=int, help="data loader worker processes (default 0)")
    run.add_argument("--threads", type=int, help=THREADS_HELP)
    run.add_argument("--seed", type=int, help="random seed (default 0)")
    run.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                     help="do not write the preprocessed image cache RUN/cache")
    run.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    names = (
        "particles", "structure", "ctf", "stack", "duplicate_images", "datadir", "amplitude_contrast", "consensus_map",
        "box_centre_A", "centre_structure", "segments", "parts", "latent_dim", "sigma_A", "learn_sigma", "density",
        "rendering", "sample_segmentation", "encoder_dropout", "likelihood", "noise_model", "importance_samples",
        "sleep_phase", "epochs", "batch_size", "learning_rate", "lr_schedule",
        "validation_fraction", "early_stopping_patience", "downsample", "invert_contrast", "device", "precision",
        "compile", "num_workers", "threads", "seed", "cache", "progress",
    )  # fmt: skip
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration: from --config and flags, or on --resume from RUN/config.yaml."""
    overrides = _overrides(args)
    if not args.resume:
        return load_config(args.config, overrides)
    saved = RunDir(args.out).config
    if not saved.is_file():
        raise CryoflexInputError(
            saved, "no saved configuration to resume from", "check --out, or train without --resume"
        )
    kept = load_run_config(saved)
    requested = requested_settings(args.config, overrides)
    changed = sorted(name for name, value in requested.items()
                     if name not in _RESUMABLE and value != getattr(kept, name)
                     and not (name == "segments" and value == 0))  # 0: the count was chosen, and saved, at the start
    # fmt: skip
    if changed:
        described = ", ".join(f"{name} {requested[name]!r} (saved: {getattr(kept, name)!r})" for name in changed)
        raise CryoflexInputError(
            saved, f"a resumed run keeps its configuration, but {described} {'was' if len(changed) == 1 else 'were'} "
            "given", f"drop those settings (only {', '.join(_RESUMABLE)} may change), or start a new run",
        )  # fmt: skip
    return load_run_config(saved, {name: value for name, value in requested.items() if name in _RESUMABLE})


def run(args: argparse.Namespace) -> int:
    from cryoflex.train.loop import TrainingDiverged, train

    check_output_directory(args.out)
    config = resolve_config(args)
    try:
        result = train(config, args.out, resume=args.resume)
    except FileExistsError as error:
        raise CryoflexInputError(args.out, str(error), "pass --resume, or another --out") from None
    except TrainingDiverged as error:
        logger.error("%s", error)
        return 3
    if result.stopped_early:
        print(
            f"{args.out} stopped early after epoch {result.epochs_done} (no better validation score for "
            f"{config.early_stopping_patience} epochs); the best epoch is {RunDir(args.out).best_checkpoint}. "
            f"To train on: cryoflex train --out {args.out} --resume --early-stopping-patience 0"
        )
    elif result.last_metrics:
        epochs = "1 epoch" if result.epochs_done == 1 else f"{result.epochs_done} epochs"
        print(f"trained to {epochs} ({result.steps_done:,} steps): {args.out}")
    else:
        print(
            f"{args.out} is already at {result.epochs_done} epochs: nothing to do. To train it further: "
            f"cryoflex train --out {args.out} --resume --epochs {result.epochs_done + 10} (any number above "
            f"{result.epochs_done})"
        )
    return 0
