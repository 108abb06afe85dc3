"""Direct Fourier inversion (imaging/backprojection.py): simulated images of known structures reconstruct them.

Images are rendered with ImageFormation (the project's one image model) and compared with gaussian_volume of the
same pseudo-atoms on the same grid. The correlations quoted in comments are the values measured when the tests were
written (32 px at 4 A/px, Gaussian width 4 A); the thresholds leave a margin below them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoflex.analysis.fsc import fourier_shell_correlation
from cryoflex.geometry.rotations import uniform_random_rotations
from cryoflex.imaging.backprojection import FourierAccumulator, lowpass, wiener_from_fsc
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.imaging.volume import gaussian_volume
from cryoflex.io.structure import read_structure

BOX_PX = 32
PIXEL_A = 4.0
SIGMA_A = 4.0  # one pixel: the images and maps hold almost nothing beyond Nyquist (exp(-2 pi^2) at 1 / (2 a))
BATCH = 64


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps (or of two sets of voxels)."""
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _within_nyquist(volume: torch.Tensor) -> torch.Tensor:
    """The map without its Fourier corners beyond Nyquist (which a reconstruction never fills)."""
    return lowpass(volume, PIXEL_A, 2.0 * PIXEL_A)


def _accumulate(
    images: torch.Tensor, poses: PoseBatch, ctf: CTFBatch | None = None, *, padding: int = 2, box_px: int = BOX_PX
) -> FourierAccumulator:
    """All images inserted, BATCH at a time."""
    accumulator = FourierAccumulator(box_px, PIXEL_A, padding=padding)
    for start in range(0, len(images), BATCH):
        rows = slice(start, start + BATCH)
        accumulator.insert(images[rows], poses[rows], None if ctf is None else ctf[rows])
    assert accumulator.n_images == len(images)
    return accumulator


def _random_poses(n: int, seed: int, max_shift_A: float) -> PoseBatch:
    """Haar-uniform rotations and origins uniform in [-max_shift_A, max_shift_A]^2."""
    rng = np.random.default_rng(seed)
    rotations = torch.tensor(uniform_random_rotations(n, rng), dtype=torch.float32)
    shifts = torch.tensor(rng.uniform(-max_shift_A, max_shift_A, size=(n, 2)), dtype=torch.float32)
    return PoseBatch(rotations, shifts)


def _render(coords: torch.Tensor, amplitudes: torch.Tensor, poses: PoseBatch, ctf=None, box_px: int = BOX_PX):
    return ImageFormation(box_px, PIXEL_A, SIGMA_A).images(coords, amplitudes, poses, ctf)


def _truth(coords: torch.Tensor, amplitudes: torch.Tensor, box_px: int = BOX_PX) -> torch.Tensor:
    return gaussian_volume(coords.double(), amplitudes.double(), box_px, PIXEL_A, SIGMA_A).float()


