"""Segmentation, deformation and networks of the cryoSPHERE model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryoflex.data.batch import ParticleBatch
from cryoflex.data.downsample import fourier_crop
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.io.structure import read_structure
from cryoflex.model import deformation
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.model.deformation import assignment_bands, band_layers, deform, rotation_matrices
from cryoflex.model.networks import Decoder, Encoder, encoder_box_px
from cryoflex.model.segmentation import PartMixture, Segmentation, SegmentedPart, parse_parts


def _segmentation(n: int = 60, segments: int = 3, seed: int = 0) -> Segmentation:
    torch.manual_seed(seed)
    return Segmentation(n, [SegmentedPart("all", np.arange(n), segments)])


def test_assignment_rows_sum_to_one_and_eval_is_deterministic() -> None:
    segmentation = _segmentation()
    for sample in (True, False):
        assignment = segmentation(sample)
        assert assignment.shape == (60, 3)
        torch.testing.assert_close(assignment.sum(1), torch.ones(60))
    assert torch.equal(segmentation(False), segmentation(False))
    assert not torch.equal(segmentation(True), segmentation(True))


def test_initial_segments_are_contiguous_thirds() -> None:
    labels = _segmentation()(False).argmax(1).numpy()
    assert (labels[:20] == 0).all() and (labels[20:40] == 1).all() and (labels[40:] == 2).all()


def test_extreme_parameters_stay_finite() -> None:
    mixture = PartMixture(100, 4, tau=20.0)
    with torch.no_grad():
        mixture.s.mean.fill_(-1e4)  # ELU + 1 underflows to 0: the half-residue floor keeps the width positive
        mixture.alpha.mean.copy_(torch.tensor([1e3, -1e3, 0.0, 0.0]))
        mixture.mu.mean.fill_(50.0)
    assignment = mixture(True)
    assert torch.isfinite(assignment).all()
    torch.testing.assert_close(assignment.sum(1), torch.ones(100))
    loss = assignment.square().sum() + mixture.kl_divergence()
    loss.backward()
    for parameter in mixture.parameters():
        assert torch.isfinite(parameter.grad).all()


def test_kl_matches_torch_distributions() -> None:
    mixture = PartMixture(30, 3, tau=20.0)
    normal = torch.distributions.Normal
    expected = sum(
        torch.distributions.kl_divergence(
            normal(p.mean, p.std), normal(torch.full_like(p.mean, p.prior_mean), p.prior_std)
        ).sum()
        for p in (mixture.mu, mixture.s, mixture.alpha)
    )
    torch.testing.assert_close(mixture.kl_divergence(), expected)


def test_residues_outside_every_part_stay_fixed() -> None:
    parts = [SegmentedPart("a", np.arange(10, 30), 2), SegmentedPart("b", np.arange(40, 50), 1)]
    segmentation = Segmentation(60, parts)
    assignment = segmentation(True)
    assert assignment.shape == (60, 3)
    outside = np.setdiff1d(np.arange(60), np.r_[10:30, 40:50])
    assert torch.all(assignment[outside] == 0)
    torch.testing.assert_close(assignment[10:30, :2].sum(1), torch.ones(20))
    torch.testing.assert_close(assignment[40:50, 2], torch.ones(10))
    coords = torch.randn(60, 3) * 10
    moved = deform(coords, assignment, torch.randn(4, 3, 3), torch.randn(4, 3, 3))
    torch.testing.assert_close(moved[:, outside], coords[outside].expand(4, -1, -1))


def test_parse_parts(data_dir) -> None:
    structure = read_structure(data_dir / "mmcif_1ake_chimerax.cif")
    parts = parse_parts(["A:1-120:3", "B:2"], structure, default_segments=5)
    assert [p.n_segments for p in parts] == [3, 2]
    assert len(parts[0].residue_indices) == 120 and len(parts[1].residue_indices) == 214
    assert parse_parts([], structure, default_segments=5)[0].n_segments == 5
    with pytest.raises(ValueError, match="no chain 'C'"):
        parse_parts(["C:2"], structure, default_segments=5)
    with pytest.raises(ValueError, match="expected CHAIN"):
        parse_parts(["A-3"], structure, default_segments=5)


@pytest.fixture(params=["layers", "segment by segment"])
def rotation_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a deformation test through both forms of the chain of rotations (deform chooses by the structures' size)."""
    monkeypatch.setattr(deformation, "LAYERED_MAX_POINTS", 10**12 if request.param == "layers" else 0)
    return str(request.param)


