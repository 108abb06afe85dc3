"""Particle metadata readers/writers against real RELION/cryoSPARC files and cryoDRGN's golden outputs."""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import fields
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from numpy.lib import recfunctions

from cryoflex.errors import CryoflexInputError
from cryoflex.io.metadata import (
    CTFParameters,
    ParticleMetadata,
    metadata_summary,
    read_metadata,
    write_cryodrgn_pkl,
    write_relion_star,
)

PFCRT = "FinalRefinement-OriginalParticles-PfCRT.star"
CS_FILE = "cryosparc_P12_J24_001_particles.cs"
# The PfCRT star has no image size or amplitude contrast; cryoDRGN's golden files were made with D=300, w=0.1.
PFCRT_OPTIONS = {"box_size_px": 300, "amplitude_contrast": 0.1}


def _load_pickle(path: Path):
    with path.open("rb") as handle:
        return pickle.load(handle)


def _ctf_columns(ctf: CTFParameters) -> np.ndarray:
    """The CTF as cryoDRGN's ctf.pkl columns 2..8: dfU, dfV, dfAng, kV, Cs, w, phase."""
    return np.stack(
        [
            ctf.defocus_u_A,
            ctf.defocus_v_A,
            ctf.defocus_angle_deg,
            ctf.voltage_kV,
            ctf.cs_mm,
            ctf.amplitude_contrast,
            ctf.phase_shift_deg,
        ],
        axis=1,
    )


def _assert_ctf_equal(a: CTFParameters, b: CTFParameters, rtol: float = 0.0, atol: float = 0.0) -> None:
    for f in fields(CTFParameters):
        np.testing.assert_allclose(
            getattr(a, f.name), getattr(b, f.name), rtol=rtol, atol=atol, err_msg=f.name
        )


def _assert_same_particles(a: ParticleMetadata, b: ParticleMetadata, atol: float = 1e-6) -> None:
    """Same particles, poses, shifts, CTF and image references (not source path, format or tables)."""
    np.testing.assert_array_equal(a.names, b.names)
    np.testing.assert_allclose(a.pixel_size_A, b.pixel_size_A, atol=atol)
    assert a.box_size_px == b.box_size_px
    np.testing.assert_allclose(a.rotations, b.rotations, atol=atol)
    np.testing.assert_allclose(a.shifts_A, b.shifts_A, atol=atol)
    _assert_ctf_equal(a.ctf, b.ctf, atol=atol)
    np.testing.assert_array_equal(a.image_paths, b.image_paths)
    np.testing.assert_array_equal(a.image_indices, b.image_indices)


def _write_star(path: Path, blocks: dict) -> Path:
    starfile.write(blocks, path)
    return path


def _relion31_blocks(data_dir: Path) -> dict[str, pd.DataFrame]:
    return starfile.read(data_dir / "relion31.star", always_dict=True)


def _optics_by_group(path: Path) -> dict[int, dict[str, float]]:
    """data_optics parsed by hand (independently of starfile): group -> {column: value}."""
    lines = path.read_text().splitlines()
    start = lines.index("data_optics")
    columns, rows = [], {}
    for line in lines[start + 1 :]:
        if line.startswith("data_"):
            break
        if line.startswith("_rln"):
            columns.append(line.split()[0][1:])
        elif line.strip() and columns and line.split()[0].isdigit():
            values = dict(zip(columns, line.split(), strict=True))
            rows[int(values["rlnOpticsGroup"])] = {
                k: float(values[k])
                for k in (
                    "rlnImagePixelSize",
                    "rlnVoltage",
                    "rlnSphericalAberration",
                    "rlnAmplitudeContrast",
                    "rlnImageSize",
                )
            }
    return rows


# ------------------------------------------------------------------------------------------- golden checks


