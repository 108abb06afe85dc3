"""Gaussian projector: brute-force integrals, cisTEM angle convention, RELION origin sign, CTF, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoflex.geometry.rotations import relion_euler_to_matrix, uniform_random_rotations
from cryoflex.imaging.batches import PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.imaging.projector import (
    fourier_shift_images,
    pixel_coordinates_A,
    project_gaussians,
)

F64 = torch.float64


def _poses(rotations: torch.Tensor, shifts_A: torch.Tensor | None = None) -> PoseBatch:
    """Poses with these rotations and shifts (default: none)."""
    if shifts_A is None:
        shifts_A = torch.zeros(len(rotations), 2, dtype=rotations.dtype)
    return PoseBatch(rotations, shifts_A)


def _molecule(rng: np.random.Generator, n: int, spread_A: float) -> tuple[torch.Tensor, torch.Tensor]:
    """n random residues within +-spread_A of the origin, amplitudes in [0.5, 2]."""
    coords = torch.as_tensor(rng.uniform(-spread_A, spread_A, size=(n, 3)), dtype=F64)
    amplitudes = torch.as_tensor(rng.uniform(0.5, 2.0, size=n), dtype=F64)
    return coords, amplitudes


def _brute_force_projection(
    coords_A: np.ndarray, amplitudes: np.ndarray, box_size_px: int, pixel_size_A: float, sigma_A: float
) -> np.ndarray:
    """3-D density on pixel centres x a fine z grid, summed along z times dz; (N, N) indexed [y, x]."""
    grid = (np.arange(box_size_px) - box_size_px // 2) * pixel_size_A
    dz_A = 0.05
    z = np.arange(-30.0, 30.0, dz_A)
    dx = grid[None, None, :, None] - coords_A[:, 0]
    dy = grid[None, :, None, None] - coords_A[:, 1]
    dz = z[:, None, None, None] - coords_A[:, 2]
    density = (amplitudes * np.exp(-(dx**2 + dy**2 + dz**2) / (2 * sigma_A**2))).sum(-1)
    return density.sum(0) * dz_A


def test_matches_brute_force_z_integral_after_rotation() -> None:
    rng = np.random.default_rng(0)
    coords, amplitudes = _molecule(rng, 7, 8.0)
    rotation = torch.as_tensor(uniform_random_rotations(1, rng), dtype=F64)
    box, apix, sigma = 32, 1.3, 2.0
    image = project_gaussians(
        coords, amplitudes, rotation, box_size_px=box, pixel_size_A=apix, sigma_A=sigma
    )[0]
    rotated = (coords @ rotation[0].T).numpy()
    expected = _brute_force_projection(rotated, amplitudes.numpy(), box, apix, sigma)
    relative = np.abs(image.numpy() - expected).max() / np.abs(expected).max()
    assert relative < 1e-4
    assert image.shape == (box, box)


def test_total_integral_is_sum_of_gaussian_masses() -> None:
    rng = np.random.default_rng(1)
    coords, amplitudes = _molecule(rng, 12, 10.0)
    rotations = torch.as_tensor(uniform_random_rotations(3, rng), dtype=F64)
    box, apix, sigma = 48, 1.5, 2.0
    images = project_gaussians(
        coords, amplitudes, rotations, box_size_px=box, pixel_size_A=apix, sigma_A=sigma
    )
    mass = amplitudes.sum() * (2 * math.pi) ** 1.5 * sigma**3
    torch.testing.assert_close(images.sum(dim=(1, 2)) * apix**2, mass.expand(3), rtol=1e-9, atol=0)


@pytest.mark.parametrize("box", [16, 17])
def test_axes_row_is_y_column_is_x_and_rotation_is_applied(box: int) -> None:
    coords = torch.tensor([[4.0, 0.0, 0.0]], dtype=F64)
    amplitudes = torch.ones(1, dtype=F64)
    quarter_turn_z = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=F64)
    rotations = torch.cat([torch.eye(3, dtype=F64)[None], quarter_turn_z])
    images = project_gaussians(coords, amplitudes, rotations, box_size_px=box, pixel_size_A=1.0, sigma_A=1.0)
    peaks = [divmod(int(image.argmax()), box) for image in images]
    assert peaks == [(box // 2, box // 2 + 4), (box // 2 + 4, box // 2)]


def test_batched_coordinates_and_amplitudes_match_per_image_calls() -> None:
    rng = np.random.default_rng(2)
    coords = torch.as_tensor(rng.uniform(-6, 6, size=(3, 5, 3)), dtype=F64)
    amplitudes = torch.as_tensor(rng.uniform(0.5, 2, size=(3, 5)), dtype=F64)
    rotations = torch.as_tensor(uniform_random_rotations(3, rng), dtype=F64)
    options = {"box_size_px": 20, "pixel_size_A": 1.2, "sigma_A": 2.0}
    batched = project_gaussians(coords, amplitudes, rotations, **options)
    singles = [
        project_gaussians(coords[b], amplitudes[b], rotations[b : b + 1], **options)[0] for b in range(3)
    ]
    torch.testing.assert_close(batched, torch.stack(singles), rtol=1e-12, atol=1e-12)


def test_class_matches_function_and_float32_is_accurate() -> None:
    rng = np.random.default_rng(3)
    coords, amplitudes = _molecule(rng, 9, 7.0)
    rotations = torch.as_tensor(uniform_random_rotations(4, rng), dtype=F64)
    shifts = torch.as_tensor(rng.uniform(-3, 3, size=(4, 2)), dtype=F64)
    formation = ImageFormation(24, 1.4, sigma_A=2.5)
    expected = project_gaussians(
        coords, amplitudes, rotations, box_size_px=24, pixel_size_A=1.4, sigma_A=2.5, shifts_A=shifts
    )
    torch.testing.assert_close(formation.images(coords, amplitudes, _poses(rotations, shifts), None), expected)
    single = formation.images(coords.float(), amplitudes.float(), _poses(rotations.float(), shifts.float()), None)
    assert single.dtype == torch.float32
    assert (single.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    assert formation.pixel_grid_A(torch.device("cpu"), torch.float32).dtype == torch.float32


def test_rejects_bad_shapes() -> None:
    rotations = torch.eye(3, dtype=F64)[None]
    with pytest.raises(ValueError, match="amplitudes"):
        project_gaussians(
            torch.zeros(4, 3, dtype=F64), torch.ones(3, dtype=F64), rotations, box_size_px=8, pixel_size_A=1.0
        )
    with pytest.raises(ValueError, match="rotations"):
        project_gaussians(
            torch.zeros(4, 3, dtype=F64),
            torch.ones(4, dtype=F64),
            torch.eye(3, dtype=F64),
            box_size_px=8,
            pixel_size_A=1.0,
        )


# --- angle convention against cisTEM --------------------------------------------------------------


def _lowpass(images: np.ndarray, cutoff_cycles_per_px: float) -> np.ndarray:
    """Zero all Fourier components above cutoff_cycles_per_px (radially)."""
    size = images.shape[-1]
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
    return np.fft.ifft2(np.fft.fft2(images) * (k <= cutoff_cycles_per_px)).real


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of images (B, N, N) -> (B,)."""
    a = a - a.mean(axis=(1, 2), keepdims=True)
    b = b - b.mean(axis=(1, 2), keepdims=True)
    return (a * b).sum(axis=(1, 2)) / np.sqrt((a * a).sum(axis=(1, 2)) * (b * b).sum(axis=(1, 2)))


