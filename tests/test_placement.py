"""Placing the nominal structure in the particle frame: map box centres and the placement errors."""

import logging

import mrcfile
import numpy as np
import pytest

from cryoflex.config import TrainConfig
from cryoflex.data.placement import box_centre_from_map_A, map_extent_A, place_structure_A
from cryoflex.errors import CryoflexInputError
from cryoflex.imaging.volume import write_volume_mrc
from cryoflex.io.maps import read_mrc
from cryoflex.io.structure import read_structure
from cryoflex.train.setup import placed_structure


@pytest.mark.parametrize("box_px", [32, 33])
def test_centre_of_cryoflex_volume_is_model_origin(tmp_path, box_px):
    path = tmp_path / "volume.mrc"
    write_volume_mrc(path, np.zeros((box_px,) * 3, np.float32), voxel_size_A=1.7)
    np.testing.assert_allclose(box_centre_from_map_A(path), 0.0, atol=1e-5)


def _hand_made_map(path, origin_A, starts, shape_zyx=(28, 24, 20), voxel_A=2.0, axes=(1, 2, 3)):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.zeros(shape_zyx, np.float32))
        mrc.voxel_size = voxel_A
        mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = starts
        mrc.header.origin = origin_A
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = axes


def test_header_origin_takes_precedence_over_start(tmp_path):
    path = tmp_path / "origin.mrc"
    _hand_made_map(path, (10.0, -20.0, 30.5), (5, 6, 7))
    # ChimeraX rule: a non-zero origin places voxel 0; N//2 = (10, 12, 14) voxels of 2 A on x, y, z.
    np.testing.assert_allclose(box_centre_from_map_A(path), [30.0, 4.0, 58.5], atol=1e-5)


def test_start_is_used_when_origin_is_zero(tmp_path):
    path = tmp_path / "start.mrc"
    _hand_made_map(path, (0.0, 0.0, 0.0), (-10, 6, -14))
    np.testing.assert_allclose(box_centre_from_map_A(path), [0.0, 36.0, 0.0], atol=1e-5)