def test_relion30_matches_cryodrgn_golden_poses_and_ctf(data_dir: Path) -> None:
    md = read_metadata(data_dir / PFCRT, **PFCRT_OPTIONS)
    raw = starfile.read(data_dir / PFCRT)
    rotations, t = _load_pickle(data_dir / "pose.star.pkl")
    golden_ctf = _load_pickle(data_dir / "ctf1.pkl")
    assert md.format == "relion3.0" and md.n_particles == 5 and md.box_size_px == 300
    np.testing.assert_allclose(md.pixel_size_A, 1.035, rtol=1e-12)  # 1.035 um * 1e4 / 10000
    np.testing.assert_allclose(md.rotations, rotations, atol=1e-12)
    # rlnOriginX/Y are pixels in RELION 3.0; cryoDRGN's t is +origin_px / D (same sign, verified here).
    origin_px = raw[["rlnOriginX", "rlnOriginY"]].to_numpy()
    np.testing.assert_allclose(md.shifts_A, origin_px * 1.035, atol=1e-12)
    np.testing.assert_allclose(md.shifts_A / md.pixel_size_A[:, None] / 300, t, atol=1e-12)
    assert np.abs(t).max() > 1e-4  # the sign check above is not vacuous
    np.testing.assert_allclose(_ctf_columns(md.ctf), golden_ctf[:, 2:], rtol=1e-6)
    np.testing.assert_array_equal(md.ctf.bfactor_A2, 0.0)
    np.testing.assert_array_equal(md.ctf.scale, 1.0)
    np.testing.assert_array_equal(md.names, raw["rlnImageName"].to_numpy(dtype=str))
    np.testing.assert_array_equal(md.image_indices, np.arange(5))
    assert set(md.image_paths) == {"Extract/job012/FinalRefinement-OriginalParticles-PfCRT.mrcs"}


def test_writing_pfcrt_reproduces_cryodrgn_pickles(data_dir: Path, tmp_path: Path) -> None:
    md = read_metadata(data_dir / PFCRT, **PFCRT_OPTIONS)
    write_cryodrgn_pkl(tmp_path / "poses.pkl", tmp_path / "ctf.pkl", md)
    rotations, t = _load_pickle(tmp_path / "poses.pkl")
    golden_rotations, golden_t = _load_pickle(data_dir / "pose.star.pkl")
    np.testing.assert_allclose(rotations, golden_rotations, atol=1e-7)
    np.testing.assert_allclose(t, golden_t, atol=1e-7)
    ctf = _load_pickle(tmp_path / "ctf.pkl")
    golden = _load_pickle(data_dir / "ctf1.pkl")
    assert ctf.dtype == np.float32 and ctf.shape == golden.shape
    np.testing.assert_allclose(ctf, golden, rtol=1e-7)


def test_cryosparc_matches_cryodrgn_golden(data_dir: Path, tmp_path: Path) -> None:
    md = read_metadata(data_dir / CS_FILE)
    raw = np.load(data_dir / CS_FILE)
    rotations, t = _load_pickle(data_dir / "pose.cs.pkl")
    golden_ctf = _load_pickle(data_dir / "ctf2.pkl")
    assert md.format == "cryosparc" and md.n_particles == 2019 and md.box_size_px == 180
    np.testing.assert_allclose(md.rotations, rotations, atol=1e-6)
    # alignments3D/shift is in pixels; cryoDRGN's t = shift / D.
    np.testing.assert_allclose(md.shifts_A, raw["alignments3D/shift"] * 2.95, rtol=1e-6)
    np.testing.assert_allclose(md.shifts_A / md.pixel_size_A[:, None] / 180, t, atol=1e-7)
    np.testing.assert_allclose(_ctf_columns(md.ctf), golden_ctf[:, 2:], rtol=1e-6, atol=1e-5)
    assert np.ptp(md.ctf.defocus_angle_deg) > 10  # radians were converted: the angles are spread in degrees
    np.testing.assert_array_equal(md.image_indices, raw["blob/idx"])
    assert np.unique(md.image_paths).size == 50 and md.image_paths[0].startswith("J19/extract/")
    assert np.unique(md.names).size == 2019 and md.names[0] == str(raw["uid"][0])
    write_cryodrgn_pkl(tmp_path / "poses.pkl", tmp_path / "ctf.pkl", md)
    written_rotations, written_t = _load_pickle(tmp_path / "poses.pkl")
    np.testing.assert_allclose(written_rotations, rotations, atol=1e-6)
    np.testing.assert_allclose(written_t, t, atol=1e-7)
    np.testing.assert_allclose(_load_pickle(tmp_path / "ctf.pkl"), golden_ctf, rtol=1e-6, atol=1e-4)


