"""MRC maps: atomic round trip with voxel size and origin, a real EMDB map, and unreadable-file errors."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoflex.errors import CryoflexInputError
from cryoflex.io.maps import read_mrc, write_mrc


def test_round_trip_keeps_data_voxel_size_and_origin(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(6, 7, 8)).astype(np.float32)
    target = tmp_path / "maps" / "vol.mrc"
    write_mrc(target, volume, voxel_size_A=1.35, origin_A=(-10.5, 2.0, 30.25))
    data, voxel_size_A, origin_A = read_mrc(target)
    np.testing.assert_array_equal(data, volume)
    assert data.dtype == np.float32
    assert voxel_size_A == pytest.approx(1.35)
    assert origin_A == pytest.approx((-10.5, 2.0, 30.25))
    assert [p.name for p in target.parent.iterdir()] == ["vol.mrc"]


def test_written_header_is_what_chimerax_reads(tmp_path: Path) -> None:
    volume = np.zeros((4, 5, 6), dtype=np.float64)
    volume[1, 2, 3] = 1.0
    write_mrc(tmp_path / "v.mrc", volume, voxel_size_A=2.0, origin_A=(1.0, 2.0, 3.0))
    with mrcfile.open(tmp_path / "v.mrc") as mrc:
        assert mrc.data.dtype == np.float32
        assert (int(mrc.header.nx), int(mrc.header.ny), int(mrc.header.nz)) == (6, 5, 4)
        origin = mrc.header.origin
        assert (float(origin.x), float(origin.y), float(origin.z)) == (1.0, 2.0, 3.0)
        assert (int(mrc.header.nxstart), int(mrc.header.nystart), int(mrc.header.nzstart)) == (0, 0, 0)
        assert mrc.voxel_size.z == pytest.approx(2.0)
        assert mrc.is_volume()
        assert mrc.header.dmax == pytest.approx(1.0)


def test_reads_real_emdb_map(data_dir: Path) -> None:
    data, voxel_size_A, origin_A = read_mrc(data_dir / "EMD-3197.map")
    with mrcfile.open(data_dir / "EMD-3197.map") as mrc:
        reference = np.array(mrc.data, dtype=np.float32)
    assert data.shape == (20, 20, 20) and data.dtype == np.float32
    np.testing.assert_array_equal(data, reference)
    assert voxel_size_A == pytest.approx(11.4)
    # The header origin is zero and NXSTART = -2, so the origin comes from N*START (as ChimeraX does).
    assert origin_A == pytest.approx((-2 * 11.4, 0.0, 0.0))


def test_permuted_axes_are_returned_as_zyx(tmp_path: Path) -> None:
    zyx = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    with mrcfile.new(tmp_path / "p.mrc") as mrc:
        mrc.set_data(np.ascontiguousarray(zyx.transpose(2, 1, 0)))  # file sections = X, rows = Y, columns = Z
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 3, 2, 1
        mrc.voxel_size = 1.5
    data, voxel_size_A, _ = read_mrc(tmp_path / "p.mrc")
    np.testing.assert_array_equal(data, zyx)
    assert voxel_size_A == pytest.approx(1.5)


def test_unreadable_and_missing_files_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mrc"
    garbage.write_bytes(b"not an mrc file" * 3)
    with pytest.raises(CryoflexInputError, match="garbage.mrc"):
        read_mrc(garbage)
    with pytest.raises(CryoflexInputError, match="absent.mrc"):
        read_mrc(tmp_path / "absent.mrc")
    zeros = tmp_path / "zeros.mrc"
    zeros.write_bytes(bytes(2048))
    with pytest.raises(CryoflexInputError, match="zeros.mrc"):
        read_mrc(zeros)


def test_write_rejects_non_volumes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3-D"):
        write_mrc(tmp_path / "flat.mrc", np.zeros((4, 4)), voxel_size_A=1.0)
    with pytest.raises(ValueError, match="voxel size"):
        write_mrc(tmp_path / "flat.mrc", np.zeros((4, 4, 4)), voxel_size_A=0.0)
    assert list(tmp_path.iterdir()) == []
