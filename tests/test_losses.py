"""Losses: correlation, KL terms, continuity, and the neighbour-list clash loss against its dense form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform

from cryoflex.io.structure import read_structure
from cryoflex.model import losses
from cryoflex.model.cryosphere import ModelOutput
from cryoflex.model.losses import (
    ClashNeighbourList,
    clash_loss,
    consecutive_pairs,
    continuity_loss,
    correlation_loss,
    dense_clash_loss,
    gaussian_image_nll,
    importance_weighted_bound,
    standard_normal_kl,
)
from cryoflex.train.objective import correlation_term

DTYPES = [torch.float32, torch.float64]
TWO_CHAINS = ["A"] * 12 + ["B"] * 8


def _random_coords(seed: int, batch: int, n: int, box_A: float) -> torch.Tensor:
    """Residues uniformly in a cube small enough that some non-consecutive pairs are under 4 A."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, n, 3), generator=generator, dtype=torch.float64) * box_A


def _non_consecutive_distances(coords_A: np.ndarray, chain_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(n, n) distances and a mask of the pairs i < j not consecutive in a chain (brute force, numpy)."""
    distances = squareform(pdist(coords_A))
    n = len(chain_ids)
    mask = np.triu(np.ones((n, n), dtype=bool), k=1)
    for i in range(n - 1):
        if chain_ids[i] == chain_ids[i + 1]:
            mask[i, i + 1] = False
    return distances, mask


@pytest.mark.parametrize("dtype", DTYPES)
def test_correlation_loss_matches_numpy_corrcoef(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    observed = torch.randn((4, 16, 16), generator=generator, dtype=torch.float64)
    predicted = 0.6 * observed + torch.randn((4, 16, 16), generator=generator, dtype=torch.float64)
    loss = correlation_loss(predicted.to(dtype), observed.to(dtype))
    expected = [
        1.0 - np.corrcoef(p.ravel(), o.ravel())[0, 1]
        for p, o in zip(predicted.numpy(), observed.numpy(), strict=True)
    ]
    assert loss.dtype == dtype and loss.shape == (4,)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(loss.double().numpy(), expected, atol=tolerance)
    assert 0.2 < loss.min() and loss.max() < 0.8  # really partial correlations, not a trivial 0 or 1


def test_correlation_loss_is_scale_and_offset_invariant_with_extremes() -> None:
    observed = torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    predicted = torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    base = correlation_loss(predicted, observed)
    torch.testing.assert_close(correlation_loss(250.0 * predicted - 7.0, 0.01 * observed + 3.0), base)
    torch.testing.assert_close(
        correlation_loss(observed * 3.0 + 1.0, observed), torch.zeros(3, dtype=torch.float64)
    )
    torch.testing.assert_close(
        correlation_loss(-observed, observed), torch.full((3,), 2.0, dtype=torch.float64)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_correlation_loss_constant_image_gives_one_and_finite_gradient(dtype: torch.dtype) -> None:
    observed = torch.randn((3, 7, 7), generator=torch.Generator().manual_seed(3), dtype=dtype)
    # constant images: zero, large, and (index 1) both images constant at a value whose mean subtraction leaves
    # a uniform rounding residue on 7 x 7 pixels: without a rounding threshold that would correlate as +-1
    value = 0.1 if dtype == torch.float32 else 0.3
    predicted = torch.stack([torch.zeros(7, 7), torch.full((7, 7), value), torch.full((7, 7), 1e4)]).to(dtype)
    predicted.requires_grad_(True)
    observed_constant = observed.clone()
    observed_constant[1] = value
    observed_constant.requires_grad_(True)
    loss = correlation_loss(predicted, observed_constant)
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.ones(3, dtype=dtype))
    assert torch.isfinite(predicted.grad).all() and torch.isfinite(observed_constant.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_correlation_loss_gradient_is_finite_and_correct(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(4)
    observed = torch.randn((2, 6, 6), generator=generator, dtype=torch.float64)
    predicted = torch.randn((2, 6, 6), generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: correlation_loss(p, observed), (predicted,))
    predicted_typed = predicted.detach().to(dtype).requires_grad_(True)
    correlation_loss(predicted_typed, observed.to(dtype)).sum().backward()
    assert torch.isfinite(predicted_typed.grad).all() and predicted_typed.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_standard_normal_kl_matches_torch_distributions(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(5)
    mean = torch.randn((5, 7), generator=generator, dtype=dtype)
    std = torch.rand((5, 7), generator=generator, dtype=dtype) * 2.0 + 0.05
    posterior = torch.distributions.Normal(mean, std)
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(std))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(dim=-1)
    result = standard_normal_kl(mean, std)
    assert result.shape == (5,) and result.dtype == dtype
    torch.testing.assert_close(result, expected)


def test_kl_of_zero_std_is_finite_with_finite_gradient() -> None:
    mean = torch.zeros((2, 3), requires_grad=True)
    std = torch.tensor([[1.0, 0.0, 0.5], [1.0, 1.0, 1.0]], requires_grad=True)
    total = standard_normal_kl(mean, std).sum()
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(std.grad).all() and torch.isfinite(mean.grad).all()


def test_consecutive_pairs_break_at_chain_changes() -> None:
    pairs = consecutive_pairs(np.array(["A", "A", "A", "B", "B", "C"]))
    assert pairs.dtype == torch.int64
    assert pairs.tolist() == [[0, 1], [1, 2], [3, 4]]
    assert consecutive_pairs(["A"]).shape == (0, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_continuity_loss_value_gradient_and_empty(dtype: torch.dtype) -> None:
    coords = torch.tensor([[[0.0, 0, 0], [3.0, 0, 0], [3.0, 4.0, 0], [3.0, 4.0, 0]]], dtype=dtype).repeat(
        2, 1, 1
    )
    coords[1, 1, 0] = 3.8
    pairs = consecutive_pairs(["A", "A", "A", "A"])
    reference = torch.full((3,), 3.8, dtype=dtype)
    coords.requires_grad_(True)
    loss = continuity_loss(coords, pairs[:, 0], reference)
    # batch 0: distances 3, 4, 0; batch 1: 3.8, sqrt(0.64 + 16), 0 (coincident residues)
    expected_0 = ((3.0 - 3.8) ** 2 + (4.0 - 3.8) ** 2 + 3.8**2) / 3
    expected_1 = (0.0 + (np.sqrt(16.64) - 3.8) ** 2 + 3.8**2) / 3
    torch.testing.assert_close(loss, torch.tensor([expected_0, expected_1], dtype=dtype))
    loss.sum().backward()
    assert torch.isfinite(coords.grad).all()
    empty = continuity_loss(coords, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=dtype))
    torch.testing.assert_close(empty, torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_clash_loss_with_neighbour_list_equals_dense(seed: int) -> None:
    coords = _random_coords(seed, batch=3, n=len(TWO_CHAINS), box_A=14.0)
    pairs = ClashNeighbourList(TWO_CHAINS, skin_A=6.0).update(coords)
    sparse = clash_loss(coords, pairs)
    dense = dense_clash_loss(coords, TWO_CHAINS)
    distances, mask = _non_consecutive_distances(coords[0].numpy(), TWO_CHAINS)
    assert (distances[mask] < 4.0).sum() >= 3  # the test really has clashes
    expected_0 = (np.maximum(4.0 - distances[mask], 0.0) ** 2).sum() / len(TWO_CHAINS)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-12)
    assert abs(dense[0].item() - expected_0) < 1e-12
    coords.requires_grad_(True)
    sparse_gradient = torch.autograd.grad(clash_loss(coords, pairs).sum(), coords)[0]
    dense_gradient = torch.autograd.grad(dense_clash_loss(coords, TWO_CHAINS).sum(), coords)[0]
    torch.testing.assert_close(sparse_gradient, dense_gradient, rtol=0, atol=1e-12)


@pytest.mark.parametrize("screened", [True, False])
def test_clash_loss_screened_in_blocks_of_pairs_equals_dense(screened: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the close pairs are screened a block of pairs at a time: blocks of 2 pairs (many blocks, some clashing,
    some not) give the dense loss and gradient; so do structures whose memory is component-major, as the
    deformation's, and every listed pair taken at once, as on an accelerator."""
    monkeypatch.setattr(losses, "_SCREENED_PAIRS", 2)
    monkeypatch.setattr(losses, "_screens_close_pairs", lambda device: screened)
    coords = _random_coords(5, batch=4, n=len(TWO_CHAINS), box_A=14.0)
    pairs = ClashNeighbourList(TWO_CHAINS, skin_A=6.0).update(coords)
    assert len(pairs) > 10
    component_major = coords.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    for structures in (coords.clone().requires_grad_(True), component_major):
        sparse, dense = clash_loss(structures, pairs), dense_clash_loss(structures, TWO_CHAINS)
        assert (dense > 0).all()
        torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-12)
        sparse_gradient = torch.autograd.grad(sparse.sum(), structures)[0]
        dense_gradient = torch.autograd.grad(dense.sum(), structures)[0]
        torch.testing.assert_close(sparse_gradient, dense_gradient, rtol=0, atol=1e-12)