def test_cryosparc_class_alignments_and_imported_paths(data_dir: Path, tmp_path: Path) -> None:
    raw = np.load(data_dir / CS_FILE)
    renamed = {name: name.replace("alignments3D/", "alignments_class_0/") for name in raw.dtype.names}
    table = recfunctions.rename_fields(raw, renamed)
    table["blob/path"] = np.char.add(b">", raw["blob/path"])
    with (tmp_path / "class.cs").open("wb") as handle:
        np.save(handle, table)
    md = read_metadata(tmp_path / "class.cs")
    reference = read_metadata(data_dir / CS_FILE)
    _assert_same_particles(md, reference, atol=0.0)
    assert not any(p.startswith(">") for p in md.image_paths)


# ------------------------------------------------------------------------------------------- RELION variants


def test_a_record_names_a_known_format(data_dir: Path) -> None:
    md = read_metadata(data_dir / "relion31.star")
    values = {f.name: getattr(md, f.name) for f in fields(md)}
    assert ParticleMetadata(**values).format == "relion3.1"
    with pytest.raises(ValueError, match="format must be one of"):
        ParticleMetadata(**{**values, "format": "relion4"})


def test_relion31_values(data_dir: Path) -> None:
    md = read_metadata(data_dir / "relion31.star")
    raw = _relion31_blocks(data_dir)["particles"]
    assert md.format == "relion3.1" and md.n_particles == 5 and md.box_size_px == 256
    np.testing.assert_array_equal(md.pixel_size_A, 2.806)
    np.testing.assert_array_equal(md.ctf.voltage_kV, 300.0)
    np.testing.assert_array_equal(md.ctf.cs_mm, 0.01)
    np.testing.assert_array_equal(md.ctf.amplitude_contrast, 0.1)
    np.testing.assert_array_equal(md.shifts_A, raw[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
    np.testing.assert_array_equal(md.ctf.defocus_u_A, raw["rlnDefocusU"].to_numpy())
    np.testing.assert_array_equal(md.image_paths, ["relion31.mrcs"] * 5)
    np.testing.assert_array_equal(md.image_indices, np.arange(5))
    np.testing.assert_array_equal(md.optics_group, 1)
    rotation = md.rotations[0]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)


def test_optics_block_after_particles_gives_identical_record(data_dir: Path) -> None:
    a = read_metadata(data_dir / "relion31.star")
    b = read_metadata(data_dir / "relion31.v2.star")
    assert a.format == b.format and a.box_size_px == b.box_size_px
    for f in fields(ParticleMetadata):
        if f.name in ("source_path", "format", "box_size_px", "ctf"):
            continue
        value_a, value_b = getattr(a, f.name), getattr(b, f.name)
        if isinstance(value_a, pd.DataFrame):
            pd.testing.assert_frame_equal(value_a, value_b)
        else:
            np.testing.assert_array_equal(value_a, value_b, err_msg=f.name)
    _assert_ctf_equal(a.ctf, b.ctf)


def test_six_optics_groups_each_particle_gets_its_own_group(data_dir: Path) -> None:
    path = data_dir / "relion31.6opticsgroups.star"
    md = read_metadata(path)
    expected = _optics_by_group(path)
    assert md.n_particles == 139 and len(expected) == 6 and md.box_size_px == 196
    assert sorted(np.unique(md.optics_group)) == sorted(expected)
    for field, values in (
        ("rlnImagePixelSize", md.pixel_size_A),
        ("rlnVoltage", md.ctf.voltage_kV),
        ("rlnSphericalAberration", md.ctf.cs_mm),
        ("rlnAmplitudeContrast", md.ctf.amplitude_contrast),
    ):
        wanted = np.array([expected[g][field] for g in md.optics_group])
        np.testing.assert_array_equal(values, wanted, err_msg=field)
    assert np.unique(md.pixel_size_A).size == 2 and np.unique(md.ctf.cs_mm).size == 2  # groups really differ
    summary = metadata_summary(md)
    assert summary["n_optics_groups"] == 6
    assert sum(group["n_particles"] for group in summary["optics_groups"]) == 139
    for group in summary["optics_groups"]:
        assert group["pixel_size_A"] == expected[group["group"]]["rlnImagePixelSize"]
        assert group["cs_mm"] == expected[group["group"]]["rlnSphericalAberration"]


def test_tab_separated_starfile_output_reads(data_dir: Path) -> None:
    md = read_metadata(data_dir / "test_starfile.star")
    assert md.n_particles == 3 and md.box_size_px == 16
    np.testing.assert_array_equal(md.pixel_size_A, 12.0)
    np.testing.assert_array_equal(md.image_paths, ["000000.mrcs"] * 3)
    np.testing.assert_array_equal(md.image_indices, [0, 1, 2])
    # This file states B-factor 1 and scale 2: read, not defaulted.
    np.testing.assert_array_equal(md.ctf.bfactor_A2, 1.0)
    np.testing.assert_array_equal(md.ctf.scale, 2.0)


def test_missing_optional_ctf_columns_default_not_nan(data_dir: Path, tmp_path: Path) -> None:
    blocks = _relion31_blocks(data_dir)
    blocks["particles"] = blocks["particles"].drop(
        columns=["rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor"]
    )
    md = read_metadata(_write_star(tmp_path / "no_phase.star", blocks))
    np.testing.assert_array_equal(md.ctf.phase_shift_deg, 0.0)
    np.testing.assert_array_equal(md.ctf.bfactor_A2, 0.0)
    np.testing.assert_array_equal(md.ctf.scale, 1.0)


def test_relion5_detected_and_particle_block_found_by_columns(data_dir: Path, tmp_path: Path) -> None:
    blocks = _relion31_blocks(data_dir)
    renamed = {
        "general": {"rlnTomoSubTomosAre2DStacks": 1},
        "lenses": blocks["optics"],
        "things": blocks["particles"],
    }
    md = read_metadata(_write_star(tmp_path / "r5.star", renamed))
    assert md.format == "relion5"
    _assert_same_particles(md, read_metadata(data_dir / "relion31.star"), atol=0.0)
    path = tmp_path / "version.star"
    path.write_text("# version 50001\n" + (data_dir / "relion31.star").read_text())
    assert read_metadata(path).format == "relion5"


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("name", "options"),
    [("relion31.star", {}), ("relion31.6opticsgroups.star", {}), (PFCRT, PFCRT_OPTIONS), (CS_FILE, {})],
)
def test_relion_star_round_trip(data_dir: Path, tmp_path: Path, name: str, options: dict) -> None:
    md = read_metadata(data_dir / name, **options)
    out = tmp_path / "out.star"
    write_relion_star(out, md)
    back = read_metadata(out)
    assert back.format == "relion3.1"
    text = out.read_text()
    assert text.count("# version 30001") == 2 and "data_optics" in text and "data_particles" in text
    assert "Created by" not in text and not re.search(r"\d\d:\d\d:\d\d", text)  # no time stamp: same bytes
    np.testing.assert_allclose(back.rotations, md.rotations, atol=1e-6)
    np.testing.assert_allclose(back.shifts_A, md.shifts_A, atol=1e-6)
    _assert_ctf_equal(back.ctf, md.ctf, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back.pixel_size_A, md.pixel_size_A, rtol=1e-6)
    np.testing.assert_array_equal(back.optics_group, md.optics_group)
    assert md.half_sets is not None and set(np.unique(md.half_sets)) <= {1, 2}  # every file here has half sets
    np.testing.assert_array_equal(back.half_sets, md.half_sets)  # rlnRandomSubset, also from cryoSPARC's split
    np.testing.assert_array_equal(back.image_paths, md.image_paths)
    np.testing.assert_array_equal(back.image_indices, md.image_indices)
    assert back.box_size_px == md.box_size_px
    if md.format.startswith("relion"):
        np.testing.assert_array_equal(back.names, md.names)
        kept = [
            c
            for c in md.particles_table.columns
            if c in ("rlnMicrographName", "rlnCoordinateX", "rlnClassNumber")
        ]
        assert kept
        pd.testing.assert_frame_equal(back.particles_table[kept], md.particles_table[kept])