def test_soft_rotation_matches_scipy_and_is_identity_at_zero(rotation_form: str) -> None:
    """One segment with G = 0.4 everywhere rotates every residue by 0.4 w about the centre (Taylor branch too)."""
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(50, 3, generator=generator, dtype=torch.float64)
    assignment = torch.full((50, 1), 0.4, dtype=torch.float64)
    for scale in (1.0, 1e-5):
        vectors = torch.randn(3, 1, 3, generator=generator, dtype=torch.float64) * scale
        moved = deform(points, assignment, vectors, torch.zeros_like(vectors))
        centre = points.mean(0).numpy()
        for b in range(3):
            rotation = Rotation.from_rotvec(0.4 * vectors[b, 0].numpy()).as_matrix()
            np.testing.assert_allclose(moved[b].numpy(), (points.numpy() - centre) @ rotation.T + centre, atol=1e-12)
    zero = torch.zeros(2, 1, 3, dtype=torch.float64)
    still = deform(points, assignment, zero, zero)
    torch.testing.assert_close(still, points.expand(2, -1, -1), rtol=0, atol=1e-13)


def test_hard_assignment_moves_each_segment_rigidly(rotation_form: str) -> None:
    generator = torch.Generator().manual_seed(2)
    n, segments, batch = 90, 3, 4
    coords = torch.randn(n, 3, generator=generator, dtype=torch.float64) * 15
    labels = torch.arange(n) // 30
    assignment = torch.nn.functional.one_hot(labels, segments).double()
    vectors = torch.randn(batch, segments, 3, generator=generator, dtype=torch.float64)
    translations = torch.randn(batch, segments, 3, generator=generator, dtype=torch.float64) * 5
    moved = deform(coords, assignment, vectors, translations)
    for b in range(batch):
        for m in range(segments):
            members = labels == m
            before, after = coords[members].numpy(), moved[b, members].numpy()
            centre = before.mean(0)
            rotation = Rotation.from_rotvec(vectors[b, m].numpy()).as_matrix()
            expected = (before - centre) @ rotation.T + centre + translations[b, m].numpy()
            np.testing.assert_allclose(after, expected, atol=1e-10)


def test_deformation_gradients_are_finite_at_identity(rotation_form: str) -> None:
    segmentation = _segmentation()
    coords = torch.randn(60, 3) * 10
    vectors = torch.zeros(2, 3, 3, requires_grad=True)
    translations = torch.zeros(2, 3, 3, requires_grad=True)
    deform(coords, segmentation(True), vectors, translations).square().sum().backward()
    assert torch.isfinite(vectors.grad).all() and torch.isfinite(translations.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in segmentation.parameters())


def test_networks_shapes_and_identity_start() -> None:
    encoder, decoder = Encoder(16, latent_dim=4, hidden=(32,)), Decoder(4, n_segments=3, hidden=(32,))
    mean, std = encoder(torch.randn(5, 16, 16))
    assert mean.shape == std.shape == (5, 4) and (std > 0).all()
    vectors, translations = decoder(mean)
    assert vectors.shape == translations.shape == (5, 3, 3)
    assert torch.all(vectors == 0) and torch.all(translations == 0)


@pytest.mark.parametrize(
    ("box_px", "factor", "expected_px"), [(128, 2, 64), (64, 2, 32), (48, 2, 32), (32, 2, 32), (30, 2, 30),
                                          (256, 4, 64), (100, 3, 32), (130, 2, 64), (64, 1, 64)],
)  # fmt: skip
def test_encoder_box_is_reduced_but_never_below_32_px(box_px: int, factor: int, expected_px: int) -> None:
    assert encoder_box_px(box_px, factor) == expected_px


