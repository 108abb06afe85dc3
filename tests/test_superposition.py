"""The one Kabsch superposition (roma's), as simulate's centring and the superposed RMSD use it."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from cryoflex.analysis.metrics import rmsd_A, superposed_rmsd_A
from cryoflex.geometry.superposition import superpose_A
from cryoflex.io.structure import Structure
from cryoflex.simulate import centre_ensemble


def _best_proper_rmsd_A(mobile: np.ndarray, target: np.ndarray) -> float:
    """My own Kabsch for the check: SVD of the covariance, with the determinant sign fixed to +1."""
    p, t = mobile - mobile.mean(0), target - target.mean(0)
    u, _, vt = np.linalg.svd(p.T @ t)
    rotation = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    return float(np.sqrt(np.square(p @ rotation - t).sum(1).mean()))


def test_recovers_a_rigid_motion_exactly() -> None:
    rng = np.random.default_rng(0)
    mobile = rng.normal(size=(4, 30, 3)) * 10
    rotations = Rotation.random(4, random_state=1).as_matrix()
    target = np.einsum("kij,knj->kni", rotations, mobile) + rng.normal(size=(4, 1, 3)) * 20
    np.testing.assert_allclose(superpose_A(mobile, target), target, atol=1e-10)
    np.testing.assert_allclose(superposed_rmsd_A(mobile, target), 0.0, atol=1e-10)


def test_a_mirror_image_is_not_reflected_back() -> None:
    rng = np.random.default_rng(2)
    chiral = rng.normal(size=(25, 3)) * 8
    mirrored = chiral * np.array([1.0, 1.0, -1.0])
    fitted = superpose_A(mirrored, chiral)
    expected = _best_proper_rmsd_A(mirrored, chiral)
    assert expected > 1.0
    np.testing.assert_allclose(rmsd_A(fitted[None], chiral[None]), [expected], rtol=1e-10)
    np.testing.assert_allclose(superposed_rmsd_A(mirrored[None], chiral[None]), [expected], rtol=1e-10)


def test_simulate_centres_every_model_on_the_nominal_frame() -> None:
    rng = np.random.default_rng(3)
    nominal = rng.normal(size=(20, 3)) * 6
    moved = Rotation.random(random_state=4).as_matrix() @ (nominal + rng.normal(size=(20, 3)) * 0.5).T
    coords = np.stack([moved.T + 30.0, nominal + 5.0])
    ensemble = Structure(
        coords_A=coords, chain_ids=["A"] * 20, residue_numbers=np.arange(1, 21), insertion_codes=[""] * 20,
        residue_names=["ALA"] * 20, atom_names=["CA"] * 20, amplitudes_e=np.ones(20),
    )  # fmt: skip
    centred = centre_ensemble(ensemble, nominal_frame=1).coords_A
    np.testing.assert_allclose(centred.mean(1), 0.0, atol=1e-10)
    np.testing.assert_allclose(centred[1], nominal - nominal.mean(0), atol=1e-10)
    expected = _best_proper_rmsd_A(coords[0], coords[1])
    np.testing.assert_allclose(rmsd_A(centred[:1], centred[1:]), [expected], rtol=1e-10)