def test_permuted_axes_map_starts_and_sizes_to_xyz(tmp_path):
    path = tmp_path / "permuted.mrc"
    # Columns run along z, rows along y, sections along x: file shape (sections, rows, columns).
    _hand_made_map(path, (0.0, 0.0, 0.0), (3, 4, 5), shape_zyx=(10, 12, 14), voxel_A=1.0, axes=(3, 2, 1))
    # x: 10 sections, start 5; y: 12 rows, start 4; z: 14 columns, start 3 (mrcfile's voxel size is per x/y/z).
    with mrcfile.open(path) as mrc:
        voxel = np.array([mrc.voxel_size.x, mrc.voxel_size.y, mrc.voxel_size.z], float)
    expected = (np.array([5, 4, 3]) + np.array([10, 12, 14]) // 2) * voxel
    np.testing.assert_allclose(box_centre_from_map_A(path), expected, atol=1e-5)


def test_real_map_agrees_with_project_reader(data_dir):
    data, voxel_A, origin_A = read_mrc(data_dir / "EMD-3197.map")
    expected = np.array(origin_A) + (np.array(data.shape[::-1]) // 2) * voxel_A
    np.testing.assert_allclose(box_centre_from_map_A(data_dir / "EMD-3197.map"), expected, rtol=1e-6)


@pytest.fixture(scope="module")
def adk(data_dir):
    path = data_dir / "pdb1ake.pdb"
    return path, read_structure(path).coords_A[0]


def test_box_centre_is_subtracted(adk):
    path, coords = adk
    centre = coords.mean(axis=0) + [3.0, -2.0, 1.0]
    placed = place_structure_A(coords, structure_path=path, box_size_A=128.0, box_centre_A=centre)
    np.testing.assert_allclose(placed, coords - centre)


def test_centroid_centring_and_ensembles(adk):
    path, coords = adk
    ensemble = np.stack([coords, coords + [4.0, 0.0, 0.0]])
    placed = place_structure_A(ensemble, structure_path=path, box_size_A=128.0, centre_on_centroid=True)
    np.testing.assert_allclose(placed.reshape(-1, 3).mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(placed[1] - placed[0], 4.0 * np.eye(3)[[0]].repeat(len(coords), 0), atol=1e-9)


def test_already_centred_structure_is_kept(adk):
    path, coords = adk
    centred = coords - coords.mean(axis=0) + [5.0, 0.0, 0.0]
    placed = place_structure_A(centred, structure_path=path, box_size_A=128.0)
    np.testing.assert_array_equal(placed, centred)


def test_off_centre_structure_without_placement_is_an_error(data_dir):
    path = data_dir / "mmcif_1ake_chimerax.cif"  # crystal frame: centroid about 38 A from the origin
    coords = read_structure(path).coords_A[0]
    with pytest.raises(CryoflexInputError) as err:
        place_structure_A(coords, structure_path=path, box_size_A=128.0)
    message = str(err.value)
    distance = np.linalg.norm(coords.mean(axis=0))
    assert distance > 30.0
    assert path.name in message and f"{distance:.1f} A" in message and "128 A box" in message
    for flag in ("--consensus-map", "--box-centre-A", "--centre-structure"):
        assert flag in message


def test_atoms_outside_box_are_an_error(adk):
    path, coords = adk
    centred = coords - coords.mean(axis=0)
    extent = np.abs(centred).max(axis=0)
    box_size_A = 2 * extent.max() - 1.0
    n_outside = int(np.sum(np.any(np.abs(centred) > box_size_A / 2, axis=1)))
    assert n_outside >= 1
    with pytest.raises(CryoflexInputError) as err:
        place_structure_A(coords, structure_path=path, box_size_A=box_size_A, centre_on_centroid=True)
    message = str(err.value)
    assert "pdb1ake.pdb" in message and f"{n_outside} of 214 C-alpha" in message and "larger box" in message


def test_both_placements_at_once_is_rejected(adk):
    path, coords = adk
    with pytest.raises(ValueError, match="not both"):
        place_structure_A(
            coords, structure_path=path, box_size_A=128.0, box_centre_A=np.zeros(3), centre_on_centroid=True
        )


def test_unreadable_map_names_the_file(tmp_path):
    path = tmp_path / "broken.mrc"
    path.write_bytes(b"not a map")
    with pytest.raises(CryoflexInputError, match="broken.mrc"):
        box_centre_from_map_A(path)


def test_map_extent_is_counts_times_voxel(tmp_path):
    path = tmp_path / "extent.mrc"
    _hand_made_map(path, (0.0, 0.0, 0.0), (0, 0, 0), shape_zyx=(28, 24, 20), voxel_A=2.0)
    np.testing.assert_allclose(map_extent_A(path), [40.0, 48.0, 56.0], atol=1e-5)


def _config_with_map(data_dir, map_path):
    return TrainConfig(particles="unused.star", structure=str(data_dir / "pdb1ake.pdb"), consensus_map=str(map_path))


def test_a_map_of_another_box_is_named_when_placement_fails(adk, data_dir, tmp_path, caplog):
    """A consensus map whose grid does not span the particles' box: the error blames the map, not the structure, and
    says so once (no warning before it); where the placement succeeds, a warning says the same."""
    _, coords = adk
    centre = coords.mean(axis=0)
    small = tmp_path / "small_box.mrc"  # 40 voxels of 2 A, centred 50 A off the structure: 80 A, not 128 A
    _hand_made_map(small, tuple(centre + 50.0 - 40.0), (0, 0, 0), shape_zyx=(40, 40, 40), voxel_A=2.0)
    with pytest.raises(CryoflexInputError) as error, caplog.at_level(logging.WARNING, "cryoflex.train.setup"):
        placed_structure(_config_with_map(data_dir, small), box_size_A=128.0)
    assert error.value.path == str(small) and error.value.field == "--consensus-map"
    assert "spans 80.0 x 80.0 x 80.0 A but the particles' box 128.0 A" in str(error.value)
    assert "outside the 128 A box" in str(error.value)
    assert "spans" not in caplog.text
    centred = tmp_path / "centred_small_box.mrc"  # the same grid with its centre voxel on the structure: placed
    _hand_made_map(centred, tuple(centre - 40.0), (0, 0, 0), shape_zyx=(40, 40, 40), voxel_A=2.0)
    with caplog.at_level(logging.WARNING, "cryoflex.train.setup"):
        placed_structure(_config_with_map(data_dir, centred), box_size_A=128.0)
    assert "spans 80.0 x 80.0 x 80.0 A, the particles' box 128.0 A" in caplog.text


def test_a_map_of_the_particles_box_places_quietly(adk, data_dir, tmp_path, caplog):
    _, coords = adk
    centre = coords.mean(axis=0)
    fitted = tmp_path / "fitted.mrc"  # 64 voxels of 2 A = the 128 A box, centre voxel at the structure's centroid
    _hand_made_map(fitted, tuple(centre - 64.0), (0, 0, 0), shape_zyx=(64, 64, 64), voxel_A=2.0)
    with caplog.at_level(logging.WARNING, "cryoflex.train.setup"):
        structure = placed_structure(_config_with_map(data_dir, fitted), box_size_A=128.0)
    np.testing.assert_allclose(structure.coords_A[0], coords - centre, atol=1e-4)
    assert "spans" not in caplog.text