def test_encoder_reads_the_fourier_cropped_image() -> None:
    torch.manual_seed(0)
    images = torch.randn(5, 64, 64)
    reduced = Encoder(64, latent_dim=4, hidden=(32,), input_box_px=32)
    assert reduced.net[0].in_features == 32 * 32
    same_weights = Encoder(32, latent_dim=4, hidden=(32,))
    same_weights.load_state_dict(reduced.state_dict())
    for got, expected in zip(reduced(images), same_weights(fourier_crop(images, 32)), strict=True):
        torch.testing.assert_close(got, expected)


def test_encoder_dropout_acts_in_training_only_and_keeps_the_checkpoint_keys() -> None:
    torch.manual_seed(0)
    images = torch.randn(64, 16, 16)
    plain = Encoder(16, latent_dim=4, hidden=(256, 128))
    dropping = Encoder(16, latent_dim=4, hidden=(256, 128), dropout=0.5)
    dropping.load_state_dict(plain.state_dict())  # the same keys: runs trained without dropout still load
    plain.train()
    dropping.eval()
    for got, expected in zip(dropping(images), plain(images), strict=True):
        torch.testing.assert_close(got, expected)
    dropping.train()
    first, second = dropping(images)[0], dropping(images)[0]
    assert not torch.allclose(first, second)  # a new mask every call


@pytest.mark.slow
def test_compiled_deformation_matches_eager() -> None:
    """`compile: true` runs the same deformation through torch.compile (about a minute to compile on this CPU)."""
    torch.manual_seed(3)
    segmentation = _segmentation(n=30, segments=3)
    model = CryoSphere(torch.randn(30, 3) * 10, torch.ones(30), segmentation, Encoder(8, 2, (8,)),
                       Decoder(2, 3, (8,)), formation=ImageFormation(8, 4.0), density_offsets_A=torch.randn(30, 2, 3),
                       density_shares=torch.full((30, 2), 0.5))  # fmt: skip
    torch.nn.init.normal_(model.decoder.net[-1].weight, std=0.3)
    latent = torch.randn(4, 2)
    eager = model.decode_with_density(latent, sample_segmentation=False)[:2]
    model.compile_deformation()
    compiled = model.decode_with_density(latent, sample_segmentation=False)[:2]
    for got, expected in zip(compiled, eager, strict=True):  # the C-alphas and the density centres
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert not torch.equal(eager[0], model.nominal_coords_A.expand(4, -1, -1))  # the decoder really moves residues


@pytest.mark.parametrize("scale", [0.5, 1e-3, 0.0])
def test_deformation_gradients_match_finite_differences(scale: float, rotation_form: str) -> None:
    """The hand-written backward passes (coefficients, segment rotations) against numerical derivatives, in float64,
    for every input, at ordinary, small (Taylor branch) and zero angles."""
    generator = torch.Generator().manual_seed(4)
    coords = (torch.randn(7, 3, generator=generator, dtype=torch.float64) * 5).requires_grad_()
    assignment = torch.softmax(torch.randn(7, 3, generator=generator, dtype=torch.float64) * 2, 1).requires_grad_()
    vectors = (torch.randn(2, 3, 3, generator=generator, dtype=torch.float64) * scale).requires_grad_()
    translations = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(deform, (coords, assignment, vectors, translations))


