"""The command line: help works, unknown input fails without a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryoflex.cli import build_parser, main
from cryoflex.errors import CryoflexInputError
from cryoflex.io.metadata import read_metadata, write_cryodrgn_pkl


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


def test_info_relion30_with_amplitude_contrast_option(data_dir, tmp_path, capsys):
    path = data_dir / "FinalRefinement-OriginalParticles-PfCRT.star"
    assert main(["info", str(path), "--amplitude-contrast", "0.1", "--box-size-px", "300", "--no-images"]) == 0
    assert "relion3.0" in capsys.readouterr().out
    path = data_dir / "relion31.star"  # states its pixel size: an option that disagrees names the option to leave out
    assert main(["info", str(path), "--pixel-size-A", "123", "--no-images"]) == 2
    assert "leave out --pixel-size-A, or correct the file" in capsys.readouterr().err
    table = starfile.read(data_dir / "FinalRefinement-OriginalParticles-PfCRT.star")
    path = tmp_path / "no_pixel.star"  # states no pixel size: a bad option is the option's fault, not a row's
    starfile.write(table.drop(columns=["rlnDetectorPixelSize", "rlnMagnification"]), path)
    for flags, expected in ((["--pixel-size-A", "-4", "--amplitude-contrast", "0.1"], "--pixel-size-A -4"),
                            (["--pixel-size-A", "1.2", "--amplitude-contrast", "1.5"], "--amplitude-contrast 1.5")):
        assert main(["info", str(path), *flags, "--box-size-px", "300", "--no-images"]) == 2
        err = capsys.readouterr().err
        assert expected in err and "particle row" not in err, flags


def test_info_user_error_has_no_traceback(data_dir, capsys):
    assert main(["info", str(data_dir / "star_edge_cases" / "postprocess.star")]) == 2
    err = capsys.readouterr().err
    assert "postprocess.star" in err
    assert "Traceback" not in err


def test_info_missing_file(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing.star")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_info_truncated_stack_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "five.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.ones((5, 8, 8), dtype=np.float32))
    with path.open("r+b") as handle:
        handle.truncate(1024 + 5 * 8 * 8 * 4 // 2)  # 2.5 images
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "truncated" in err and "re-extract or re-copy" in err
    assert f"({1024 + 5 * 8 * 8 * 4} bytes)" in err and f"{1024 + 640} bytes" in err


def test_info_particles_option_is_a_particle_file_and_stack_goes_with_stack(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "--particles", str(data_dir / "relion31.star"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_particles"] == 5
    write_cryodrgn_pkl(tmp_path / "poses.pkl", tmp_path / "ctf.pkl", read_metadata(data_dir / "relion31.star"))
    stack = data_dir / "relion31.mrcs"
    command = ["info", "--particles", str(tmp_path / "poses.pkl"), "--ctf", str(tmp_path / "ctf.pkl")]
    assert main([*command, "--stack", str(stack), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "cryodrgn" and summary["images"]["found"] and summary["has_shifts"]
    assert main(["info", "--particles", str(stack)]) == 2
    assert "--stack" in capsys.readouterr().err
    assert main(["info", str(stack), "--particles", str(data_dir / "relion31.star")]) == 2
    assert "not both" in capsys.readouterr().err


def test_info_box_and_pixel_size_options(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = ["--pixel-size-A", "1.035", "--box-size-px", "300", "--json"]
    assert main(["info", str(data_dir / "pose.star.pkl"), *options]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["box_size_px"] == 300 and summary["pixel_size_A"] == 1.035 and summary["has_shifts"]


def test_info_summarises_rows_sharing_an_image(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = starfile.read(data_dir / "relion31.star", always_dict=True)
    blocks["particles"] = pd.concat([blocks["particles"], blocks["particles"].iloc[[0, 0, 2]]], ignore_index=True)
    path = tmp_path / "expanded.star"
    starfile.write(blocks, path)
    assert main(["info", str(path), "--no-images"]) == 0
    out = capsys.readouterr().out
    assert "n particles: 8" in out and "n rows sharing an image: 5" in out and "n shared images: 2" in out


def test_building_the_parser_does_not_import_torch():
    """`cryoflex --help` should not wait seconds for torch: command modules import it when they run."""
    code = "import sys; from cryoflex.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_simulate_flags_cover_the_simulation_config():
    """Every SimulationConfig field has its flag (the noise spectrum's reads a file), and the help states
    SimulationConfig's default."""
    import re
    from dataclasses import fields

    from cryoflex.cli.simulate import _SIMULATION_FLAGS
    from cryoflex.simulate import SimulationConfig

    own_flags = {"n_images", "save_clean", "noise_spectrum"}
    assert set(_SIMULATION_FLAGS) | own_flags == {f.name for f in fields(SimulationConfig)}
    defaults = SimulationConfig(n_images=1)
    for name, (kind, help_text) in _SIMULATION_FLAGS.items():
        stated = re.search(r"\(default ([^)]+)\)", help_text)
        assert stated is not None and kind(stated.group(1)) == getattr(defaults, name), name
    args = build_parser().parse_args(["simulate", "--out", "x", "--n-images", "3", "--box-size-px", "48"])
    assert args.box_size_px == 48 and args.pixel_size_A is None


def test_commands_share_flag_names():
    """--particles is a metadata file and --stack an image stack; every computing command describes --device alike."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    train = {flag for action in commands["train"]._actions for flag in action.option_strings}
    assert {"--particles", "--stack", "--ctf", "--duplicate-images"} <= train
    helps = {
        name: next(a.help for a in commands[name]._actions if "--device" in a.option_strings)
        for name in ("train", "analyze", "eval", "demo", "reconstruct")
    }
    assert len(set(helps.values())) == 1, helps


@pytest.mark.parametrize(("flags", "expected"), [([], True), (["--mean-segmentation"], False)])
def test_train_samples_the_segmentation_unless_asked_for_its_mean(flags: list[str], expected: bool) -> None:
    from cryoflex.cli.train import resolve_config

    args = build_parser().parse_args(["train", "--out", "run", "--particles", "p.star", "--structure", "s.pdb", *flags])
    assert resolve_config(args).sample_segmentation is expected


def test_an_out_that_is_a_file_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    afile = tmp_path / "afile"
    afile.write_text("kept")
    run = str(tmp_path / "run")
    for command in (["analyze", run], ["eval", run, "--truth", str(afile)], ["reconstruct", run, "--all"],
                    ["demo"], ["train", "--particles", "p.star", "--structure", "s.pdb"]):  # fmt: skip
        assert main([*command, "--out", str(afile)]) == 2, command
        err = capsys.readouterr().err
        assert "writes a directory" in err and "Traceback" not in err, command
    assert afile.read_text() == "kept"


def test_an_out_under_a_file_a_bad_seed_and_negative_threads_are_refused_before_anything_runs(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each used to end in a traceback (NotADirectoryError, numpy's or torch's seed errors) or to pass silently."""
    afile = tmp_path / "afile"
    afile.write_text("kept")
    run = str(tmp_path / "run")
    simulate = ["simulate", "--topology", str(data_dir / "adk.psf"), "--trajectory", str(data_dir / "adk_dims.dcd"),
                "--n-images", "4"]  # fmt: skip
    cases = [
        ([*simulate, "--out", str(afile / "sub")], "is a file, so no directory can be made under it"),
        (["analyze", run, "--out", str(afile / "sub" / "deeper")], "is a file, so no directory can be made under it"),
        ([*simulate, "--out", str(tmp_path / "sim"), "--seed", "-1"], "give a seed from 0 to 2^63 - 1"),
        (["reconstruct", run, "--seed", str(2**64)], "give a seed from 0 to 2^63 - 1"),
        (["analyze", run, "--datadir", str(tmp_path / "nowhere")], "give the folder that holds the particle stacks"),
        (["train", "--particles", "p.star", "--structure", "s.pdb", "--out", run, "--datadir", str(afile)],
         "give the folder that holds the particle stacks"),
        ([*simulate, "--out", str(tmp_path / "sim"), "--threads", "-1"], "give 0 (automatic) or a number of threads"),
        (["simulate", "--topology", str(data_dir / "adk.psf"), "--n-images", "4", "--out", str(tmp_path / "sim")],
         "--topology was given without --trajectory"),
    ]  # fmt: skip
    for command, expected in cases:
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, command
    assert afile.read_text() == "kept" and not (tmp_path / "sim").exists()


def test_verbose_is_taken_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    assert parser.parse_args(["-v", "info", "x.star"]).verbose
    assert parser.parse_args(["info", "x.star", "-v"]).verbose
    assert not parser.parse_args(["info", "x.star"]).verbose


def test_info_on_a_directory_and_analyze_at_epoch_zero_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", str(tmp_path)]) == 2
    assert "a directory, not a file" in capsys.readouterr().err
    from cryoflex.train.checkpoint import find_checkpoint

    with pytest.raises(CryoflexInputError, match="epochs are counted from 1"):
        find_checkpoint(tmp_path, -1)


def test_an_unknown_option_is_reported_with_the_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["analyze", "run", "--bogus"])
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert "cryoflex analyze: error: unrecognized arguments: --bogus" in message and "--posterior-samples" in message