def test_euler_convention_matches_cistem_projections(data_dir) -> None:
    """cryojax 0.6.0's frozen cisTEM slices of a 64^3 map (volume[z, y, x], 1 A voxels, DC zeroed).

    Every voxel above 1e-4 of the maximum becomes a pseudo-atom (sigma = half a voxel) at its voxel centre;
    the convention R = relion_euler_to_matrix(phi, theta, psi) must beat R^T and swapped phi/psi wherever
    those give a different projection. Pearson correlation ignores cisTEM's DC removal and FFT scaling.
    """
    reference = np.load(data_dir / "cistem_projection.npz")
    volume, angles, cistem = (
        reference["volume"],
        reference["angles"],
        reference["projections"].astype(np.float64),
    )
    box, voxel = int(reference["box_size"]), float(reference["voxel_size"])
    k, i, j = np.nonzero(volume > 1e-4 * volume.max())
    coords = torch.as_tensor(np.stack([j, i, k], axis=-1) - box // 2, dtype=F64) * voxel
    amplitudes = torch.as_tensor(volume[k, i, j], dtype=F64)
    formation = ImageFormation(box, voxel, sigma_A=0.5 * voxel)
    phi, theta, psi = angles.T
    conventions = {
        "relion": relion_euler_to_matrix(phi, theta, psi),
        "transposed": relion_euler_to_matrix(phi, theta, psi).transpose(0, 2, 1),
        "phi_psi_swapped": relion_euler_to_matrix(psi, theta, phi),
    }
    correlations, lowpass_correlations = {}, {}
    for name, matrices in conventions.items():
        images = formation.images(coords, amplitudes, _poses(torch.as_tensor(matrices)), None).numpy()
        correlations[name] = _pearson(images, cistem)
        lowpass_correlations[name] = _pearson(_lowpass(images, 0.25), _lowpass(cistem, 0.25))
    assert correlations["relion"].min() > 0.985
    assert lowpass_correlations["relion"].min() > 0.995
    for name in ("transposed", "phi_psi_swapped"):
        # where a wrong convention changes the projection (x', y' rows differ), it must lose clearly
        differs = np.abs(conventions[name][:, :2] - conventions["relion"][:, :2]).max(axis=(1, 2)) > 0.1
        assert differs.sum() >= 6
        margin = correlations["relion"][differs] - correlations[name][differs]
        assert margin.min() > 0.05
        assert (correlations["relion"] >= correlations[name] - 1e-3).all()


# --- RELION origin shifts -------------------------------------------------------------------------


def test_origin_shift_is_undone_by_fourier_shift_by_plus_origin() -> None:
    rng = np.random.default_rng(4)
    coords, amplitudes = _molecule(rng, 10, 6.0)
    rotations = torch.as_tensor(uniform_random_rotations(3, rng), dtype=F64)
    origins = torch.tensor([[3.3, -5.7], [-2.45, 1.1], [6.05, 4.4]], dtype=F64)
    formation = ImageFormation(48, 1.0, sigma_A=2.0)
    centred = formation.images(coords, amplitudes, _poses(rotations), None)
    observed = formation.images(coords, amplitudes, _poses(rotations, origins), None)
    assert (observed - centred).abs().max() > 0.1 * centred.abs().max()
    recentred = fourier_shift_images(observed, origins, 1.0)
    assert (recentred - centred).abs().max() < 1e-6 * centred.abs().max()
    wrong_sign = fourier_shift_images(observed, -origins, 1.0)
    assert (wrong_sign - centred).abs().max() > 0.1 * centred.abs().max()


def _centroid_A(image: torch.Tensor, pixel_size_A: float) -> tuple[float, float]:
    """Intensity centroid (x, y) in A in the image convention (column = x, row = y, centre N//2)."""
    grid = pixel_coordinates_A(image.shape[-1], pixel_size_A, dtype=image.dtype)
    total = image.sum()
    return float((image.sum(0) * grid).sum() / total), float((image.sum(1) * grid).sum() / total)


@pytest.mark.parametrize("box", [40, 41])
def test_gaussian_at_model_origin_appears_at_centre_minus_origin(box: int) -> None:
    apix = 1.25
    origin = torch.tensor([[2.7, -4.15]], dtype=F64)
    image = project_gaussians(
        torch.zeros(1, 3, dtype=F64),
        torch.ones(1, dtype=F64),
        torch.eye(3, dtype=F64)[None],
        box_size_px=box,
        pixel_size_A=apix,
        sigma_A=2.0,
        shifts_A=origin,
    )[0]
    x_A, y_A = _centroid_A(image, apix)
    assert x_A == pytest.approx(-2.7, abs=1e-9) and y_A == pytest.approx(4.15, abs=1e-9)
    row, col = divmod(int(image.argmax()), box)
    assert (row, col) == (box // 2 + round(4.15 / apix), box // 2 - round(2.7 / apix))
    moved = fourier_shift_images(image[None], torch.tensor([[1.0, 2.5]], dtype=F64), apix)[0]
    assert _centroid_A(moved, apix) == pytest.approx((-1.7, 6.65), abs=1e-4)


# --- CTF ------------------------------------------------------------------------------------------


def _even_filter_full(box: int, pixel_size_A: float) -> np.ndarray:
    """A real astigmatic CTF-like transfer function on the full fft2 grid (N, N), even on the discrete grid.

    At the Nyquist column of even N, +k and -k are one sample; averaging H over the grid's own k -> -k makes
    the filter Hermitian-consistent there, so both FFT layouts define the same convolution.
    """
    ky, kx = np.meshgrid(np.fft.fftfreq(box, pixel_size_A), np.fft.fftfreq(box, pixel_size_A), indexing="ij")
    phase = 2000.0 * (1.3 * kx**2 + 0.7 * ky**2 + 0.4 * kx * ky)
    transfer = -np.sin(phase + 0.1) * np.exp(-20.0 * (kx**2 + ky**2))
    negated = (-np.arange(box)) % box
    return 0.5 * (transfer + transfer[negated][:, negated])


@pytest.mark.parametrize("box", [32, 33])
def test_ctf_is_a_convolution_about_the_box_centre(box: int) -> None:
    rng = np.random.default_rng(5)
    coords, amplitudes = _molecule(rng, 8, 8.0)
    rotations = torch.as_tensor(uniform_random_rotations(2, rng), dtype=F64)
    apix = 1.5

    def projector(coords, amplitudes, rotations, ctf=None):
        options = dict(box_size_px=box, pixel_size_A=apix, sigma_A=2.0)
        return project_gaussians(coords, amplitudes, rotations, ctf=ctf, **options)

    clean = projector(coords, amplitudes, rotations)
    ones = torch.ones(2, box, box // 2 + 1, dtype=F64)
    torch.testing.assert_close(projector(coords, amplitudes, rotations, ctf=ones), clean, rtol=0, atol=1e-12)
    full = _even_filter_full(box, apix)
    ctf = torch.as_tensor(full[:, : box // 2 + 1]).expand(2, -1, -1)
    filtered = projector(coords, amplitudes, rotations, ctf=ctf).numpy()
    centred_fft = np.fft.fft2(np.fft.ifftshift(clean.numpy(), axes=(1, 2)))
    expected = np.fft.fftshift(np.fft.ifft2(centred_fft * full), axes=(1, 2)).real
    np.testing.assert_allclose(filtered, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    assert np.abs(filtered - clean.numpy()).max() > 0.1 * np.abs(expected).max()


# --- gradients ------------------------------------------------------------------------------------


def test_gradcheck_coordinates_rotations_shifts_through_ctf() -> None:
    rng = np.random.default_rng(6)
    coords = torch.as_tensor(rng.uniform(-3, 3, size=(3, 3)), dtype=F64).requires_grad_()
    amplitudes = torch.as_tensor(rng.uniform(0.5, 2, size=3), dtype=F64)
    rotations = torch.as_tensor(uniform_random_rotations(2, rng), dtype=F64).requires_grad_()
    shifts = torch.as_tensor(rng.uniform(-1, 1, size=(2, 2)), dtype=F64).requires_grad_()
    ctf = torch.as_tensor(_even_filter_full(8, 1.5)[:, :5]).expand(2, -1, -1)

    def forward(c: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return project_gaussians(
            c, amplitudes, r, box_size_px=8, pixel_size_A=1.5, sigma_A=2.0, shifts_A=s, ctf=ctf
        )

    assert torch.autograd.gradcheck(forward, (coords, rotations, shifts))


def test_gradcheck_amplitudes_and_chunked_projection_matches_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches split into chunks (as on a CPU at large sizes) give the same images and gradients as one chunk, and
    tables rebuilt in the backward pass (large batches) the same as tables kept from the forward (small ones)."""
    import cryoflex.imaging.projector as projector

    rng = np.random.default_rng(7)
    coords = torch.as_tensor(rng.uniform(-4, 4, size=(5, 4, 3)), dtype=F64).requires_grad_()
    amplitudes = torch.as_tensor(rng.uniform(0.5, 2, size=(5, 4)), dtype=F64).requires_grad_()
    rotations = torch.as_tensor(uniform_random_rotations(5, rng), dtype=F64)

    def forward(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return project_gaussians(c, a, rotations, box_size_px=9, pixel_size_A=1.5, sigma_A=2.0)

    probe = torch.as_tensor(rng.normal(size=(5, 9, 9)), dtype=F64)

    def images_and_gradients() -> list[torch.Tensor]:
        images = forward(coords, amplitudes)
        return [images.detach(), *torch.autograd.grad((images * probe).sum(), (coords, amplitudes))]

    whole = images_and_gradients()
    monkeypatch.setattr(projector, "_CPU_CHUNK_ELEMENTS", 2 * 4 * 9)  # two images per chunk: chunks of 2, 2, 1
    assert projector.images_per_chunk(5, 4, 9, torch.device("cpu")) == 2
    for chunked, reference in zip(images_and_gradients(), whole, strict=True):
        torch.testing.assert_close(chunked, reference, rtol=1e-12, atol=1e-12)
    assert projector.keeps_tables(5, 4, 9, torch.device("cpu"), needs_grad=True)
    assert len(forward(coords, amplitudes).grad_fn.saved_tensors) == 4 + 2  # inputs, then the two tables
    assert torch.autograd.gradcheck(forward, (coords, amplitudes))
    monkeypatch.setattr(projector, "_CPU_KEPT_TABLE_ELEMENTS", 0)
    assert not projector.keeps_tables(5, 4, 9, torch.device("cpu"), needs_grad=True)
    assert len(forward(coords, amplitudes).grad_fn.saved_tensors) == 4
    for rebuilt, reference in zip(images_and_gradients(), whole, strict=True):
        torch.testing.assert_close(rebuilt, reference, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(forward, (coords, amplitudes))


def test_accelerator_chunks_are_whole_batches_up_to_a_memory_budget() -> None:
    """On a GPU a chunk is the whole batch while its tables fit 2^28 elements (1 GiB float32) each: 256 images of
    13,941 residues at 128 px (456 million elements) split in two."""
    from cryoflex.imaging import projector

    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    assert projector.images_per_chunk(128, 214, 64, cuda) == 128
    assert projector.images_per_chunk(256, 13941, 128, cuda) == 2**28 // (13941 * 128) == 150
    assert projector.images_per_chunk(4, 10**6, 512, cuda) == 1
    assert not projector.keeps_tables(2, 10, 16, cuda, needs_grad=True)  # rebuilt: cheap beside a read from memory


def test_a_width_tensor_renders_as_the_float_and_its_gradient_is_exact() -> None:
    """A learned width: the images equal those at the same float width, and the gradient in the width (computed by
    hand in the projector's backward) passes gradcheck with the coordinates, through the CTF."""
    rng = np.random.default_rng(8)
    coords = torch.as_tensor(rng.uniform(-4, 4, size=(3, 5, 3)), dtype=F64).requires_grad_()
    amplitudes = torch.as_tensor(rng.uniform(0.5, 2, size=5), dtype=F64)
    rotations = torch.as_tensor(uniform_random_rotations(3, rng), dtype=F64)
    ctf = torch.as_tensor(_even_filter_full(10, 1.5)[:, :6]).expand(3, -1, -1)
    width = torch.tensor(1.7, dtype=F64, requires_grad=True)

    def forward(c: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        return project_gaussians(c, amplitudes, rotations, box_size_px=10, pixel_size_A=1.5, sigma_A=s, ctf=ctf)

    torch.testing.assert_close(forward(coords, width), forward(coords, 1.7), rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(forward, (coords, width))


def test_the_width_that_fits_images_best_is_the_one_they_were_made_with() -> None:
    """Maximum likelihood through the width's gradient: started at 2 A, Adam on the squared residual reaches the
    3 A the images were rendered with."""
    rng = np.random.default_rng(9)
    coords, amplitudes = _molecule(rng, 12, 8.0)
    rotations = torch.as_tensor(uniform_random_rotations(4, rng), dtype=F64)
    formation = ImageFormation(24, 1.5, sigma_A=2.0)
    target = formation.images(coords, amplitudes, _poses(rotations), None, sigma_A=3.0)
    log_width = torch.tensor(math.log(2.0), dtype=F64, requires_grad=True)
    optimizer = torch.optim.Adam([log_width], lr=0.02)
    for _ in range(300):
        optimizer.zero_grad()
        images = formation.images(coords, amplitudes, _poses(rotations), None, sigma_A=log_width.exp())
        (images - target).square().sum().backward()
        optimizer.step()
    assert float(log_width.detach().exp()) == pytest.approx(3.0, abs=1e-3)


def test_tf32_products_set_the_cuda_matmul_precision_only_inside_and_only_when_enabled() -> None:
    """The projections' batched products may run on TF32 tensor cores (on CUDA); everything else keeps its precision."""
    from cryoflex.imaging.projector import tf32_products

    matmul = torch.backends.cuda.matmul  # torch >= 2.9's setting (older versions: allow_tf32, the same way)
    before = matmul.fp32_precision
    with tf32_products(False):
        assert matmul.fp32_precision == before
    with tf32_products(True):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError), tf32_products(True):
        raise RuntimeError("a failed product")
    assert matmul.fp32_precision == before


@pytest.mark.parametrize("band_limited", [False, True])
def test_image_formation_passes_its_tf32_setting_to_the_renderer(monkeypatch: pytest.MonkeyPatch, band_limited) -> None:
    """Training sets ImageFormation.tf32_products (on CUDA); it must reach whichever renderer draws the images, and
    stay off for every other user of the class."""
    from cryoflex.imaging import formation as formation_module
    from cryoflex.imaging.batches import CTFBatch, PoseBatch
    from cryoflex.imaging.formation import ImageFormation

    seen: list[bool] = []

    def spy(*args: object, tf32: bool = False, **kwargs: object) -> torch.Tensor:
        seen.append(tf32)
        return torch.zeros(1, 8, 5, dtype=torch.complex64) if band_limited else torch.zeros(1, 8, 8)

    monkeypatch.setattr(formation_module, "band_limited_spectra" if band_limited else "project_on_grid", spy)
    formation = ImageFormation(8, 2.0, band_limited=band_limited)
    poses = PoseBatch(torch.eye(3)[None], torch.zeros(1, 2))
    ctf = CTFBatch.from_values(10000.0, 10000.0, 0.0, 300.0, 2.7, 0.1)
    for tf32 in (False, True):
        formation.tf32_products = tf32
        formation.images(torch.zeros(1, 3, 3), torch.ones(3), poses, ctf)
    assert seen == [False, True] and not ImageFormation(8, 2.0).tf32_products