def test_banded_deformation_equals_the_dense_one(rotation_form: str) -> None:
    """Each segment's rotation touches only its band of residues (a sharp segmentation, two parts); the structures and
    the gradients of every input and of the mixtures' parameters equal those of rotating every residue by every
    segment, in float64. The dense chain always goes segment by segment, so with rotation_form "layers" this also
    checks the two forms against each other."""
    torch.manual_seed(6)
    n = 150
    segmentation = Segmentation(n, [SegmentedPart("A", np.arange(100), 6), SegmentedPart("B", np.arange(100, n), 2)])
    segmentation.double()
    coords = (torch.randn(n, 3, dtype=torch.float64) * 10).requires_grad_()
    vectors = (torch.randn(3, 8, 3, dtype=torch.float64) * 0.5).requires_grad_()
    translations = torch.randn(3, 8, 3, dtype=torch.float64).requires_grad_()
    weights = torch.randn(3, n, 3, dtype=torch.float64)
    results = []
    for dense in (False, True):
        assignment = segmentation(False)
        moved = deform(coords, assignment, vectors, translations, dense=dense)
        inputs = (coords, vectors, translations, *segmentation.parameters())
        gradients = torch.autograd.grad((moved * weights).sum(), inputs, allow_unused=True)
        results.append((moved, *(g for g in gradients if g is not None)))
    assert len(results[0]) == 10  # the structures, three inputs, and mu, s and alpha of both mixtures
    for banded, dense in zip(*results, strict=True):
        torch.testing.assert_close(banded, dense, rtol=1e-12, atol=1e-12)
    bands = assignment_bands(segmentation(False))
    assert [m for m, *_ in bands] == list(range(8))
    assert sum(end - first for _, first, end in bands) < 2 * n  # not 8 n: each band is about one segment
    assert all(first >= 100 for m, first, _ in bands if m >= 6)  # part B's segments stay in part B


def test_layers_keep_each_residues_rotations_in_segment_order() -> None:
    """Every band entry lands in exactly one layer, and a residue's k-th band (in segment order) in layer k."""
    bands = [(0, 0, 12), (1, 9, 25), (2, 22, 40), (3, 10, 14), (4, 38, 40)]
    layers = band_layers(bands, 40, torch.device("cpu"))
    packed = [(m, r) for m, first, end in bands for r in range(first, end)]  # the coefficients' order
    seen = set()
    for k, layer in enumerate(layers):
        assert layer.everyone == (k == 0)  # every residue has a first band, no residue a second one here
        assert torch.equal(layer.residues, layer.residues.sort().values) and len(set(layer.residues.tolist())) == len(
            layer.residues
        )  # fmt: skip
        for residue, column, segment in zip(*(x.tolist() for x in layer[:3]), strict=True):
            assert packed[column] == (segment, residue)
            assert sorted(m for m, r in packed if r == residue)[k] == segment
            seen.add(column)
    assert seen == set(range(len(packed))) and len(layers) == 3  # residues 10-11 lie in three bands


def test_rotation_matrix_gradients_match_finite_differences_near_zero() -> None:
    for scale in (1.0, 1e-4, 0.0):
        vectors = (torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * scale)
        assert torch.autograd.gradcheck(rotation_matrices, (vectors.requires_grad_(),))


def _model_with_density_offsets(points: int = 1, n: int = 45, segments: int = 3) -> CryoSphere:
    """A small model whose residues are rendered as `points` Gaussians 1.5 A off their pseudo-atoms (with random shares
    of the electrons), with a decoder that moves them."""
    torch.manual_seed(4)
    offsets_A = torch.nn.functional.normalize(torch.randn(n, points, 3), dim=-1) * 1.5
    shares = torch.softmax(torch.randn(n, points), dim=1)
    model = CryoSphere(torch.randn(n, 3) * 8, torch.rand(n) + 0.5, _segmentation(n, segments), Encoder(16, 2, (8,)),
                       Decoder(2, segments, (8,)), ImageFormation(16, 4.0), offsets_A, shares)  # fmt: skip
    torch.nn.init.normal_(model.decoder.net[-1].weight, std=0.5)
    return model.eval()


