"""benchmarks/train_profile.py runs end to end at a tiny size (it is not otherwise exercised, and once went stale)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
STAGES = ("data read", "encoder", "segmentation", "decoder", "deformation", "projector", "CTF", "losses", "optimiser")


def test_train_profile_times_every_stage_and_the_whole_step(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    command = [sys.executable, str(BENCHMARKS / "train_profile.py"), "--rows", "214:64:8:3", "--repeats", "1",
               "--threads", "1", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert tuple(row["stages_ms"]) == STAGES and all(value > 0 for value in row["stages_ms"].values())
    assert row["step_ms"] > 0 and row["x_projector"] == row["step_ms"] / row["stages_ms"]["projector"]
    assert row["encoder_box_px"] == 32 and row["encoder_full_box_ms"] > 0  # the default reads half the 64 px box


def test_deformation_bands_benchmark_runs_and_bands_hold_fewer_residues(tmp_path: Path) -> None:
    out = tmp_path / "bands.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "deformation_bands.py"), "--rows", "4:60:6", "--repeats", "1",
                    "--rounds", "1", "--out", str(out)], check=True, capture_output=True)  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert row["dense_residues"] == 360
    assert 60 <= row["band_residues"] < 180  # every residue in some band, each band about one segment
    assert row["dense_ms"] > 0 and row["banded_ms"] > 0 and row["segment_by_segment_ms"] > 0 and row["layers_ms"] > 0
    assert row["deform_uses"] == "layers"  # 4 structures of 60 residues