def test_continuity_loss_skips_chain_breaks() -> None:
    """Against numpy, pair by pair, on two chains: the distance across the break is not counted."""
    coords = _random_coords(6, batch=2, n=len(TWO_CHAINS), box_A=14.0)
    pairs = consecutive_pairs(TWO_CHAINS)
    reference = torch.linspace(3.0, 4.0, len(pairs), dtype=coords.dtype)
    array = coords.numpy()
    references = reference.tolist()
    expected = [
        np.mean([(np.linalg.norm(c[i] - c[j]) - r) ** 2 for (i, j), r in zip(pairs.tolist(), references, strict=True)])
        for c in array
    ]
    assert len(pairs) == len(TWO_CHAINS) - 2
    np.testing.assert_allclose(continuity_loss(coords, pairs[:, 0], reference).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clash_loss_without_clashes_is_exactly_zero(dtype: torch.dtype) -> None:
    coords = (torch.arange(10, dtype=dtype)[:, None] * torch.tensor([4.5, 0.0, 0.0], dtype=dtype))[
        None
    ].repeat(2, 1, 1)
    coords.requires_grad_(True)
    pairs = ClashNeighbourList(["A"] * 10, skin_A=6.0).update(coords)
    assert len(pairs) > 0  # pairs within the skin, none under the cutoff
    for loss in (clash_loss(coords, pairs), dense_clash_loss(coords, ["A"] * 10)):
        (gradient,) = torch.autograd.grad(loss.sum(), coords)
        assert loss.dtype == dtype and torch.equal(loss, torch.zeros(2, dtype=dtype))
        assert torch.equal(gradient, torch.zeros_like(coords))
    empty = clash_loss(coords, torch.zeros((0, 2), dtype=torch.int64))
    assert torch.equal(empty, torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_clash_loss_coincident_residues_have_finite_gradient(dtype: torch.dtype) -> None:
    coords = torch.tensor(
        [[[0.0, 0, 0], [3.8, 0, 0], [0.0, 0, 0], [1.0, 0, 0]]], dtype=dtype, requires_grad=True
    )
    chain_ids = ["A", "A", "B", "B"]
    pairs = ClashNeighbourList(chain_ids, skin_A=6.0).update(coords)
    for loss in (clash_loss(coords, pairs), dense_clash_loss(coords, chain_ids)):
        (gradient,) = torch.autograd.grad(loss.sum(), coords)
        # pairs (0,2): d 0 -> 16; (0,3): d 1 -> 9; (1,2): d 3.8 -> 0.04; (1,3): d 2.8 -> 1.44; over 4 residues
        torch.testing.assert_close(loss, torch.tensor([26.48 / 4], dtype=dtype))
        assert torch.isfinite(gradient).all()


def test_neighbour_list_has_every_close_pair_and_no_consecutive_pair() -> None:
    coords = _random_coords(7, batch=1, n=len(TWO_CHAINS), box_A=25.0)
    neighbours = ClashNeighbourList(TWO_CHAINS, cutoff_A=4.0, skin_A=3.0)
    assert neighbours.pairs.shape == (0, 2)
    pairs = neighbours.update(coords[0])  # (n, 3) input is accepted too
    distances, mask = _non_consecutive_distances(coords[0].numpy(), TWO_CHAINS)
    expected = {(int(i), int(j)) for i, j in zip(*np.nonzero(mask & (distances < 7.0)), strict=True)}
    assert pairs.dtype == torch.int64 and torch.equal(neighbours.pairs, pairs)
    assert {tuple(pair) for pair in pairs.tolist()} == expected
    assert 5 < len(expected) < mask.sum()  # some pairs inside the radius, some outside
    assert (pairs[:, 0] < pairs[:, 1]).all()
    consecutive = {tuple(pair) for pair in consecutive_pairs(TWO_CHAINS).tolist()}
    assert not consecutive & {tuple(pair) for pair in pairs.tolist()}
    assert (11, 12) in expected or distances[11, 12] >= 7.0  # residues across the chain break are allowed


def test_neighbour_list_is_the_union_over_the_batch() -> None:
    chain_ids = ["A"] * 6
    far_apart = torch.arange(6, dtype=torch.float64)[:, None] * torch.tensor([20.0, 0.0, 0.0])
    folded = far_apart.clone()
    folded[5] = torch.tensor([1.0, 2.0, 0.0])  # residue 5 clashes with residue 0 in this member only
    pairs = ClashNeighbourList(chain_ids, skin_A=6.0).update(torch.stack([far_apart, folded]))
    assert pairs.tolist() == [[0, 5]]
    loss = clash_loss(torch.stack([far_apart, folded]), pairs)
    torch.testing.assert_close(loss, torch.tensor([0.0, (4.0 - np.sqrt(5.0)) ** 2 / 6], dtype=torch.float64))


def test_neighbour_list_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        ClashNeighbourList(["A"] * 5).update(torch.zeros((2, 4, 3)))


def test_real_adenylate_kinase_has_no_clashes(data_dir: Path) -> None:
    structure = read_structure(data_dir / "adk_open.pdb")
    coords = torch.from_numpy(structure.coords_A[:1])
    pairs = ClashNeighbourList(structure.chain_ids, skin_A=6.0).update(coords)
    distances = (coords[0, pairs[:, 0]] - coords[0, pairs[:, 1]]).norm(dim=-1)
    # 214 C-alpha atoms: the closest non-consecutive pair is 4.12 A apart, consecutive ones are 3.0-3.9 A
    assert structure.n_residues == 214 and len(pairs) > 1000
    assert distances.min().item() == pytest.approx(4.1225, abs=1e-3)
    assert torch.equal(clash_loss(coords, pairs), torch.zeros(1, dtype=torch.float64))
    assert torch.equal(dense_clash_loss(coords, structure.chain_ids), torch.zeros(1, dtype=torch.float64))
    consecutive = consecutive_pairs(structure.chain_ids)
    reference = (coords[0, consecutive[:, 0]] - coords[0, consecutive[:, 1]]).norm(dim=-1)
    assert continuity_loss(coords, consecutive[:, 0], reference).item() == pytest.approx(0.0, abs=1e-20)


def test_gaussian_image_nll_equals_the_likelihood_at_the_shared_scale_and_each_best_offset() -> None:
    """Independent computation in pixels: the given scale times predicted, each image's least-squares offset b
    (numpy), then the Gaussian negative log-likelihood; gaussian_image_nll reads the images' spectra."""
    generator = torch.Generator().manual_seed(3)
    predicted = torch.randn(4, 8, 8, generator=generator, dtype=torch.float64)
    observed = 0.7 * predicted + 0.2 + 0.5 * torch.randn(4, 8, 8, generator=generator, dtype=torch.float64)
    log_variance = torch.tensor(-1.2, dtype=torch.float64)
    log_scale = torch.tensor(np.log(0.6), dtype=torch.float64)
    nll = gaussian_image_nll(torch.fft.rfft2(predicted), torch.fft.rfft2(observed), log_variance, log_scale)
    for i in range(4):
        target = observed[i].flatten().numpy() - 0.6 * predicted[i].flatten().numpy()
        (offset,), *_ = np.linalg.lstsq(np.ones((64, 1)), target, rcond=None)
        expected = np.square(target - offset).sum() / (2 * np.exp(-1.2)) + 32 * -1.2
        assert float(nll[i]) == pytest.approx(expected, rel=1e-10)


def test_importance_weighted_bound_matches_torch_distributions_and_tightens() -> None:
    """The bound equals log mean_k p(I|z_k) p(z_k) / q(z_k|I) computed with torch.distributions, and with a fixed
    likelihood it is at least the one-sample average (Jensen): here exactly, term by term."""
    generator = torch.Generator().manual_seed(4)
    mean = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    std = torch.rand(3, 2, generator=generator, dtype=torch.float64) + 0.3
    latent = mean[:, None] + std[:, None] * torch.randn(3, 5, 2, generator=generator, dtype=torch.float64)
    nll = torch.rand(3, 5, generator=generator, dtype=torch.float64) * 10
    q = torch.distributions.Normal(mean[:, None], std[:, None])
    prior = torch.distributions.Normal(0.0, 1.0)
    log_weights = -nll + prior.log_prob(latent).sum(-1) - q.log_prob(latent).sum(-1)
    bound, proposal_loss = importance_weighted_bound(nll, latent, mean, std, kl_weight=1.0)
    torch.testing.assert_close(bound, torch.logsumexp(log_weights, 1) - np.log(5))
    assert torch.all(bound >= log_weights.mean(1))
    normalised = torch.softmax(log_weights, 1)
    torch.testing.assert_close(proposal_loss, -(normalised * q.log_prob(latent).sum(-1)).sum(1))
    half, _ = importance_weighted_bound(nll, latent, mean, std, kl_weight=0.5)
    torch.testing.assert_close(half, torch.logsumexp(-nll + 0.5 * (log_weights + nll), 1) - np.log(5))


def test_importance_weighted_gradients_train_the_decoder_by_the_bound_and_the_encoder_by_the_weights() -> None:
    """A likelihood parameter gets the bound's gradient; the encoder (mean, std) gets only that of the reweighted
    wake-sleep loss -sum_k w~_k log q(z_k), with the draws fixed: not the bound's, which would pull q to the prior."""
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    centre = torch.randn(3, generator=generator, dtype=torch.float64)
    mean = (0.5 * torch.arange(6, dtype=torch.float64).reshape(2, 3)).requires_grad_()
    std = torch.full((2, 3), 0.7, dtype=torch.float64, requires_grad=True)
    c = centre.clone().requires_grad_()
    latent = (mean[:, None] + std[:, None] * noise).detach()
    nll = 2.0 * (latent - c).square().sum(-1)
    bound, proposal_loss = importance_weighted_bound(nll, latent, mean, std, kl_weight=1.0)
    (proposal_loss - bound).sum().backward()

    fixed_q = torch.distributions.Normal(mean.detach()[:, None], std.detach()[:, None])
    log_weights = -nll.detach() + torch.distributions.Normal(0.0, 1.0).log_prob(latent).sum(-1)
    log_weights = log_weights - fixed_q.log_prob(latent).sum(-1)
    normalised = torch.softmax(log_weights, 1)
    # d/dc of -bound = sum_k w~_k d nll_k / dc = sum_k w~_k * 4 (c - z_k)
    torch.testing.assert_close(c.grad, (normalised[..., None] * 4.0 * (c.detach() - latent)).sum((0, 1)))
    mean_2 = mean.detach().clone().requires_grad_()
    std_2 = std.detach().clone().requires_grad_()
    wake = -(normalised * torch.distributions.Normal(mean_2[:, None], std_2[:, None]).log_prob(latent).sum(-1)).sum()
    wake.backward()
    torch.testing.assert_close(mean.grad, mean_2.grad)
    torch.testing.assert_close(std.grad, std_2.grad)


def test_the_reported_correlation_is_each_images_first_draw_and_the_objective_keeps_its_gradient() -> None:
    """With the Gaussian likelihood 1 - correlation is only reported: each image's first draw (of the image-major
    B x K predictions), without gradient. As the original objective (one draw) it keeps its gradient."""
    generator = torch.Generator().manual_seed(8)
    observed = torch.randn(3, 6, 6, generator=generator, dtype=torch.float64)
    predicted = torch.randn(3 * 4, 6, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    reported = correlation_term(_output(torch.fft.rfft2(predicted)), observed, "gaussian")  # band-limited: spectra
    firsts = predicted.detach()[::4]
    expected = np.mean([1 - np.corrcoef(firsts[b].ravel(), observed[b].ravel())[0, 1] for b in range(3)])
    assert reported.item() == pytest.approx(expected, abs=1e-12) and not reported.requires_grad
    objective = correlation_term(_output(predicted[::4]), observed, "correlation")
    assert objective.item() == pytest.approx(expected, abs=1e-12) and objective.requires_grad


def _output(predicted: torch.Tensor) -> ModelOutput:
    """A ModelOutput of these predictions (images, or spectra), one latent draw each, with nothing else in it."""
    unused = dict.fromkeys(("coords_A", "latent_mean", "latent_std", "segmentation_kl", "log_noise_variance",
                            "log_image_scale", "sigma_A", "assignment"), torch.zeros(()))  # fmt: skip
    return ModelOutput(predicted=predicted, latent=torch.zeros(len(predicted), 2), **unused)


def test_the_objective_rebuilds_the_clash_list_from_each_images_first_draw() -> None:
    """The neighbour list serves the next steps' draws, not only this step's, so it is built from one draw per image
    (8x fewer k-d trees with the default draws): its pairs are those of the first draws, not of the others."""
    from types import SimpleNamespace

    from cryoflex.config import load_config
    from cryoflex.model.cryosphere import ModelOutput
    from cryoflex.train.objective import LossTerms

    images, draws, n = 2, 3, len(TWO_CHAINS)
    coords = _random_coords(5, images * draws, n, box_A=40.0).view(images, draws, n, 3)
    coords[:, 1:] *= 0.3  # the other draws packed closer: close pairs of their own
    config = load_config(None, {"particles": "p.star", "structure": "s.pdb", "importance_samples": draws})
    objective = LossTerms(config, SimpleNamespace(nominal_coords_A=coords[0, 0]), TWO_CHAINS, n_images=10)
    torch.manual_seed(0)
    output = ModelOutput(
        predicted=torch.fft.rfft2(torch.randn(images * draws, 8, 8)), coords_A=coords.flatten(0, 1),
        latent=torch.randn(images * draws, 4), latent_mean=torch.zeros(images, 4), latent_std=torch.ones(images, 4),
        assignment=torch.ones(n, 1), segmentation_kl=torch.tensor(0.0), log_noise_variance=torch.tensor(0.0),
        log_image_scale=torch.tensor(0.0), sigma_A=torch.tensor(2.0),
    )  # fmt: skip
    objective(output, torch.randn(images, 8, 8), epoch_progress=1.0, rebuild_neighbours=True)
    first_draws = ClashNeighbourList(TWO_CHAINS, skin_A=config.clash_skin_A).update(coords[:, 0])
    every_draw = ClashNeighbourList(TWO_CHAINS, skin_A=config.clash_skin_A).update(coords.flatten(0, 1))
    assert len(first_draws) > 0 and not torch.equal(first_draws, every_draw)
    assert torch.equal(objective.neighbours.pairs, first_draws)


@pytest.mark.parametrize("dtype", DTYPES)
def test_close_pairs_from_every_distance_equal_the_k_d_trees(monkeypatch: pytest.MonkeyPatch, dtype) -> None:
    """An accelerator builds the clash list from every distance, in blocks of rows; the pairs are the k-d trees'
    (the union over the structures, sorted), whatever the blocks, far from the origin too (no cancellation)."""
    from cryoflex.model import losses

    coords = _random_coords(11, 3, 40, box_A=30.0) + 500.0
    expected = losses._close_pair_keys_by_trees(coords.numpy(), 6.0)
    assert len(expected) > 20
    for block_elements in (2**28, 3 * 40 * 7):  # one block; blocks of 7 rows, the last one short
        monkeypatch.setattr(losses, "_DISTANCE_BLOCK_ELEMENTS", block_elements)
        keys = losses.close_pair_keys_by_distance(coords.to(dtype), 6.0)
        np.testing.assert_array_equal(keys.numpy(), expected)


def test_the_clash_list_built_on_a_gpu_has_the_k_d_trees_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """ClashNeighbourList.update's GPU branch (forced here on the CPU) keeps the same pairs as its k-d trees, also
    when nothing is close and for a single residue."""
    from cryoflex.model import losses

    coords = _random_coords(12, 4, len(TWO_CHAINS), box_A=25.0)
    far_apart = torch.arange(len(TWO_CHAINS), dtype=torch.float64)[:, None].expand(-1, 3) * 100.0
    cases = [(TWO_CHAINS, coords), (TWO_CHAINS, far_apart), (["A"], torch.zeros(2, 1, 3))]
    expected = [ClashNeighbourList(chains).update(c) for chains, c in cases]
    assert len(expected[0]) > 10 and len(expected[1]) == 0 and len(expected[2]) == 0
    monkeypatch.setattr(losses, "_builds_on_device", lambda device: True)
    for (chains, c), pairs in zip(cases, expected, strict=True):
        assert torch.equal(ClashNeighbourList(chains).update(c), pairs)
