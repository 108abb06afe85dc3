"""Summarise a cryo-EM file: particles (.star, .cs, .pkl), structures (.pdb, .cif) or image stacks (.mrcs, .mrc).

Prints counts, box and pixel size, optics groups, defocus range, voltage, whether poses and shifts are present and
how many rows share an image (symmetry expansion), or a structure's chains and residue counts. A stack shorter than
its header says is an error. With --json the same summary is printed as JSON for scripts.

examples:
  cryoflex info Refine3D/job042/run_data.star
  cryoflex info P12_J24_particles.cs --json
  cryoflex info --particles poses.pkl --ctf ctf.pkl --stack particles.mrcs
  cryoflex info model.cif
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cryoflex.errors import CryoflexInputError

METADATA_SUFFIXES = {".star", ".cs", ".pkl"}
STRUCTURE_SUFFIXES = {".pdb", ".ent", ".cif", ".mmcif"}
STACK_SUFFIXES = {".mrcs", ".mrc", ".map"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, nargs="?", help="a .star, .cs, .pkl, .pdb, .cif, .mrcs or .mrc file")
    parser.add_argument("--particles", type=Path, help="particle file (.star, .cs, .pkl) as for train")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--ctf", type=Path, help="cryoDRGN ctf.pkl to go with a poses .pkl")
    parser.add_argument("--stack", type=Path, help="image stack (.mrcs) of the particles in order (cryoDRGN .pkl)")
    parser.add_argument("--amplitude-contrast", type=float, help="for files that do not state it (RELION 3.0)")
    parser.add_argument("--box-size-px", type=int, help="box size in pixels, for files that do not state it")
    parser.add_argument("--pixel-size-A", type=float, help="pixel size in A, for files that do not state it")
    parser.add_argument("--datadir", type=Path, help="directory to resolve the particle stacks against")
    parser.add_argument("--no-images", action="store_true", help="do not check that the referenced image stacks exist")


def summarise(
    path: Path, *, datadir: Path | None = None, check_images: bool = True, **reader_options: Any
) -> dict[str, Any]:
    """The summary of one file as a JSON-serialisable dict; raises CryoflexInputError on bad input.

    reader_options go to cryoflex.io.metadata.read_metadata (ctf_path, stack_path, box_size_px, ...)."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise CryoflexInputError(path, "file not found", "check the path")
    if path.is_dir():
        raise CryoflexInputError(path, "a directory, not a file", "give one particle, structure or stack file in it")
    if suffix in METADATA_SUFFIXES:
        return _summarise_metadata(path, datadir, check_images, reader_options)
    if suffix in STRUCTURE_SUFFIXES:
        from cryoflex.io.structure import read_structure, structure_summary

        return {"kind": "structure", "path": str(path), **structure_summary(read_structure(path))}
    if suffix in STACK_SUFFIXES:
        return _summarise_stack(path)
    known = sorted(METADATA_SUFFIXES | STRUCTURE_SUFFIXES | STACK_SUFFIXES)
    raise CryoflexInputError(path, f"unknown file type '{suffix}'", f"give one of: {', '.join(known)}")


def _summarise_metadata(
    path: Path, datadir: Path | None, check_images: bool, reader_options: dict[str, Any]
) -> dict[str, Any]:
    from cryoflex.io.metadata import metadata_summary, read_metadata
    from cryoflex.io.particles import open_particle_images

    # Rows sharing an image are read as distinct particles: the summary counts them instead of refusing the file.
    options = {"duplicate_images": "distinct", **{k: v for k, v in reader_options.items() if v is not None}}
    metadata = read_metadata(path, **options)
    summary: dict[str, Any] = {"kind": "particles", "path": str(path), **metadata_summary(metadata)}
    if check_images and metadata.image_paths is not None:
        try:
            stack = open_particle_images(metadata, datadir=datadir)
            summary["images"] = {"found": True, "n_stacks": len(stack.stack_paths), "box_size_px": stack.box_size_px}
        except CryoflexInputError as error:
            summary["images"] = {"found": False, "problem": str(error)}
    return summary


def _summarise_stack(path: Path) -> dict[str, Any]:
    import warnings

    import mrcfile

    from cryoflex.io.particles import count_images

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                header = mrc.header
                shape = [int(header.nz), int(header.ny), int(header.nx)]
                voxel = mrc.voxel_size
                voxel_size_A = [float(voxel.x), float(voxel.y), float(voxel.z)]
                mode = int(header.mode)
    except (OSError, ValueError) as error:
        raise CryoflexInputError(
            path, f"not a readable MRC file: {error}", "check that the file is an MRC stack or map"
        ) from error
    count_images(path)  # raises when the file is shorter than its header says (truncated)
    stack = path.suffix.lower() == ".mrcs"
    summary: dict[str, Any] = {"kind": "stack" if stack else "map", "path": str(path)}
    if stack:
        summary.update(n_images=shape[0], box_size_px=shape[1:])
    else:
        summary.update(shape_zyx=shape)
    summary.update(voxel_size_A=voxel_size_A, mrc_mode=mode)
    return summary


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def format_summary(summary: dict[str, Any], indent: int = 0) -> str:
    """Readable, indented key: value lines (lists of records become small indented blocks)."""
    pad = "  " * indent
    lines = []
    for key, value in summary.items():
        label = key.replace("_", " ")
        if isinstance(value, dict):
            lines.append(f"{pad}{label}:")
            lines.append(format_summary(value, indent + 1))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{pad}{label}:")
            for record in value:
                lines.append(
                    f"{pad}  - " + ", ".join(f"{k.replace('_', ' ')} {_format_value(v)}" for k, v in record.items())
                )
        else:
            lines.append(f"{pad}{label}: {_format_value(value)}")
    return "\n".join(lines)


def _file_to_summarise(args: argparse.Namespace) -> Path:
    """PATH, or the particle file given with --particles (one of the two)."""
    if (args.path is None) == (args.particles is None):
        raise CryoflexInputError(
            None,
            "give one file to summarise" if args.path is None else "give either PATH or --particles, not both",
            "cryoflex info FILE, or cryoflex info --particles PARTICLES.star (an image stack goes with --stack)",
        )
    if args.particles is not None and args.particles.suffix.lower() not in METADATA_SUFFIXES:
        raise CryoflexInputError(
            args.particles,
            "--particles takes a particle file (.star, .cs or cryoDRGN poses .pkl), as in cryoflex train",
            "give an image stack with --stack (with a cryoDRGN .pkl) or as PATH (cryoflex info STACK.mrcs)",
            field="--particles",
        )
    return args.path if args.path is not None else args.particles


def run(args: argparse.Namespace) -> int:
    summary = summarise(
        _file_to_summarise(args),
        datadir=args.datadir,
        check_images=not args.no_images,
        ctf_path=args.ctf,
        stack_path=args.stack,
        amplitude_contrast=args.amplitude_contrast,
        box_size_px=args.box_size_px,
        pixel_size_A=args.pixel_size_A,
    )
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
