"""Typed, validated training configuration: defaults < YAML file < command-line flags; saved with every run."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union

import yaml

from cryoflex.errors import CryoflexInputError
from cryoflex.io.atomic import write_text_atomic

DUPLICATE_IMAGES = ("refuse", "first", "distinct")
LR_SCHEDULES = ("constant", "cosine")
# where each residue's density is rendered (docs/conventions.md, "Density"): one Gaussian at the electron centroid of
# its heavy atoms, two (at the electron centroids of its backbone and of its side chain or base), each as the structure
# file gives them (the pseudo-atom itself where the file has no other atom), or one at the C-alpha / C1' (the
# original's)
DENSITIES = ("residue_centroid", "backbone_side_chain", "pseudo_atom")
# how the model renders its Gaussians on the pixels: their spectrum up to the box's Nyquist frequency, what a
# Fourier-cropped particle holds (docs/conventions.md, "Rendering on the pixels"), or their values at the pixel
# centres (the original's)
RENDERINGS = ("band_limited", "point")
LIKELIHOODS = ("gaussian", "correlation")  # the image term: a Gaussian likelihood, or the original 1 - correlation
# the Gaussian likelihood's noise: one variance per Fourier shell (as RELION's noise spectra), or one for all (white)
NOISE_MODELS = ("shells", "white")
PRECISIONS = ("auto", "fp32", "bf16")  # the networks' arithmetic: auto = bf16 on CUDA, fp32 elsewhere
# Weights on the scale of 1 - correlation (in [0, 2]), the defaults with likelihood "correlation" (the original's);
# the dataclass defaults are for the Gaussian likelihood, whose terms are in nats.
CORRELATION_WEIGHTS = {"latent_kl_weight": 1e-3, "continuity_weight": 1e-2, "clash_weight": 1e-2}


# the settings that name files or folders: stored absolute, so a run opens from any working directory
PATH_SETTINGS = ("particles", "structure", "ctf", "stack", "datadir", "consensus_map")


SEED_LIMIT = 2**63  # numpy and torch take seeds from 0 to 2^63 - 1


def check_seed(seed: int) -> None:
    """Refuse a --seed that numpy and torch cannot take."""
    if not 0 <= seed < SEED_LIMIT:
        raise CryoflexInputError(None, f"seed {seed}", fix="give a seed from 0 to 2^63 - 1", field="--seed")


def is_device_name(name: str) -> bool:
    """Whether `name` is a device cryoflex takes: auto, cpu, cuda or cuda:N."""
    return re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None


@dataclass
class TrainConfig:
    """Everything that defines a training run (input paths are stored absolute: PATH_SETTINGS)."""

    # inputs
    particles: str = ""
    structure: str = ""
    ctf: str | None = None  # cryoDRGN ctf.pkl, when particles is a poses .pkl
    stack: str | None = None  # the image stack, when particles names no images (cryoDRGN): particle i = image i
    duplicate_images: str = "refuse"  # rows naming the same image: refuse | first (keep the first) | distinct
    datadir: str | None = None  # where the stacks named in the particle file live, if not next to it
    consensus_map: str | None = None  # map the structure is fitted into: its centre voxel is the box centre
    box_centre_A: list[float] | None = None  # or the box centre in the structure's frame
    centre_structure: bool = False  # or: the particles are centred on the structure's centroid
    amplitude_contrast: float | None = None  # for RELION 3.0 files without rlnAmplitudeContrast
    # model
    # the most segments; 0 = chosen when training starts from the images' signal-to-noise ratio: 40 where the
    # images can tell them apart, else 20 (cryoflex.train.setup.automatic_segments, docs/low_snr.md)
    segments: int = 0
    parts: list[str] = field(default_factory=list)  # e.g. ["A:1-120:3", "B:4"]; empty = whole structure
    latent_dim: int = 8
    tau: float = 20.0
    # train with a segmentation drawn from the mixture's variational posterior each step (true, the original's) or
    # with its posterior mean, the one analysis decodes with (false): the mean was 0.04-0.10 A better at SNR
    # 0.003-0.0003 on 10,000 C-alpha particles, 0.07-0.14 A worse on particles of every atom at SNR 0.01-0.1 and
    # 0.10 A worse with 50,000 images at 0.001 (docs/low_snr.md, "The segmentation: one for training and analysis")
    sample_segmentation: bool = True
    sigma_A: float = 2.0  # the Gaussians' width; with learn_sigma, where the learned width starts
    learn_sigma: bool = True  # learn the width from the images (a maximum-likelihood constant, like the noise)
    density: str = "residue_centroid"  # residue_centroid | backbone_side_chain | pseudo_atom (DENSITIES)
    rendering: str = "band_limited"  # band_limited (as Fourier-cropped particles are) | point (RENDERINGS)
    encoder_hidden: list[int] = field(default_factory=lambda: [512, 256])
    # the encoder reads the images Fourier-cropped by this factor, to no fewer than 32 px (or the box if smaller);
    # 1 = the whole training box (the original's encoder)
    encoder_downsample: int = 2
    # in training, drop each of the encoder's hidden units with this probability; without it the encoder memorises
    # the particles it trains on and reads new ones poorly (docs/low_snr.md, "Dropout in the encoder")
    encoder_dropout: float = 0.5
    decoder_hidden: list[int] = field(default_factory=lambda: [256, 256])
    translation_scale_A: float = 10.0
    # data
    downsample: int | None = None  # box in pixels after Fourier cropping; None = original box
    invert_contrast: bool = False
    cache: bool = True
    num_workers: int = 0
    # optimisation
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 3e-4
    segmentation_learning_rate: float = 3e-3  # the mixture has a few dozen parameters on a [0, 1] scale
    seed: int = 0
    lr_schedule: str = "cosine"  # cosine (per step, down to 10% of the learning rates at the last epoch) | constant
    validation_fraction: float = 0.05  # share of particles held out (fixed per particle name); 0 = none
    early_stopping_patience: int = 0  # stop after this many epochs without a better validation score; 0 = never
    # the objective: "gaussian" (nats: the evidence bound with a Gaussian likelihood) or "correlation" (the original)
    likelihood: str = "gaussian"
    noise_model: str = "shells"  # the Gaussian likelihood's noise: shells (a variance per Fourier shell) | white
    # latent draws per image in the importance-weighted evidence bound; 1 = the plain ELBO (correlation: always 1)
    importance_samples: int = 8
    # with importance_samples > 1, also train the encoder on images the model simulates from prior draws (the sleep
    # phase of reweighted wake-sleep), which it cannot memorise as it does the particles (docs/low_snr.md)
    sleep_phase: bool = False
    # loss weights (with likelihood correlation, unless given: CORRELATION_WEIGHTS); the latent KL's ramps linearly
    # from 0 over its warm-up (in epochs, fractional allowed; 0 = no ramp)
    latent_kl_weight: float = 1.0
    latent_kl_warmup_epochs: float = 1.0
    segmentation_kl_weight: float = 1.0
    continuity_weight: float = 5.0  # per A^2 of mean squared bond-length change (nats per image)
    clash_weight: float = 5.0  # per A^2 of clash depth, summed over pairs / n_residues
    clash_cutoff_A: float = 4.0
    clash_skin_A: float = 2.0
    neighbour_list_every_steps: int = 10  # the clash list is rebuilt from each image's first draw this often
    # hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto (on CUDA: bf16 networks, TF32 projection products) | fp32 | bf16 (bf16 networks on any device, TF32 on CUDA)
    precision: str = "auto"
    compile: bool = False  # torch.compile the deformation: faster steps for long runs, ~1 min to compile
    threads: int = 0  # CPU threads: 0 = automatic (usable CPUs, the count that measures fastest while running)
    # logging
    log_images_every_epochs: int = 1
    progress: bool = True

    def validate(self, source: Path | None = None) -> None:
        """Coerce every field to its annotated type, then raise CryoflexInputError for values that cannot work."""
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            setattr(self, f.name, coerce_setting(getattr(self, f.name), hints[f.name], f.name, source))
        checks = [
            ("particles", bool(self.particles), "give the particle file (--particles)"),
            ("structure", bool(self.structure), "give the nominal structure (--structure)"),
            ("segments", self.segments >= 0, "use 0 (automatic) or a number of segments"),
            ("encoder_downsample", self.encoder_downsample >= 1, "use 1 (the full box) or a larger factor, e.g. 2"),
            ("encoder_dropout", 0 <= self.encoder_dropout < 1, "use a probability from 0 (none) to under 1, e.g. 0.5"),
            ("latent_dim", self.latent_dim >= 1, "use a latent dimension of at least 1"),
            ("epochs", self.epochs >= 1, "train for at least 1 epoch"),
            ("batch_size", self.batch_size >= 1, "use a batch size of at least 1"),
            ("learning_rate", 0 < self.learning_rate < math.inf, "use a positive, finite learning rate"),
            ("segmentation_learning_rate", 0 < self.segmentation_learning_rate < math.inf,
             "use a positive, finite learning rate"),
            ("seed", 0 <= self.seed < SEED_LIMIT, "use a seed from 0 to 2^63 - 1"),
            ("sigma_A", self.sigma_A > 0, "use a positive Gaussian width"),
            ("tau", self.tau > 0, "use a positive temperature"),
            ("density", self.density in DENSITIES, f"use one of {', '.join(DENSITIES)}"),
            ("rendering", self.rendering in RENDERINGS, f"use one of {', '.join(RENDERINGS)}"),
            ("downsample", self.downsample is None or (self.downsample >= 8 and self.downsample % 2 == 0),
             "downsample to an even box of at least 8 pixels"),
            ("device", is_device_name(self.device), "use auto, cpu, cuda or cuda:N"),
            ("precision", self.precision in PRECISIONS, f"use {', '.join(PRECISIONS)}"),
            ("box_centre_A", self.box_centre_A is None or (len(self.box_centre_A) == 3 and all(
                math.isfinite(value) for value in self.box_centre_A)), "give three finite numbers X Y Z (in A)"),
            ("neighbour_list_every_steps", self.neighbour_list_every_steps >= 1, "use at least 1"),
            ("threads", self.threads >= 0, "use 0 (automatic) or a number of threads"),
            ("num_workers", self.num_workers >= 0, "use 0 (read in the training process) or a number of workers"),
            ("clash_cutoff_A", self.clash_cutoff_A > 0, "use a positive distance, e.g. 4"),
            ("clash_skin_A", self.clash_skin_A >= 0, "use 0 or a positive margin, e.g. 2"),
            ("likelihood", self.likelihood in LIKELIHOODS, f"use one of {', '.join(LIKELIHOODS)}"),
            ("noise_model", self.noise_model in NOISE_MODELS, f"use one of {', '.join(NOISE_MODELS)}"),
            ("importance_samples", self.importance_samples >= 1, "use 1 (the evidence lower bound) or more"),
            ("duplicate_images", self.duplicate_images in DUPLICATE_IMAGES,
             f"use one of {', '.join(DUPLICATE_IMAGES)}"),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"use one of {', '.join(LR_SCHEDULES)}"),
            ("validation_fraction", 0 <= self.validation_fraction < 1,
             "use a share from 0 (no validation) to under 1, e.g. 0.05"),
            ("early_stopping_patience", self.early_stopping_patience >= 0, "use 0 (never stop early) or more epochs"),
            ("early_stopping_patience", self.early_stopping_patience == 0 or self.validation_fraction > 0,
             "early stopping needs a validation share: set validation_fraction above 0, or patience 0"),
            *[(name, getattr(self, name) >= 0, "use 0 (the term off) or a positive weight")
              for name in ("latent_kl_weight", "segmentation_kl_weight", "continuity_weight", "clash_weight")],
            ("latent_kl_warmup_epochs", self.latent_kl_warmup_epochs >= 0, "use 0 (no ramp) or a number of epochs"),
            ("translation_scale_A", self.translation_scale_A > 0, "use a positive scale in A, e.g. 10"),
            *[(name, all(width >= 1 for width in getattr(self, name)),
               "give layer widths of at least 1, e.g. [256, 256]") for name in ("encoder_hidden", "decoder_hidden")],
            ("sleep_phase", not self.sleep_phase or self.draws_per_image > 1,
             "the sleep phase needs several draws per image: likelihood gaussian and importance_samples above 1, "
             "or set sleep_phase false"),
        ]  # fmt: skip
        for name, ok, fix in checks:
            if not ok:
                value = getattr(self, name)
                problem = "not given" if value in ("", None) else f"invalid value {value!r}"
                raise CryoflexInputError(source, problem, fix, field=name)
        placement = [self.consensus_map is not None, self.box_centre_A is not None, self.centre_structure]
        if sum(placement) > 1:
            raise CryoflexInputError(
                source, "more than one way to place the structure was given",
                "use only one of consensus_map, box_centre_A and centre_structure", field="consensus_map",
            )  # fmt: skip

    @property
    def draws_per_image(self) -> int:
        """Latent draws per image in a training step: importance_samples with the Gaussian likelihood; one with
        1 - correlation, which is not a likelihood and so cannot weigh draws."""
        return self.importance_samples if self.likelihood == "gaussian" else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def requested_settings(
    path: Path | None = None, overrides: dict[str, Any] | None = None, *, file_paths_from_its_folder: bool = True
) -> dict[str, Any]:
    """The settings the YAML file at `path` and then `overrides` give (None values ignored), each coerced to its type,
    the PATH_SETTINGS made absolute: a relative path in the file against the file's folder (against the working
    directory without file_paths_from_its_folder, as runs saved before paths were stored absolute need), one in
    `overrides` (command-line flags) against the working directory."""
    loaded: Any = None
    if path is not None:
        if not Path(path).is_file():
            raise CryoflexInputError(path, "no such configuration file", "give the path of a YAML file of settings")
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise CryoflexInputError(path, f"cannot read the configuration: {error}", "check the YAML syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise CryoflexInputError(
                path, "the configuration must be a mapping of name: value", "write one 'name: value' per line, as "
                "in a run's config.yaml",
            )  # fmt: skip
    from_file = _absolute_paths(
        _coerce_settings(loaded or {}, path), Path(path).parent if path and file_paths_from_its_folder else None
    )  # fmt: skip
    given = _coerce_settings({k: v for k, v in (overrides or {}).items() if v is not None}, None)
    return {**from_file, **_absolute_paths(given, None)}


def _absolute_paths(values: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """`values` with each relative PATH_SETTINGS value made absolute against `folder` (None: the working directory);
    kept unresolved otherwise (symbolic links stay as the user named them)."""
    return {
        name: os.path.abspath(os.path.join(folder or os.getcwd(), value))
        if name in PATH_SETTINGS and isinstance(value, str) and value else value
        for name, value in values.items()
    }  # fmt: skip


def load_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None, *, file_paths_from_its_folder: bool = True
) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then `overrides` (requested_settings); validated."""
    values = requested_settings(path, overrides, file_paths_from_its_folder=file_paths_from_its_folder)
    if values.get("likelihood") == "correlation":
        values = {**CORRELATION_WEIGHTS, **values}
    config = TrainConfig(**values)
    config.validate(path)
    return config


