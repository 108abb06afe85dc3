"""Summarise a cryo-EM file: particle metadata (.star, .cs, .pkl), structures (.pdb, .cif) or image stacks (.mrcs, .mrc).

Prints counts, box and pixel size, optics groups, defocus range, voltage, whether poses and shifts are present, or a
structure's chains and residue counts. With --json the same summary is printed as JSON for scripts.

examples:
  cryoflex info Refine3D/job042/run_data.star
  cryoflex info P12_J24_particles.cs --json
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
    parser.add_argument("path", type=Path, help="a .star, .cs, .pkl, .pdb, .cif, .mrcs or .mrc file")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--ctf", type=Path, help="cryoDRGN ctf.pkl to go with a poses .pkl")
    parser.add_argument("--datadir", type=Path, help="directory to resolve the particle stacks against")
    parser.add_argument("--no-images", action="store_true", help="do not check that the referenced image stacks exist")


def summarise(path: Path, *, ctf_path: Path | None = None, datadir: Path | None = None,
              check_images: bool = True) -> dict[str, Any]:
    """The summary of one file as a JSON-serialisable dict; raises CryoflexInputError on bad input."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise CryoflexInputError(path, "file not found", "check the path")
    if suffix in METADATA_SUFFIXES:
        return _summarise_metadata(path, ctf_path, datadir, check_images)
    if suffix in STRUCTURE_SUFFIXES:
        from cryoflex.io.structure import read_structure, structure_summary

        return {"kind": "structure", "path": str(path), **structure_summary(read_structure(path))}
    if suffix in STACK_SUFFIXES:
        return _summarise_stack(path)
    known = sorted(METADATA_SUFFIXES | STRUCTURE_SUFFIXES | STACK_SUFFIXES)
    raise CryoflexInputError(path, f"unknown file type '{suffix}'", f"give one of: {', '.join(known)}")


def _summarise_metadata(path: Path, ctf_path: Path | None, datadir: Path | None, check_images: bool) -> dict[str, Any]:
    from cryoflex.io.metadata import metadata_summary, read_metadata
    from cryoflex.io.particles import open_particle_images

    metadata = read_metadata(path, ctf_path=ctf_path)
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
        raise CryoflexInputError(path, f"not a readable MRC file: {error}", "check that the file is an MRC stack or map")
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
                lines.append(f"{pad}  - " + ", ".join(f"{k.replace('_', ' ')} {_format_value(v)}"
                                                      for k, v in record.items()))
        else:
            lines.append(f"{pad}{label}: {_format_value(value)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    summary = summarise(args.path, ctf_path=args.ctf, datadir=args.datadir, check_images=not args.no_images)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