def test_round_trip_keeps_optics_extras(data_dir: Path, tmp_path: Path) -> None:
    md = read_metadata(data_dir / "relion31.6opticsgroups.star")
    write_relion_star(tmp_path / "out.star", md)
    optics = read_metadata(tmp_path / "out.star").optics_table.set_index("rlnOpticsGroup").sort_index()
    original = md.optics_table.set_index("rlnOpticsGroup").sort_index()
    for column in ("rlnOpticsGroupName", "rlnBeamTiltX", "rlnMagMat00", "rlnOddZernike"):
        pd.testing.assert_series_equal(optics[column], original[column], check_dtype=False)


def test_subset_and_write_keeps_rows(data_dir: Path, tmp_path: Path) -> None:
    md = read_metadata(data_dir / "relion31.6opticsgroups.star")
    order = np.array([100, 3, 57, 0])
    sub = md.subset(order)
    assert sub.n_particles == 4
    np.testing.assert_array_equal(sub.names, md.names[order])
    np.testing.assert_array_equal(sub.rotations, md.rotations[order])
    np.testing.assert_array_equal(sub.ctf.defocus_v_A, md.ctf.defocus_v_A[order])
    np.testing.assert_array_equal(sub.optics_group, md.optics_group[order])
    pd.testing.assert_frame_equal(sub.particles_table, md.particles_table.iloc[order].reset_index(drop=True))
    mask = np.zeros(md.n_particles, dtype=bool)
    mask[[5, 9]] = True
    np.testing.assert_array_equal(md.subset(mask).names, md.names[[5, 9]])
    write_relion_star(tmp_path / "sub.star", sub)
    back = read_metadata(tmp_path / "sub.star")
    np.testing.assert_array_equal(back.names, sub.names)
    np.testing.assert_allclose(back.pixel_size_A, sub.pixel_size_A)
    np.testing.assert_array_equal(
        back.particles_table["rlnCoordinateX"], sub.particles_table["rlnCoordinateX"]
    )