def load_run_config(path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A run's saved RUN/config.yaml (then `overrides`). Runs saved before a setting existed were trained the way
    the code then worked: with 1 - correlation (likelihood) or white noise (noise_model), a constant learning rate
    on every particle (lr_schedule, validation_fraction), an encoder that read the full box without dropout, every
    residue rendered at its pseudo-atom (density) at a fixed width (learn_sigma) and sampled at the pixel centres
    (rendering), with segmentations drawn from their posterior (sample_segmentation)."""
    config = load_config(path, overrides, file_paths_from_its_folder=False)
    saved = yaml.safe_load(Path(path).read_text())
    earlier: dict[str, Any] = {
        "likelihood": "correlation", "noise_model": "white", "lr_schedule": "constant", "validation_fraction": 0.0,
        "encoder_downsample": 1, "encoder_dropout": 0.0, "density": "pseudo_atom", "learn_sigma": False,
        "rendering": "point", "sample_segmentation": True,
    }  # fmt: skip
    return replace(config, **{name: value for name, value in earlier.items() if name not in saved | (overrides or {})})


def _coerce_settings(values: dict[str, Any], source: Path | None) -> dict[str, Any]:
    """Refuse unknown names, and coerce each value to its field's type (source: the file they came from)."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        close = difflib.get_close_matches(unknown[0], hints, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise CryoflexInputError(
            source, f"unknown setting(s) {', '.join(unknown)}", f"{hint}valid settings: {', '.join(sorted(hints))}",
            field=unknown[0],
        )  # fmt: skip
    return {name: coerce_setting(value, hints[name], name, source) for name, value in values.items()}