@pytest.mark.parametrize("points", [1, 2])
def test_density_centres_move_rigidly_with_their_pseudo_atoms(points: int) -> None:
    model = _model_with_density_offsets(points)
    latent = torch.randn(6, 2)
    coords, density, assignment = model.decode_with_density(latent, sample_segmentation=False)
    assert density.shape == (6, 45 * points, 3)
    alone, _ = model.decode(latent, sample_segmentation=False)
    torch.testing.assert_close(coords, alone, rtol=0, atol=1e-5)  # the pseudo-atoms are unchanged by the grouping
    assert not torch.allclose(coords, model.nominal_coords_A.expand(6, -1, -1), atol=0.1)  # the decoder moves them
    offsets = density.unflatten(1, (45, points)) - coords[:, :, None]  # (B, n, P, 3)
    # every residue's offsets turn by a rotation (a chain of partial ones where the segmentation is soft): same length
    torch.testing.assert_close(offsets.norm(dim=-1), model.density_offsets_A.norm(dim=-1).expand(6, -1, -1))
    # inside a segment, exactly that segment's full rotation
    vectors, _ = model.decoder(latent)
    inside = assignment.max(1).values > 1 - 1e-6
    segment = assignment.argmax(1)
    rotations = rotation_matrices(vectors)[:, segment]  # (B, n, 3, 3)
    expected = torch.einsum("bnij,npj->bnpi", rotations, model.density_offsets_A)
    torch.testing.assert_close(offsets[:, inside], expected[:, inside], rtol=0, atol=1e-5)
    assert inside.sum() > 30
    from cryoflex.analysis.predict import decode_latents  # what the model's maps are rendered from

    np.testing.assert_allclose(np.concatenate(list(decode_latents(model, latent.numpy(), density=True))),
                               density.detach().numpy(), rtol=0, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("points", [1, 2])
def test_images_are_rendered_from_the_density_centres(points: int) -> None:
    """Each Gaussian with its share of its residue's electrons: by linearity, the image is the sum of the images of
    each group of Gaussians."""
    model = _model_with_density_offsets(points)
    poses = PoseBatch(torch.as_tensor(Rotation.random(3, random_state=0).as_matrix(), dtype=torch.float32),
                      torch.zeros(3, 2))  # fmt: skip
    ctf = CTFBatch.from_values(torch.full((3,), 15000.0), 15000.0, 0.0, 300.0, 2.7, 0.1)
    batch = ParticleBatch(torch.randn(3, 16, 16), poses, ctf, torch.arange(3), torch.ones(3, dtype=torch.int64))
    output = model(batch)
    _, density, _ = model.decode_with_density(output.latent_mean, sample_segmentation=False)
    by_group = sum(model.formation.images(density[:, p::points], model.amplitudes_e * model.density_shares[:, p],
                                          poses, ctf) for p in range(points))  # fmt: skip
    predicted = output.predicted_images()
    torch.testing.assert_close(predicted, by_group)
    at_pseudo_atoms = model.render(output.coords_A.repeat_interleave(points, dim=1), poses, ctf)
    assert (predicted - at_pseudo_atoms).abs().max() > 0.05 * predicted.abs().max()


def test_checkpoints_from_before_the_density_offsets_render_at_the_pseudo_atoms() -> None:
    model = _model_with_density_offsets(points=2)  # built from a full-atom file: loading the checkpoint overrides it
    state = {name: value for name, value in model.state_dict().items() if not name.startswith("density_")}
    assert not model.renders_pseudo_atoms
    model.load_state_dict(state)
    assert model.renders_pseudo_atoms and not model.density_offsets_A.any()
    latent = torch.randn(2, 2)
    coords, density, _ = model.decode_with_density(latent, sample_segmentation=False)
    assert density is coords


def test_checkpoints_with_one_centroid_per_residue_load_as_one_gaussian() -> None:
    """Saved before the Gaussians were grouped: offsets (n, 3) and no shares; loaded into a model that the structure
    file now gives two Gaussians per residue, the checkpoint's one wins."""
    offsets = _model_with_density_offsets(points=1).density_offsets_A[:, 0].clone()
    model = _model_with_density_offsets(points=2)
    state = {**model.state_dict(), "density_offsets_A": offsets}
    del state["density_shares"]
    model.load_state_dict(state)
    torch.testing.assert_close(model.density_offsets_A, offsets[:, None], rtol=0, atol=0)
    torch.testing.assert_close(model.density_amplitudes_e, model.amplitudes_e, rtol=0, atol=0)
    assert not model.renders_pseudo_atoms


def test_checkpoints_render_the_gaussians_they_were_trained_with() -> None:
    trained = _model_with_density_offsets(points=2)
    model = _model_with_density_offsets(points=1)
    model.load_state_dict(trained.state_dict())
    latent = torch.randn(3, 2)
    for got, expected in zip(model.decode_with_density(latent, sample_segmentation=False),
                             trained.decode_with_density(latent, sample_segmentation=False), strict=True):  # fmt: skip
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.density_amplitudes_e, trained.density_amplitudes_e)