def test_cryodrgn_round_trip_with_stack(data_dir: Path, tmp_path: Path) -> None:
    md = read_metadata(data_dir / "relion31.star")
    write_cryodrgn_pkl(tmp_path / "poses.pkl", tmp_path / "ctf.pkl", md)
    stack = data_dir / "relion31.mrcs"
    back = read_metadata(tmp_path / "poses.pkl", ctf_path=tmp_path / "ctf.pkl", stack_path=stack)
    assert back.format == "cryodrgn" and back.box_size_px == 256
    np.testing.assert_allclose(back.rotations, md.rotations, atol=1e-12)
    np.testing.assert_allclose(back.shifts_A, md.shifts_A, atol=1e-5)  # pixel size passes through float32
    _assert_ctf_equal(back.ctf, md.ctf, rtol=1e-6)
    np.testing.assert_allclose(back.pixel_size_A, md.pixel_size_A, rtol=1e-6)
    np.testing.assert_array_equal(back.image_paths, [str(stack.resolve())] * 5)
    np.testing.assert_array_equal(back.image_indices, md.image_indices)
    swapped = read_metadata(tmp_path / "ctf.pkl", ctf_path=tmp_path / "poses.pkl")
    np.testing.assert_array_equal(swapped.rotations, back.rotations)


def test_cryodrgn_bare_rotations_and_ctf_only(data_dir: Path, tmp_path: Path) -> None:
    rotations, _ = _load_pickle(data_dir / "pose.star.pkl")
    with (tmp_path / "rot.pkl").open("wb") as handle:
        pickle.dump(rotations, handle)
    md = read_metadata(tmp_path / "rot.pkl", ctf_path=data_dir / "ctf1.pkl")
    assert md.shifts_A is None and md.box_size_px == 300
    np.testing.assert_array_equal(md.rotations, rotations)
    ctf_only = read_metadata(data_dir / "ctf1.pkl")
    assert ctf_only.rotations is None and ctf_only.ctf is not None


def test_summary_is_json_ready(data_dir: Path) -> None:
    summary = metadata_summary(read_metadata(data_dir / "relion31.star"))
    assert json.loads(json.dumps(summary)) == summary
    assert summary["n_particles"] == 5 and summary["box_size_px"] == 256 and summary["pixel_size_A"] == 2.806
    assert summary["has_poses"] and summary["has_shifts"] and summary["voltage_kV"] == 300.0
    assert summary["defocus_range_A"] == [12243.542289, 13108.082418]
    assert summary["format"] == "relion3.1" and summary["n_image_stacks"] == 1


# ------------------------------------------------------------------------------------------- errors


def _error(path: Path, **options) -> CryoflexInputError:
    with pytest.raises(CryoflexInputError) as info:
        read_metadata(path, **options)
    return info.value


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    assert "not found" in str(_error(tmp_path / "absent.star"))
    (tmp_path / "x.txt").write_text("hello")
    assert "unknown" in str(_error(tmp_path / "x.txt"))


def test_not_a_particle_star(data_dir: Path) -> None:
    error = _error(data_dir / "star_edge_cases" / "postprocess.star")
    assert error.field == "rlnImageName" and "not a particle STAR file" in str(error)
    assert "data_fsc" in str(error) and "rlnDefocusU" in error.fix


