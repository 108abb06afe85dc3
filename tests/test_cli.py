"""The command line: help works, unknown input fails without a traceback."""

import json
import subprocess
import sys

import pytest

from cryoflex.cli import build_parser, main


def test_help_lists_subcommands(capsys):
    parser = build_parser()
    help_text = parser.format_help()
    assert "info" in help_text


def test_no_command_prints_help(capsys):
    assert main([]) == 1
    assert "usage" in capsys.readouterr().out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "cryoflex", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "cryoflex" in result.stdout


INFO_FILES = [
    "relion31.star",
    "relion31.v2.star",
    "relion31.6opticsgroups.star",
    "test_starfile.star",
    "cryosparc_P12_J24_001_particles.cs",
    "adk_open.pdb",
    "adk_closed.pdb",
    "pdb1ake.pdb",
    "4akeA_alg_fixed.pdb",
    "mmcif_1ake_chimerax.cif",
    "relion31.mrcs",
    "000000.mrcs",
    "EMD-3197.map",
]


@pytest.mark.parametrize("name", INFO_FILES)
def test_info_json_on_every_supported_file(name, data_dir, capsys):
    assert main(["info", str(data_dir / name), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"].endswith(name)


def test_info_relion_summary_values(data_dir, capsys):
    assert main(["info", str(data_dir / "relion31.6opticsgroups.star"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_particles"] == 139
    assert len(summary["optics_groups"]) == 6


def test_info_images_resolve_through_star(data_dir, capsys):
    assert main(["info", str(data_dir / "relion31.star"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"]["found"] is True
    assert summary["images"]["box_size_px"] == 256


def test_info_structure_chains(data_dir, capsys):
    assert main(["info", str(data_dir / "mmcif_1ake_chimerax.cif"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [(c["chain_id"], c["n_residues"]) for c in summary["chains"]] == [("A", 214), ("B", 214)]


def test_info_relion30_with_amplitude_contrast_option(data_dir, capsys):
    path = data_dir / "FinalRefinement-OriginalParticles-PfCRT.star"
    assert main(["info", str(path), "--amplitude-contrast", "0.1", "--box-size", "300", "--no-images"]) == 0
    assert "relion3.0" in capsys.readouterr().out


def test_info_user_error_has_no_traceback(data_dir, capsys):
    assert main(["info", str(data_dir / "star_edge_cases" / "postprocess.star")]) == 2
    err = capsys.readouterr().err
    assert "postprocess.star" in err
    assert "Traceback" not in err


def test_info_missing_file(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing.star")]) == 2
    assert "file not found" in capsys.readouterr().err
