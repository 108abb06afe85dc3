"""benchmarks/gpu.sh and its summariser: the refusal without CUDA, the epoch estimate, and the CPU smoke pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TRAIN_FILES = (
    "train_fp32", "train_bf16", "train_bf16_default_objective", "train_fp32_compiled", "train_bf16_compiled",
)  # fmt: skip


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run with this interpreter first on PATH (gpu.sh falls back to `python` where the checkout has no .venv)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(command, capture_output=True, text=True, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, gpu.sh would run the full benchmark")
def test_gpu_sh_refuses_to_run_without_cuda(tmp_path: Path) -> None:
    result = _run(["bash", str(BENCHMARKS / "gpu.sh"), str(tmp_path / "out")])
    assert result.returncode == 1
    assert "CUDA is not available" in result.stderr and "--cpu-smoke" in result.stderr
    assert not (tmp_path / "out").exists()


def test_summary_estimates_the_epoch_from_the_fastest_row_of_each_objective(tmp_path: Path) -> None:
    def row(residues: int, box: int, batch: int, images_per_s: float) -> dict:
        return dict(residues=residues, box_px=box, batch=batch, ms_per_step=1000 * batch / images_per_s,
                    images_per_s=images_per_s, cuda_peak_allocated_MB=100.0)  # fmt: skip

    runs = [
        ("train_fp32", "fp32", False, False, 2000.0), ("train_bf16", "bf16", True, False, 5450.0),
        ("train_bf16_default_objective", "bf16", False, True, 9000.0),  # faster: the original's must not see it
    ]  # fmt: skip
    for name, precision, compile_, default_objective, rate in runs:
        result = dict(device="cuda", device_name="GPU", torch="2", precision=precision, compile=compile_,
                      default_objective=default_objective,
                      rows=[row(13941, 128, 128, rate), row(214, 64, 32, 9e4)])  # fmt: skip
        if name == "train_bf16":  # a row that failed is listed, not estimated from
            result["rows"].append(dict(residues=13941, box_px=128, batch=512, segments=6,
                                       error="Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory."))  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    result = _run([sys.executable, str(BENCHMARKS / "gpu_summary.py"), str(tmp_path)])
    assert result.returncode == 0, result.stderr
    original, default, failed = result.stdout.splitlines()[-3:]
    assert failed == "Failed: train_bf16 13941:128:512:6: torch.OutOfMemoryError: CUDA out of memory."
    assert "original objective" in original and "5450.0 img/s" in original and "bf16, compile on" in original
    assert "= 1.0 min per epoch" in original and "meets the 2-min target" in original  # 327,000 / 5,450 img/s = 60 s
    assert "default objective" in default and "9000.0 img/s" in default and "compile off" in default
    assert "= 0.6 min per epoch" in default and "meets the 2-min target" in default


@pytest.mark.slow
def test_cpu_smoke_writes_every_result(tmp_path: Path) -> None:
    """The whole gpu.sh pipeline on CPU at tiny sizes (about 4 minutes, mostly torch.compile)."""
    result = _run(["bash", str(BENCHMARKS / "gpu.sh"), "--cpu-smoke", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-4000:]
    for name in TRAIN_FILES:
        rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        assert len(rows) == 2 and all(row["images_per_s"] > 0 for row in rows)
        draws = 8 if name.endswith("default_objective") else 1
        assert all(row["draws_per_image"] == draws for row in rows), name
    projector = json.loads((tmp_path / "projector.json").read_text())["rows"]
    assert projector and all(row["forward_backward_images_per_s"] > 0 for row in projector)
    reconstruct = json.loads((tmp_path / "reconstruct.json").read_text())["rows"]
    assert reconstruct and all(row["insert_particles_per_s"] > 0 for row in reconstruct)
    tf32 = json.loads((tmp_path / "tf32_rendering.json").read_text())["rows"]
    assert {row["rendering"] for row in tf32} == {"band_limited", "point"}
    assert all(row["tf32"] == "emulated" and row["float32_image"] < row["tf32_image"] < 1e-3 for row in tf32)
    summary = (tmp_path / "summary.txt").read_text()
    assert "TF32 projection products" in summary
    for objective in ("original", "default"):
        assert f"Epoch estimate, {objective} objective: 327,000 images at" in summary