def _describe(hint: Any) -> str:
    """How a type reads in an error message."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (Union, types.UnionType):
        return f"{_describe(args[0])} or null"
    if typing.get_origin(hint) in (list, tuple):
        return f"a list (each {_describe(args[0])})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}[hint]


def coerce_setting(value: Any, hint: Any, name: str, source: Path | None) -> Any:
    """`value` as the annotated type `hint` (YAML 1.1 reads 3e-4 as text: numbers in text are accepted), else raise.

    Raises CryoflexInputError naming the setting, the file and the expected type.
    """
    try:
        return _coerced(value, hint)
    except (TypeError, ValueError):
        raise CryoflexInputError(
            source, f"{value!r} is not {_describe(hint)}", f"give {name} as {_describe(hint)}", field=name
        ) from None


def _coerced(value: Any, hint: Any) -> Any:
    """`value` as type `hint`; TypeError or ValueError when it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerced(value, next(a for a in args if a is not type(None)))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{value!r} is not a list")
        return origin(_coerced(item, args[0]) for item in value)
    if hint in (bool, str):
        if not isinstance(value, hint):
            raise TypeError(f"{value!r} is not {hint.__name__}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{value!r} is not a number")
    if hint is float:
        return float(value)
    number = value if isinstance(value, int) else float(value)
    if not float(number).is_integer():
        raise ValueError(f"{value!r} is not an integer")
    return int(number)