def test_empty_particle_tables(data_dir: Path, tmp_path: Path) -> None:
    assert "empty" in str(_error(data_dir / "star_edge_cases" / "empty_loop.star"))
    blocks = _relion31_blocks(data_dir)
    blocks["particles"] = blocks["particles"].iloc[:0]
    assert "no rows" in str(_error(_write_star(tmp_path / "empty.star", blocks)))


def test_several_particle_tables(data_dir: Path) -> None:
    error = _error(data_dir / "star_edge_cases" / "rln3.1_data_style.star")
    assert "data_block_2" in str(error) and "data_block_3" in str(error)


@pytest.mark.parametrize("column", ["rlnDefocusU", "rlnDefocusAngle", "rlnImageName"])
def test_missing_required_column_is_named(data_dir: Path, tmp_path: Path, column: str) -> None:
    blocks = _relion31_blocks(data_dir)
    blocks["particles"] = blocks["particles"].drop(columns=[column])
    error = _error(_write_star(tmp_path / "missing.star", blocks))
    assert column in error.field and error.fix


def test_missing_amplitude_contrast_needs_a_value(data_dir: Path) -> None:
    error = _error(data_dir / PFCRT)
    assert error.field == "rlnAmplitudeContrast" and "--amplitude-contrast 0.1" in error.fix


def test_undefined_optics_group(data_dir: Path, tmp_path: Path) -> None:
    blocks = _relion31_blocks(data_dir)
    blocks["particles"].loc[3, "rlnOpticsGroup"] = 2
    error = _error(_write_star(tmp_path / "group.star", blocks))
    assert error.field == "rlnOpticsGroup" and "row 4" in str(error) and "optics group 2" in str(error)


@pytest.mark.parametrize(
    ("block", "column", "row", "value"),
    [
        ("particles", "rlnDefocusV", 2, np.nan),
        ("particles", "rlnAngleTilt", 4, np.inf),
        ("optics", "rlnVoltage", 0, np.nan),
    ],
)
def test_non_finite_values_name_column_and_row(
    data_dir: Path, tmp_path: Path, block: str, column: str, row: int, value: float
) -> None:
    blocks = _relion31_blocks(data_dir)
    blocks[block].loc[row, column] = value
    error = _error(_write_star(tmp_path / "bad.star", blocks))
    assert error.field == column and f"row {row + 1}" in str(error)


@pytest.mark.parametrize(("column", "value"), [("rlnVoltage", 0.0), ("rlnAmplitudeContrast", 1.5),
                                               ("rlnImagePixelSize", -1.0)])  # fmt: skip
def test_a_bad_optics_value_is_blamed_on_its_optics_group_not_a_particle(
    data_dir: Path, tmp_path: Path, column: str, value: float
) -> None:
    blocks = _relion31_blocks(data_dir)
    blocks["optics"].loc[0, column] = value
    error = _error(_write_star(tmp_path / "optics.star", blocks))
    group = blocks["optics"].loc[0, "rlnOpticsGroup"]
    assert error.field == column and f"in optics group {group} of data_optics" in str(error)
    assert "correct that value in data_optics" in str(error) and "remove that particle" not in str(error)


@pytest.mark.parametrize("column", ["rlnDefocusU", "rlnDefocusV"])
def test_negative_defocus_names_column_and_row(data_dir: Path, tmp_path: Path, column: str) -> None:
    """Defocus is positive for underfocus in RELION; a negative value is a broken row, not an overfocus to model."""
    blocks = _relion31_blocks(data_dir)
    blocks["particles"].loc[3, column] = -12000.0
    error = _error(_write_star(tmp_path / "negative.star", blocks))
    assert error.field == column and "row 4" in str(error) and "-12000" in str(error) and "0 or more" in str(error)


def test_disagreeing_box_sizes(data_dir: Path, tmp_path: Path) -> None:
    blocks = starfile.read(data_dir / "relion31.6opticsgroups.star", always_dict=True)
    blocks["optics"].loc[2, "rlnImageSize"] = 128
    error = _error(_write_star(tmp_path / "boxes.star", blocks))
    assert error.field == "rlnImageSize" and "128" in str(error) and "196" in str(error)
    assert _error(data_dir / "relion31.star", box_size_px=128).field == "rlnImageSize"
    error = _error(data_dir / "pose.star.pkl", ctf_path=data_dir / "ctf1.pkl", box_size_px=128)
    assert error.field == "D" and error.path == str(data_dir / "ctf1.pkl")  # the file that says otherwise, not poses