@pytest.mark.parametrize("density", ["residue_centroid", "backbone_side_chain", "pseudo_atom"])
def test_the_density_setting_reaches_the_model(data_dir, density: str) -> None:
    from cryoflex.config import load_config
    from cryoflex.train.setup import build_model

    structure = read_structure(data_dir / "adk_open.pdb")  # every atom: the centroids are off the C-alphas
    config = load_config(None, {"particles": "p.star", "structure": "s.pdb", "segments": 2, "density": density})
    model = build_model(config, structure, 32, 4.0)
    amplitudes = model.density_amplitudes_e.numpy()
    if density == "residue_centroid":
        np.testing.assert_allclose(model.density_offsets_A[:, 0].numpy(), structure.centroid_offsets_A[0], atol=1e-6)
        np.testing.assert_allclose(amplitudes, structure.amplitudes_e, rtol=1e-6)
    elif density == "backbone_side_chain":
        np.testing.assert_allclose(model.density_offsets_A.numpy(), structure.density_offsets_A[0], atol=1e-6)
        np.testing.assert_allclose(amplitudes, (structure.amplitudes_e[:, None] * structure.density_shares).ravel(),
                                   rtol=1e-6)  # fmt: skip
    else:
        assert model.renders_pseudo_atoms and not model.density_offsets_A.any()
    assert model.renders_pseudo_atoms == (density == "pseudo_atom")
    from cryoflex.train.loop import density_description  # the training log says which it is

    words = {"residue_centroid": "electron centroid", "backbone_side_chain": "two Gaussians",
             "pseudo_atom": "pseudo-atom"}  # fmt: skip
    line = density_description(model, density)
    assert words[density] in line and density in line


def test_a_structure_without_side_chains_gets_one_gaussian_per_residue(data_dir, tmp_path) -> None:
    """backbone_side_chain on C-alphas alone: no second Gaussian to render."""
    from cryoflex.config import load_config
    from cryoflex.io.structure import write_structure
    from cryoflex.train.setup import build_model

    write_structure(tmp_path / "ca.pdb", read_structure(data_dir / "adk_open.pdb"))
    config = load_config(None, {"particles": "p.star", "structure": "s.pdb", "segments": 2,
                                "density": "backbone_side_chain"})  # fmt: skip
    model = build_model(config, read_structure(tmp_path / "ca.pdb"), 32, 4.0)
    assert model.density_offsets_A.shape[1] == 1 and model.renders_pseudo_atoms


def test_placing_the_nominal_structure_keeps_its_density_offsets(data_dir) -> None:
    """Training moves the structure into the particles' frame by a translation: the offsets must survive it."""
    from cryoflex.config import load_config
    from cryoflex.train.setup import placed_structure

    path = data_dir / "adk_open.pdb"
    config = load_config(None, {"particles": "p.star", "structure": str(path), "centre_structure": True})
    placed = placed_structure(config, box_size_A=200.0)
    read = read_structure(path)
    assert not np.allclose(placed.coords_A, read.coords_A)  # it was moved
    np.testing.assert_array_equal(placed.density_offsets_A, read.density_offsets_A)


def test_the_model_renders_at_its_learned_width_and_old_checkpoints_keep_the_configured_one() -> None:
    model = _model_with_density_offsets(points=1)
    assert float(model.sigma_A.detach()) == pytest.approx(model.formation.sigma_A)
    poses = PoseBatch(torch.as_tensor(Rotation.random(2, random_state=1).as_matrix(), dtype=torch.float32),
                      torch.zeros(2, 2))  # fmt: skip
    ctf = CTFBatch.from_values(torch.full((2,), 15000.0), 15000.0, 0.0, 300.0, 2.7, 0.1)
    density = model.nominal_density_A.expand(2, -1, -1)
    with torch.no_grad():
        model.log_sigma_A.fill_(np.log(3.0))
    expected = model.formation.images(density, model.density_amplitudes_e, poses, ctf, sigma_A=3.0)
    torch.testing.assert_close(model.render(density, poses, ctf), expected)
    state = {name: value for name, value in model.state_dict().items() if name != "log_sigma_A"}
    model.load_state_dict(state)
    assert float(model.sigma_A.detach()) == pytest.approx(model.formation.sigma_A)