@pytest.fixture(scope="module")
def adk(data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """AdK's 214 C-alpha pseudo-atoms, centred, amplitudes of mean 1."""
    structure = read_structure(data_dir / "adk_closed.pdb")
    coords = structure.coords_A[0] - structure.coords_A[0].mean(axis=0)
    amplitudes = structure.amplitudes_e / structure.amplitudes_e.mean()
    return torch.tensor(coords, dtype=torch.float32), torch.tensor(amplitudes, dtype=torch.float32)


@pytest.fixture(scope="module")
def adk_images(adk) -> tuple[torch.Tensor, PoseBatch]:
    """1,000 noise-free images of AdK at random orientations and origins (up to 6 A), no CTF."""
    poses = _random_poses(1000, seed=0, max_shift_A=6.0)
    return _render(*adk, poses), poses


def test_noise_free_images_reconstruct_the_structure(adk, adk_images) -> None:
    """Noise-free images give the analytic map (correlation >= 0.99) in gaussian_volume's units, with either padding."""
    images, poses = adk_images
    truth = _within_nyquist(_truth(*adk))
    for padding, expected in ((2, 0.9999), (1, 0.997)):  # measured 0.99999 and 0.9979
        reconstruction = _within_nyquist(_accumulate(images, poses, padding=padding).volume())
        assert _correlation(reconstruction, truth) >= expected
        scale = float((reconstruction * truth).sum() / truth.square().sum())
        assert scale == pytest.approx(1.0, abs=0.05)  # measured 1.010 (padding 2) and 1.040 (padding 1)


def test_odd_box_reconstructs_the_structure(adk) -> None:
    """An odd box (centre pixel D//2, odd padded grid) works as well as an even one."""
    box_px = 25
    poses = _random_poses(600, seed=1, max_shift_A=4.0)
    images = _render(*adk, poses, box_px=box_px)
    reconstruction = lowpass(_accumulate(images, poses, box_px=box_px).volume(), PIXEL_A, 2.0 * PIXEL_A)
    truth = lowpass(_truth(*adk, box_px=box_px), PIXEL_A, 2.0 * PIXEL_A)
    assert _correlation(reconstruction, truth) >= 0.999  # measured 0.99996


def test_ctf_images_reconstruct_the_ctf_free_map_and_a_flipped_ctf_does_not(adk, adk_images) -> None:
    """Strong, varied, astigmatic defocus (1-3 um) gives the CTF-free map; the wrong CTF sign gives its negative."""
    _, poses = adk_images
    rng = np.random.default_rng(2)
    n = len(poses)
    defocus_u_A = rng.uniform(10_000.0, 30_000.0, n)
    defocus_v_A = defocus_u_A - rng.uniform(0.0, 3_000.0, n)
    angle_deg = rng.uniform(0.0, 180.0, n)
    ctf = CTFBatch.from_values(defocus_u_A, defocus_v_A, angle_deg, 300.0, 2.7, 0.1, dtype=torch.float32)
    images = _render(*adk, poses, ctf)
    truth = _within_nyquist(_truth(*adk))
    ctf_free = _within_nyquist(_accumulate(adk_images[0], poses).volume())
    with_ctf = _within_nyquist(_accumulate(images, poses, ctf).volume())
    assert _correlation(with_ctf, ctf_free) >= 0.999  # measured 0.99991
    assert _correlation(with_ctf, truth) >= 0.999  # measured 0.99995
    flipped = CTFBatch.from_values(
        defocus_u_A, defocus_v_A, angle_deg, 300.0, 2.7, 0.1, scale=-1.0, dtype=torch.float32
    )
    wrong_sign = _within_nyquist(_accumulate(images, poses, flipped).volume())
    assert _correlation(wrong_sign, truth) <= -0.99  # inverted contrast: measured -0.99995


@pytest.fixture(scope="module")
def noisy_halves(adk) -> tuple[FourierAccumulator, FourierAccumulator, torch.Tensor]:
    """2,000 images with white Gaussian noise at SNR 0.05 (signal variance / noise variance), split in two halves."""
    poses = _random_poses(2000, seed=3, max_shift_A=6.0)
    images = _render(*adk, poses)
    noise_sd = float(images.var(dim=(1, 2)).mean().sqrt()) / 0.05**0.5
    noisy = images + noise_sd * torch.randn(images.shape, generator=torch.Generator().manual_seed(4))
    half_a = _accumulate(noisy[0::2], poses[0::2])
    half_b = _accumulate(noisy[1::2], poses[1::2])
    return half_a, half_b, _truth(*adk)


def test_half_map_fsc_predicts_the_fsc_against_the_truth(noisy_halves) -> None:
    """FSC(full map, truth) = sqrt(2 FSC_half / (1 + FSC_half)) within 0.03 where 0.2 <= FSC_half <= 0.9."""
    half_a, half_b, truth = noisy_halves
    full = FourierAccumulator(BOX_PX, PIXEL_A)
    full.add(half_a)
    full.add(half_b)
    _, fsc_half = fourier_shell_correlation(half_a.volume().numpy(), half_b.volume().numpy(), PIXEL_A)
    _, fsc_truth = fourier_shell_correlation(full.volume().numpy(), truth.numpy(), PIXEL_A)
    shells = (fsc_half >= 0.2) & (fsc_half <= 0.9)
    assert shells.sum() >= 4  # shells 4-7 (FSC_half 0.85, 0.69, 0.58, 0.29)
    predicted = np.sqrt(2.0 * fsc_half[shells] / (1.0 + fsc_half[shells]))
    np.testing.assert_allclose(fsc_truth[shells], predicted, atol=0.03)  # measured at most 0.012 apart


def test_wiener_filter_from_fsc_brings_the_map_closer_to_the_truth(noisy_halves) -> None:
    """The per-shell Wiener regularisation from the half-map FSC beats a nearly unregularised division."""
    half_a, half_b, truth = noisy_halves
    _, fsc_half = fourier_shell_correlation(half_a.volume().numpy(), half_b.volume().numpy(), PIXEL_A)
    full = FourierAccumulator(BOX_PX, PIXEL_A)
    full.add(half_a)
    full.add(half_b)
    plain = _correlation(full.volume(), truth)
    filtered = _correlation(full.volume(wiener_from_fsc(fsc_half)), truth)
    assert filtered > plain + 0.1  # measured 0.973 against 0.649
    np.testing.assert_allclose(
        wiener_from_fsc(np.array([1.0 / 3.0, 0.0, 1.0])).numpy(), [1.0, 499.5, 0.0005005], rtol=1e-4
    )


def test_off_centre_gaussian_reconstructs_at_its_voxel() -> None:
    """A Gaussian at (10.4, -6.8, 17.2) A peaks at gaussian_volume's voxel [z, y, x] and at its sub-voxel centre."""
    centre = torch.tensor([[10.4, -6.8, 17.2]])
    amplitudes = torch.ones(1)
    poses = _random_poses(500, seed=5, max_shift_A=6.0)
    reconstruction = _accumulate(_render(centre, amplitudes, poses), poses).volume()
    truth = _truth(centre, amplitudes)
    peak = np.unravel_index(int(reconstruction.argmax()), reconstruction.shape)
    assert peak == np.unravel_index(int(truth.argmax()), truth.shape) == (20, 14, 19)
    window = tuple(slice(p - 2, p + 3) for p in peak)
    local = reconstruction[window].clamp_min(0.0)
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    centroid = [float((local.sum(dim=other) * offsets).sum() / local.sum()) for other in ((1, 2), (0, 2), (0, 1))]
    expected = [17.2 / PIXEL_A - 4, -6.8 / PIXEL_A + 2, 10.4 / PIXEL_A - 3]  # z, y, x from the peak voxel
    np.testing.assert_allclose(centroid, expected, atol=0.1)  # measured 0.034 voxel at most


def test_rotations_are_inserted_as_x_prime_equals_r_x() -> None:
    """A chiral cluster reconstructs with its poses R; the same images inserted with R^T do not."""
    coords = torch.tensor(
        [[20.0, 0.0, 0.0], [0.0, 12.0, 0.0], [0.0, 0.0, 6.0], [-8.0, -10.0, 14.0], [5.0, -15.0, -9.0]]
    )
    amplitudes = torch.tensor([1.0, 2.0, 3.0, 1.5, 2.5])
    poses = _random_poses(600, seed=6, max_shift_A=4.0)
    images = _render(coords, amplitudes, poses)
    truth = _truth(coords, amplitudes)
    assert _correlation(_accumulate(images, poses).volume(), truth) >= 0.999  # measured 0.99993
    transposed = PoseBatch(poses.rotations.transpose(1, 2).contiguous(), poses.shifts_A)
    assert _correlation(_accumulate(images, transposed).volume(), truth) < 0.85  # measured 0.66


def test_origins_are_undone(adk) -> None:
    """Images with RELION origins (up to 12 A) give the map of unshifted images; the origins' opposite sign does not."""
    poses = _random_poses(600, seed=9, max_shift_A=12.0)
    centred_poses = PoseBatch(poses.rotations, torch.zeros_like(poses.shifts_A))
    centred = _accumulate(_render(*adk, centred_poses), centred_poses).volume()
    shifted_images = _render(*adk, poses)
    assert _correlation(_accumulate(shifted_images, poses).volume(), centred) >= 0.9999  # measured 0.999996
    opposite = PoseBatch(poses.rotations, -poses.shifts_A)
    assert _correlation(_accumulate(shifted_images, opposite).volume(), centred) < 0.8  # measured 0.71


def test_add_equals_inserting_everything_into_one(adk_images) -> None:
    """Two accumulators summed with add() hold what one accumulator of all images holds."""
    images, poses = adk_images
    one = _accumulate(images[:256], poses[:256])
    first, second = _accumulate(images[:100], poses[:100]), _accumulate(images[100:256], poses[100:256])
    first.add(second)
    assert first.n_images == 256
    torch.testing.assert_close(first.volume(), one.volume(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="padding"):
        first.add(FourierAccumulator(BOX_PX, PIXEL_A, padding=1))


def test_padding_two_is_closer_to_the_truth_near_the_box_edge() -> None:
    """300 pseudo-atoms filling the box: outside radius 0.3 D, padding 2 gives 0.981 with the truth, padding 1 0.753."""
    rng = np.random.default_rng(7)
    coords = torch.tensor(rng.uniform(-0.42, 0.42, size=(300, 3)) * BOX_PX * PIXEL_A, dtype=torch.float32)
    amplitudes = torch.ones(300)
    poses = _random_poses(1000, seed=8, max_shift_A=0.0)
    images = _render(coords, amplitudes, poses)
    truth = _within_nyquist(_truth(coords, amplitudes))
    offsets = torch.arange(BOX_PX, dtype=torch.float32) - BOX_PX // 2
    radius = torch.sqrt(offsets[:, None, None] ** 2 + offsets[None, :, None] ** 2 + offsets[None, None, :] ** 2)
    edge = radius > 0.3 * BOX_PX
    edge_correlation = {}
    for padding in (1, 2):
        reconstruction = _within_nyquist(_accumulate(images, poses, padding=padding).volume())
        edge_correlation[padding] = _correlation(reconstruction[edge], truth[edge])
    assert edge_correlation[2] >= 0.97
    assert edge_correlation[2] > edge_correlation[1] + 0.1


def test_lowpass_gain_is_one_half_at_the_cutoff() -> None:
    """lowpass keeps shells below the soft edge, halves the cutoff shell and removes those above."""
    box_px = 16
    spectrum = torch.zeros(box_px, box_px, box_px // 2 + 1, dtype=torch.complex64)
    for shell in (2, 4, 6):
        spectrum[0, 0, shell] = 1.0
    volume = torch.fft.irfftn(spectrum, s=(box_px,) * 3)
    filtered = torch.fft.rfftn(lowpass(volume, 2.0, box_px * 2.0 / 4))  # cutoff at shell 4
    torch.testing.assert_close(filtered[0, 0, [2, 4, 6]].real, torch.tensor([1.0, 0.5, 0.0]), atol=1e-5, rtol=0)


def test_bad_arguments_are_refused() -> None:
    accumulator = FourierAccumulator(8, 1.0)
    poses = PoseBatch(torch.eye(3).expand(2, 3, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="shape"):
        accumulator.insert(torch.zeros(2, 9, 9), poses, None)
    with pytest.raises(ValueError, match="poses"):
        accumulator.insert(torch.zeros(3, 8, 8), poses, None)
    with pytest.raises(ValueError, match="wiener"):
        accumulator.volume(torch.ones(3))
    with pytest.raises(ValueError, match="padding"):
        FourierAccumulator(8, 1.0, padding=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpu_map(adk_images) -> None:
    images, poses = adk_images
    cpu = _accumulate(images[:128], poses[:128]).volume()
    accumulator = FourierAccumulator(BOX_PX, PIXEL_A, device="cuda")
    accumulator.insert(images[:128].cuda(), poses[:128].to("cuda"), None)
    torch.testing.assert_close(accumulator.volume().cpu(), cpu, rtol=1e-3, atol=1e-4)