def test_duplicated_and_malformed_image_names(data_dir: Path, tmp_path: Path) -> None:
    blocks = _relion31_blocks(data_dir)
    blocks["particles"].loc[2, "rlnImageName"] = blocks["particles"].loc[0, "rlnImageName"]
    error = _error(_write_star(tmp_path / "dup.star", blocks))
    assert error.field == "rlnImageName" and "rows 1 and 3" in str(error)
    blocks = _relion31_blocks(data_dir)
    blocks["particles"].loc[1, "rlnImageName"] = "first@relion31.mrcs"
    assert "row 2" in str(_error(_write_star(tmp_path / "bad_name.star", blocks)))


def test_cryodrgn_lengths_disagree(data_dir: Path, tmp_path: Path) -> None:
    ctf = _load_pickle(data_dir / "ctf1.pkl")
    with (tmp_path / "ctf4.pkl").open("wb") as handle:
        pickle.dump(ctf[:4], handle)
    error = _error(data_dir / "pose.star.pkl", ctf_path=tmp_path / "ctf4.pkl")
    assert "different numbers of particles" in str(error) and "5" in str(error) and "4" in str(error)


def test_cryodrgn_shifts_need_box_and_pixel(data_dir: Path) -> None:
    assert _error(data_dir / "pose.star.pkl").field == "Apix"
    assert _error(data_dir / "pose.star.pkl", pixel_size_A=1.035).field == "t"
    md = read_metadata(data_dir / "pose.star.pkl", pixel_size_A=1.035, box_size_px=300)
    assert md.ctf is None and md.shifts_A is not None


def test_stack_must_match_box_and_count(data_dir: Path, tmp_path: Path) -> None:
    stack = data_dir / "relion31.mrcs"  # 5 images of 256 px
    error = _error(data_dir / "pose.star.pkl", ctf_path=data_dir / "ctf1.pkl", stack_path=stack)
    assert error.field == "D" and "300" in str(error) and "256" in str(error)
    blocks = _relion31_blocks(data_dir)
    blocks["particles"] = blocks["particles"].iloc[:3]
    error = _error(_write_star(tmp_path / "three.star", blocks), stack_path=stack)
    assert error.field == "--stack" and "holds 5 images" in str(error) and "3 particles" in str(error)


