"""Structures out of a tiny trained run: traversals, ChimeraX scripts, maps, segmentation, per-segment motions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from cryoflex.analysis.latent import LatentEmbedding, embed, save_embedding, traversal_latents
from cryoflex.analysis.predict import decode_latents, latent_means
from cryoflex.analysis.run import TrainedRun, load_run
from cryoflex.analysis.structures import (
    model_assignment,
    segment_ids,
    segment_motions,
    segment_table,
    segmentation_figure,
    write_segment_motions,
    write_segment_table,
    write_segmented_structure,
    write_traversals,
    write_volumes,
)
from cryoflex.config import load_config
from cryoflex.imaging.volume import gaussian_volume
from cryoflex.io.structure import Structure, read_structure
from cryoflex.train.loop import train


@dataclass
class Analysed:
    run: TrainedRun
    latents: np.ndarray
    names: list[str]
    embedding: LatentEmbedding


@pytest.fixture(scope="module")
def analysed(tiny_adk_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Analysed:
    """40 simulated AdK images (32 px, 4 A/px), trained 2 epochs with tiny networks, reopened for analysis."""
    dataset = tiny_adk_dataset
    config = load_config(None, dict(
        particles=str(dataset / "particles.star"), structure=str(dataset / "nominal.pdb"), segments=3, latent_dim=2,
        epochs=2, batch_size=16, sigma_A=4.0, encoder_hidden=[32], decoder_hidden=[32], progress=False, device="cpu",
        learning_rate=1e-2, neighbour_list_every_steps=2,
    ))  # fmt: skip
    run_dir = tmp_path_factory.mktemp("analysis") / "run"
    train(config, run_dir)
    run = load_run(run_dir, device="cpu")
    latents = latent_means(run.model, run.dataset)
    names = run.dataset.metadata.names.tolist()
    return Analysed(run, latents, names, embed(latents, n_clusters=3, seed=0))


def _decode_one_batch(run: TrainedRun, latents: np.ndarray) -> np.ndarray:
    return np.concatenate(list(decode_latents(run.model, latents.astype(np.float32))))


def test_traversal_pdbs_and_scripts(analysed: Analysed, tmp_path: Path) -> None:
    run, embedding = analysed.run, analysed.embedding
    paths = write_traversals(run.model, run.structure, embedding, tmp_path, n_components=2, n_points=5)
    assert [p.name for p in paths] == ["traversal_pc1.pdb", "traversal_pc1.cxc", "traversal_pc2.pdb",
                                       "traversal_pc2.cxc"]
    ids = segment_ids(model_assignment(run.model))
    for component in (1, 2):
        pdb = gemmi.read_structure(str(tmp_path / f"traversal_pc{component}.pdb"))
        assert len(pdb) == 5
        expected = _decode_one_batch(run, traversal_latents(embedding, component, 5))
        for k in (0, 4):  # endpoints: the 5th and 95th percentiles
            atoms = [atom for chain in pdb[k] for residue in chain for atom in residue]
            assert len(atoms) == run.structure.n_residues
            coords = np.array([atom.pos.tolist() for atom in atoms])
            np.testing.assert_allclose(coords, expected[k], atol=1.5e-3)  # PDB keeps 3 decimals
            np.testing.assert_array_equal([atom.b_iso for atom in atoms], ids)
        script = (tmp_path / f"traversal_pc{component}.cxc").read_text()
        assert f"open traversal_pc{component}.pdb coordsets true" in script
        assert "coordset #1 1,5 " in script
        for segment in sorted(set(ids.tolist())):
            assert f"color #1@@bfactor={segment} " in script
    assert not np.allclose(expected[0], expected[-1], atol=1e-3), "the traversal should move the structure"


def test_traversals_clip_to_the_available_components(tmp_path: Path) -> None:
    structure = Structure(
        coords_A=np.array([[[0.0, 0, 0], [3.8, 0, 0]]]), chain_ids=["A", "A"], residue_numbers=[1, 2],
        insertion_codes=["", ""], residue_names=["GLY", "ALA"], atom_names=["CA", "CA"], amplitudes_e=[27.0, 33.0],
    )  # fmt: skip
    from cryoflex.imaging.formation import ImageFormation
    from cryoflex.model.cryosphere import CryoSphere
    from cryoflex.model.networks import Decoder
    from cryoflex.model.segmentation import Segmentation, SegmentedPart

    segmentation = Segmentation(2, [SegmentedPart("all", np.arange(2), 1)])
    model = CryoSphere(torch.as_tensor(structure.coords_A[0]), torch.tensor([27.0, 33.0]), segmentation,
                       torch.nn.Identity(), Decoder(1, 1, hidden=[4]), ImageFormation(8, 2.0)).eval()
    embedding = embed(np.linspace(-1, 1, 9)[:, None], n_clusters=2)
    paths = write_traversals(model, structure, embedding, tmp_path, n_components=2, n_points=3)
    assert [p.name for p in paths] == ["traversal_pc1.pdb", "traversal_pc1.cxc"]  # L = 1: one component


def test_volumes_superpose_the_decoded_structure(analysed: Analysed, tmp_path: Path) -> None:
    run, embedding = analysed.run, analysed.embedding
    names = [f"cluster_{k + 1}" for k in range(len(embedding.kmeans_centres))]
    paths = write_volumes(run.model, embedding.kmeans_centres, names, tmp_path, box_size_px=32, voxel_size_A=4.0,
                          sigma_A=4.0)
    assert [p.name for p in paths] == ["cluster_1.mrc", "cluster_2.mrc", "cluster_3.mrc"]
    coords = _decode_one_batch(run, embedding.kmeans_centres)
    for path, structure_A in zip(paths, coords, strict=True):
        with mrcfile.open(path) as mrc:
            assert mrc.data.shape == (32, 32, 32)
            assert float(mrc.voxel_size.x) == pytest.approx(4.0)
            assert float(mrc.header.origin.x) == pytest.approx(-64.0)
            expected = gaussian_volume(structure_A.astype(np.float64), run.structure.amplitudes_e, 32, 4.0, 4.0)
            np.testing.assert_allclose(mrc.data, expected, rtol=1e-5, atol=1e-3 * expected.max())
    with pytest.raises(ValueError, match="plain file names"):
        write_volumes(run.model, embedding.kmeans_centres[:1], ["../x"], tmp_path, box_size_px=8, voxel_size_A=4.0,
                      sigma_A=4.0)


def test_segmentation_outputs(analysed: Analysed, tmp_path: Path) -> None:
    run = analysed.run
    G = model_assignment(run.model)
    ids = segment_ids(G)
    np.testing.assert_array_equal(ids, G.argmax(1) + 1)
    rows = segment_table(G, run.structure)
    covered = np.concatenate([np.arange(r.first_index, r.last_index + 1) for r in rows])
    np.testing.assert_array_equal(covered, np.arange(run.structure.n_residues))  # each residue exactly once
    for row in rows:
        assert (ids[row.first_index : row.last_index + 1] == row.segment).all()
        assert row.n_residues == row.last_index - row.first_index + 1
        assert run.structure.residue_numbers[row.first_index] == row.first_residue
    assert all(a.segment != b.segment or a.chain != b.chain for a, b in zip(rows, rows[1:], strict=False))
    table = pd.read_csv(write_segment_table(rows, tmp_path / "segments.csv"))
    assert list(table.columns) == ["segment", "chain", "first_residue", "last_residue", "first_index",
                                   "last_index", "n_residues"]
    assert table["n_residues"].sum() == run.structure.n_residues
    pdb_path = write_segmented_structure(run.structure, G, tmp_path / "segmented.pdb")
    reread = gemmi.read_structure(str(pdb_path))
    np.testing.assert_array_equal([a.b_iso for ch in reread[0] for r in ch for a in r], ids)
    np.testing.assert_allclose(read_structure(pdb_path).coords_A, run.structure.coords_A, atol=1e-3)
    png = segmentation_figure(G, run.structure.residue_numbers, run.structure.chain_ids, tmp_path / "seg.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_segment_table_splits_chains_and_marks_unsegmented_residues() -> None:
    structure = Structure(
        coords_A=np.zeros((1, 6, 3)), chain_ids=["A", "A", "A", "B", "B", "B"], residue_numbers=[5, 6, 7, 1, 2, 3],
        insertion_codes=[""] * 6, residue_names=["GLY"] * 6, atom_names=["CA"] * 6, amplitudes_e=[27.0] * 6,
    )  # fmt: skip
    G = np.array([[1, 0], [0.2, 0.8], [0.1, 0.9], [0, 1], [0, 0], [0, 0]], dtype=float)
    rows = segment_table(G, structure)
    assert [(r.segment, r.chain, r.first_residue, r.last_residue, r.n_residues) for r in rows] == [
        (1, "A", 5, 5, 1), (2, "A", 6, 7, 2), (2, "B", 1, 1, 1), (0, "B", 2, 3, 2)]  # fmt: skip


def test_segment_motions(analysed: Analysed, tmp_path: Path) -> None:
    run, latents = analysed.run, analysed.latents
    motions = segment_motions(run.model, latents, batch_size=7)
    assert motions.angle_deg.shape == motions.translation_A.shape == (40, 3)
    with torch.no_grad():
        rotation_vectors, translations_A = run.model.decoder(torch.as_tensor(latents[:2]))
    np.testing.assert_allclose(motions.angle_deg[:2], np.degrees(rotation_vectors.norm(dim=-1).numpy()), rtol=1e-5)
    np.testing.assert_allclose(motions.translation_A[:2], translations_A.norm(dim=-1).numpy(), rtol=1e-5)
    assert motions.translation_A.max() > 0
    csv_path, png_path = write_segment_motions(motions, analysed.names, tmp_path)
    table = pd.read_csv(csv_path)
    assert list(table.columns) == ["particle", "segment", "angle_deg", "translation_A"]
    assert len(table) == 120 and table["particle"].iloc[:3].tolist() == [analysed.names[0]] * 3
    assert table["segment"].iloc[:4].tolist() == [1, 2, 3, 1]
    np.testing.assert_allclose(table["angle_deg"].to_numpy().reshape(40, 3), motions.angle_deg, rtol=1e-6)
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_two_analyses_give_identical_files(analysed: Analysed, tmp_path: Path) -> None:
    run = analysed.run
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        latents = latent_means(run.model, run.dataset)
        embedding = embed(latents, n_clusters=3, seed=0)
        paths = save_embedding(embedding, analysed.names, out)
        paths += write_traversals(run.model, run.structure, embedding, out, n_points=3)
        paths += write_segment_motions(segment_motions(run.model, latents), analysed.names, out)
        paths.append(write_segment_table(segment_table(model_assignment(run.model), run.structure),
                                         out / "segments.csv"))
        outputs.append(paths)
    assert len(outputs[0]) == 12
    for a, b in zip(*outputs, strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes(), a.name
