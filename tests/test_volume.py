"""Gaussian volumes: analytic voxel values, agreement with the projector, MRC placement on the model."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import torch

from cryoflex.imaging import volume as volume_module
from cryoflex.imaging.projector import project_gaussians
from cryoflex.imaging.volume import gaussian_volume, volume_origin_A, write_volume_mrc
from cryoflex.io.maps import read_mrc


def _analytic(
    coords_A: np.ndarray, amplitudes: np.ndarray, box: int, voxel_A: float, sigma_A: float
) -> np.ndarray:
    """Direct sum over residues at every voxel centre, [z, y, x]."""
    grid = (np.arange(box) - box // 2) * voxel_A
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    r = np.stack([x, y, z], axis=-1)[..., None, :] - coords_A
    return (amplitudes * np.exp(-(r**2).sum(-1) / (2 * sigma_A**2))).sum(-1)


@pytest.mark.parametrize("box", [12, 13])
def test_voxels_equal_analytic_gaussian_sum(box: int) -> None:
    rng = np.random.default_rng(0)
    coords = rng.uniform(-6, 6, size=(5, 3))
    amplitudes = rng.uniform(0.5, 2, size=5)
    expected = _analytic(coords, amplitudes, box, 1.3, 2.0)
    result = gaussian_volume(coords, amplitudes, box, 1.3, sigma_A=2.0)
    assert isinstance(result, np.ndarray) and result.shape == (box, box, box)
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-14)
    tensor = gaussian_volume(torch.as_tensor(coords), torch.as_tensor(amplitudes), box, 1.3, sigma_A=2.0)
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_allclose(tensor.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_axis_order_is_z_y_x() -> None:
    single = gaussian_volume(np.array([[3.0, -2.0, 5.0]]), np.ones(1), 16, 1.0, sigma_A=1.0)
    assert np.unravel_index(single.argmax(), single.shape) == (8 + 5, 8 - 2, 8 + 3)


def test_slabs_give_the_same_map(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    coords, amplitudes = rng.uniform(-5, 5, size=(6, 3)), rng.uniform(0.5, 2, size=6)
    whole = gaussian_volume(coords, amplitudes, 15, 1.0)
    monkeypatch.setattr(volume_module, "_SLAB_ELEMENTS", 6 * 15 * 4)
    np.testing.assert_allclose(gaussian_volume(coords, amplitudes, 15, 1.0), whole, rtol=1e-13, atol=0)


def test_z_sum_matches_projector_with_identity_rotation() -> None:
    rng = np.random.default_rng(2)
    coords, amplitudes = rng.uniform(-7, 7, size=(9, 3)), rng.uniform(0.5, 2, size=9)
    box, voxel = 40, 1.0
    density = gaussian_volume(coords, amplitudes, box, voxel, sigma_A=2.0)
    image = project_gaussians(
        torch.as_tensor(coords),
        torch.as_tensor(amplitudes),
        torch.eye(3, dtype=torch.float64)[None],
        box_size_px=box,
        pixel_size_A=voxel,
        sigma_A=2.0,
    )[0].numpy()
    np.testing.assert_allclose(density.sum(axis=0) * voxel, image, rtol=0, atol=1e-8 * image.max())


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="coords_A"):
        gaussian_volume(np.zeros((4, 2)), np.ones(4), 8, 1.0)
    with pytest.raises(ValueError, match="amplitudes"):
        gaussian_volume(np.zeros((4, 3)), np.ones(3), 8, 1.0)
    with pytest.raises(ValueError, match="cubic"):
        write_volume_mrc("unused.mrc", np.zeros((4, 4, 5)), 1.0)


@pytest.mark.parametrize("box", [20, 21])
def test_mrc_has_voxel_size_and_origin_that_put_the_map_on_the_model(tmp_path, box: int) -> None:
    voxel = 1.5
    atom = np.array([[3.0, -4.5, 6.0]])
    density = gaussian_volume(atom, np.ones(1), box, voxel, sigma_A=1.5)
    path = tmp_path / "map.mrc"
    write_volume_mrc(path, torch.as_tensor(density), voxel)
    with mrcfile.open(path) as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(voxel)
        origin = np.array([mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z], dtype=np.float64)
        starts = (int(mrc.header.nxstart), int(mrc.header.nystart), int(mrc.header.nzstart))
        data = np.array(mrc.data)
    np.testing.assert_allclose(origin, [-(box // 2) * voxel] * 3)
    assert volume_origin_A(box, voxel) == pytest.approx(tuple(origin))
    assert starts == (0, 0, 0)
    np.testing.assert_allclose(data, density, rtol=1e-6, atol=1e-7)
    k, i, j = np.unravel_index(data.argmax(), data.shape)
    np.testing.assert_allclose(origin + voxel * np.array([j, i, k]), atom[0])
    _, read_voxel, read_origin = read_mrc(path)
    assert read_voxel == pytest.approx(voxel) and read_origin == pytest.approx(tuple(origin))
