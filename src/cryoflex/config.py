"""Typed, validated training configuration: defaults < YAML file < command-line flags; saved with every run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cryoflex.errors import CryoflexInputError
from cryoflex.io.atomic import write_text_atomic


@dataclass
class TrainConfig:
    """Everything that defines a training run (paths are stored as given)."""

    # inputs
    particles: str = ""
    structure: str = ""
    ctf: str | None = None  # cryoDRGN ctf.pkl, when particles is a poses .pkl
    datadir: str | None = None  # where the stacks named in the particle file live, if not next to it
    consensus_map: str | None = None  # map the structure is fitted into: its centre voxel is the box centre
    box_centre_A: list[float] | None = None  # or the box centre in the structure's frame
    centre_structure: bool = False  # or: the particles are centred on the structure's centroid
    amplitude_contrast: float | None = None  # for RELION 3.0 files without rlnAmplitudeContrast
    # model
    segments: int = 6
    parts: list[str] = field(default_factory=list)  # e.g. ["A:1-120:3", "B:4"]; empty = whole structure
    latent_dim: int = 8
    tau: float = 20.0
    sigma_A: float = 2.0
    encoder_hidden: list[int] = field(default_factory=lambda: [512, 256])
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
    # loss weights; each ramps linearly from 0 over its warm-up (in epochs, fractional allowed; 0 = no ramp)
    latent_kl_weight: float = 1e-3
    latent_kl_warmup_epochs: float = 1.0
    segmentation_kl_weight: float = 1.0
    continuity_weight: float = 1e-2
    clash_weight: float = 1e-2
    clash_cutoff_A: float = 4.0
    clash_skin_A: float = 2.0
    neighbour_list_every_steps: int = 10
    # hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 networks on CUDA) | fp32 | bf16
    compile: bool = False  # torch.compile the deformation: faster steps for long runs, ~1 min to compile
    # logging
    log_images_every_epochs: int = 1
    progress: bool = True

    def validate(self, source: Path | None = None) -> None:
        """Raise CryoflexInputError for values that cannot work, naming the field and the fix."""
        checks = [
            ("particles", bool(self.particles), "give the particle file (--particles)"),
            ("structure", bool(self.structure), "give the nominal structure (--structure)"),
            ("segments", self.segments >= 1, "use at least 1 segment"),
            ("latent_dim", self.latent_dim >= 1, "use a latent dimension of at least 1"),
            ("epochs", self.epochs >= 1, "train for at least 1 epoch"),
            ("batch_size", self.batch_size >= 1, "use a batch size of at least 1"),
            ("learning_rate", self.learning_rate > 0, "use a positive learning rate"),
            ("segmentation_learning_rate", self.segmentation_learning_rate > 0, "use a positive learning rate"),
            ("sigma_A", self.sigma_A > 0, "use a positive Gaussian width"),
            ("tau", self.tau > 0, "use a positive temperature"),
            ("downsample", self.downsample is None or (self.downsample >= 8 and self.downsample % 2 == 0),
             "downsample to an even box of at least 8 pixels"),
            ("device", self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "use auto, cpu or cuda"),
            ("precision", self.precision in ("auto", "fp32", "bf16"), "use auto, fp32 or bf16"),
            ("box_centre_A", self.box_centre_A is None or len(self.box_centre_A) == 3, "give three numbers X Y Z"),
            ("neighbour_list_every_steps", self.neighbour_list_every_steps >= 1, "use at least 1"),
        ]  # fmt: skip
        for name, ok, fix in checks:
            if not ok:
                raise CryoflexInputError(source, f"invalid value {getattr(self, name)!r}", fix, field=name)
        placement = [self.consensus_map is not None, self.box_centre_A is not None, self.centre_structure]
        if sum(placement) > 1:
            raise CryoflexInputError(
                source, "more than one way to place the structure was given",
                "use only one of consensus_map, box_centre_A and centre_structure", field="consensus_map",
            )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then `overrides` (None values ignored); validated."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise CryoflexInputError(path, f"cannot read the configuration: {error}", "check the YAML syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise CryoflexInputError(path, "the configuration must be a mapping of name: value", "see docs")
        values.update(loaded or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CryoflexInputError(
            path, f"unknown setting(s) {', '.join(unknown)}", f"valid settings: {', '.join(sorted(known))}",
            field=unknown[0],
        )  # fmt: skip
    config = TrainConfig(**values)
    config.validate(path)
    return config