@pytest.mark.parametrize("learn", [True, False])
def test_learn_sigma_decides_whether_the_optimiser_moves_the_width(data_dir, learn: bool) -> None:
    from cryoflex.config import load_config
    from cryoflex.train.setup import build_model, build_optimizer

    config = load_config(None, {"particles": "p.star", "structure": "s.pdb", "segments": 2, "sigma_A": 2.5,
                                "learn_sigma": learn})  # fmt: skip
    model = build_model(config, read_structure(data_dir / "adk_open.pdb"), 32, 4.0)
    assert float(model.sigma_A.detach()) == pytest.approx(2.5)
    optimised = {id(p) for group in build_optimizer(config, model).param_groups for p in group["params"]}
    assert model.log_sigma_A.requires_grad == learn and (id(model.log_sigma_A) in optimised) == learn


@pytest.mark.parametrize("likelihood", ["gaussian", "correlation"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_every_trainable_parameter_is_optimised(data_dir, likelihood: str, learn_sigma: bool) -> None:
    """The trainable parameters are exactly the optimiser's: DDP waits for a gradient of every trainable parameter, so
    one the loss never uses (the likelihood's scale and noise under the correlation loss) stops the second step."""
    from cryoflex.config import load_config
    from cryoflex.train.setup import build_model, build_optimizer

    config = load_config(None, {"particles": "p.star", "structure": "s.pdb", "segments": 2, "likelihood": likelihood,
                                "learn_sigma": learn_sigma})  # fmt: skip
    model = build_model(config, read_structure(data_dir / "adk_open.pdb"), 32, 4.0)
    optimised = {id(p) for group in build_optimizer(config, model).param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("rendering", ["band_limited", "point"])
def test_the_rendering_setting_reaches_the_image_formation(data_dir, rendering: str) -> None:
    from cryoflex.config import load_config
    from cryoflex.train.setup import build_model

    config = load_config(None, {"particles": "p.star", "structure": "s.pdb", "segments": 2, "rendering": rendering})
    model = build_model(config, read_structure(data_dir / "adk_open.pdb"), 32, 4.0)
    assert model.formation.band_limited == (rendering == "band_limited")


@pytest.mark.parametrize("sample", [False, True])
def test_the_segmentation_setting_reaches_the_model(data_dir, sample: bool) -> None:
    from cryoflex.config import load_config
    from cryoflex.train.setup import build_model

    config = load_config(None, {"particles": "p.star", "structure": "s.pdb", "segments": 2,
                                "sample_segmentation": sample})  # fmt: skip
    assert build_model(config, read_structure(data_dir / "adk_open.pdb"), 32, 4.0).sample_segmentation is sample


def test_training_draws_the_segmentation_only_when_asked() -> None:
    """sample_segmentation False: every training step decodes with the posterior-mean segmentation, as analysis does;
    True (the original's): with a draw from its variational posterior."""
    model = _model_with_density_offsets(points=1)
    batch = ParticleBatch(torch.randn(2, 16, 16), PoseBatch(torch.eye(3).expand(2, 3, 3), torch.zeros(2, 2)),
                          CTFBatch.from_values(torch.full((2,), 15000.0), 15000.0, 0.0, 300.0, 2.7, 0.1),
                          torch.arange(2), torch.ones(2, dtype=torch.int64))  # fmt: skip
    mean_assignment = model.segmentation(False)
    model.train()
    model.sample_segmentation = False
    torch.testing.assert_close(model(batch, samples=2).assignment, mean_assignment, rtol=0, atol=0)
    model.sample_segmentation = True
    assert (model(batch, samples=2).assignment - mean_assignment).abs().max() > 1e-4