def test_stack_replacing_the_images_a_star_file_names_warns(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--stack is cryoDRGN's convention; given with a STAR file that names its images it still wins, but says so."""
    stack = data_dir / "relion31.mrcs"
    with caplog.at_level(logging.WARNING, logger="cryoflex.io.metadata"):
        metadata = read_metadata(data_dir / "relion31.star", stack_path=stack)
    assert metadata.image_indices.tolist() == [0, 1, 2, 3, 4]
    assert "names its images" in caplog.text and "replaces them" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cryoflex.io.metadata"):
        pkl_stack = tmp_path / "five.mrcs"  # the .pkl's particles are 300 px
        with mrcfile.new(pkl_stack) as handle:
            handle.set_data(np.zeros((5, 300, 300), np.float32))
        read_metadata(data_dir / "pose.star.pkl", ctf_path=data_dir / "ctf1.pkl", stack_path=pkl_stack)
    assert "replaces them" not in caplog.text  # a cryoDRGN .pkl names no images: nothing is replaced


def test_ctf_path_only_with_pkl(data_dir: Path) -> None:
    assert _error(data_dir / "relion31.star", ctf_path=data_dir / "ctf1.pkl").field == "--ctf"


# ------------------------------------------------------------------------------------------- rows sharing an image


def _symmetry_expanded(data_dir: Path, tmp_path: Path) -> Path:
    """relion31.star plus copies of rows 1, 1 and 3 with other angles: 5 rows share 2 images, 8 rows in all."""
    blocks = _relion31_blocks(data_dir)
    particles = blocks["particles"]
    copies = particles.iloc[[0, 0, 2]].copy()
    copies["rlnAngleRot"] = copies["rlnAngleRot"].to_numpy() + np.array([120.0, 240.0, 180.0])
    blocks["particles"] = pd.concat([particles, copies], ignore_index=True)
    return _write_star(tmp_path / "expanded.star", blocks)


def test_rows_sharing_an_image_are_refused_with_the_choices(data_dir: Path, tmp_path: Path) -> None:
    error = _error(_symmetry_expanded(data_dir, tmp_path))
    message = str(error)
    assert error.field == "rlnImageName" and "5 rows share 2 image(s)" in message and "rows 1 and 6" in message
    assert "symmetry expansion" in message and "np.str_" not in message
    assert "--duplicate-images first" in error.fix and "--duplicate-images distinct" in error.fix


def test_one_image_written_two_ways_is_one_image(data_dir: Path, tmp_path: Path) -> None:
    """'000001@s.mrcs' and '1@s.mrcs' name the same image: refused as rows sharing it, not read as two particles."""
    blocks = _relion31_blocks(data_dir)
    particles = blocks["particles"]
    copy = particles.iloc[[0]].copy()
    number, _, stack = str(copy["rlnImageName"].iloc[0]).partition("@")
    copy["rlnImageName"] = f"{int(number)}@{stack}"
    assert copy["rlnImageName"].iloc[0] != particles["rlnImageName"].iloc[0]
    blocks["particles"] = pd.concat([particles, copy], ignore_index=True)
    error = _error(_write_star(tmp_path / "two_ways.star", blocks))
    assert error.field == "rlnImageName" and "2 rows share 1 image(s)" in str(error) and "are one image" in str(error)


def test_rows_sharing_an_image_first_row_kept(data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    original = read_metadata(data_dir / "relion31.star")
    with caplog.at_level("WARNING"):
        md = read_metadata(_symmetry_expanded(data_dir, tmp_path), duplicate_images="first")
    _assert_same_particles(md, original, atol=0.0)
    assert "dropped 3 rows" in caplog.text


def test_rows_sharing_an_image_as_distinct_particles(data_dir: Path, tmp_path: Path) -> None:
    original = read_metadata(data_dir / "relion31.star")
    md = read_metadata(_symmetry_expanded(data_dir, tmp_path), duplicate_images="distinct")
    assert md.n_particles == 8
    np.testing.assert_array_equal(md.image_indices, [0, 1, 2, 3, 4, 0, 0, 2])
    assert md.names[5] == f"{original.names[0]}#row6" and md.names[1] == original.names[1]
    np.testing.assert_array_equal(md.rotations[:5], original.rotations)
    assert not np.allclose(md.rotations[5], md.rotations[0])  # each row keeps its own pose
    summary = metadata_summary(md)
    assert summary["n_rows_sharing_an_image"] == 5 and summary["n_shared_images"] == 2
    assert metadata_summary(original)["n_rows_sharing_an_image"] == 0
    write_relion_star(tmp_path / "out.star", md)
    back = read_metadata(tmp_path / "out.star", duplicate_images="distinct")
    np.testing.assert_array_equal(back.names, md.names)
    np.testing.assert_allclose(back.rotations, md.rotations, atol=1e-6)


def test_malformed_image_name_is_printed_plainly(data_dir: Path, tmp_path: Path) -> None:
    blocks = _relion31_blocks(data_dir)
    blocks["particles"].loc[1, "rlnImageName"] = "first@relion31.mrcs"
    message = str(_error(_write_star(tmp_path / "bad_name.star", blocks)))
    assert "'first@relion31.mrcs'" in message and "np.str_" not in message


def test_a_cs_file_of_python_objects_is_refused_without_numpys_unsafe_advice(tmp_path: Path) -> None:
    path = tmp_path / "objects.cs"
    with path.open("wb") as handle:
        np.save(handle, np.array([{"uid": 1}], dtype=object), allow_pickle=True)
    error = _error(path)
    assert "not a readable cryoSPARC .cs file" in str(error) and "allow_pickle" not in str(error)


def test_a_short_row_is_reported_as_short_not_as_nan(data_dir: Path, tmp_path: Path) -> None:
    """A row with fewer values than columns (a file cut short) read as NaN: the error says the row is short."""
    lines = (data_dir / "relion31.star").read_text().splitlines()
    last = max(k for k, line in enumerate(lines) if "@" in line)
    lines[last] = " ".join(lines[last].split()[:-3])
    path = tmp_path / "short.star"
    path.write_text("\n".join(lines) + "\n")
    error = _error(path)
    assert "has no number at row 5" in str(error) and "fewer values than the table has columns" in str(error)
    assert "'nan'" not in str(error)
