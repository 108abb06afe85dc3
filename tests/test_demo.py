"""`cryoflex demo --quick`: runs end to end, prints computed figures that change with the seed."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cryoflex.cli import main as cli_main
from cryoflex.demo import adk_ensemble


def test_shipped_ensemble_matches_the_trajectory(data_dir: Path) -> None:
    from cryoflex.io.trajectory import read_trajectory

    shipped = adk_ensemble()
    reference = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd")
    np.testing.assert_allclose(shipped.coords_A, reference.coords_A, atol=1e-4)  # stored as float32
    np.testing.assert_array_equal(shipped.amplitudes_e, reference.amplitudes_e)
    np.testing.assert_array_equal(shipped.residue_numbers, reference.residue_numbers)


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", text)]


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[str, Path]]:
    runs = {}
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"demo{seed}")
        import io
        from contextlib import redirect_stdout

        buffer = io.StringIO()
        with redirect_stdout(buffer):
            assert cli_main(["demo", "--quick", "--out", str(out), "--seed", str(seed), "--device", "cpu",
                             "--overwrite"]) == 0  # fmt: skip
        runs[seed] = (buffer.getvalue(), out)
    return runs


@pytest.mark.slow
def test_quick_demo_prints_the_summary_and_writes_the_report(quick_runs: dict[int, tuple[str, Path]]) -> None:
    text, out = quick_runs[0]
    print(text)
    assert "learned segments" in text and "LID-NMP distance" in text and "report:" in text
    found = re.search(r"median (\d+\.\d+) A \(predicting the closed structure for every image: (\d+\.\d+) A", text)
    median, baseline = float(found[1]), float(found[2])
    assert median < 0.75 * baseline  # even the quick run recovers much of the motion
    html = (out / "analysis" / "report.html").read_text()
    assert "Comparison with the truth" in html and html.count("data:image/png;base64,") >= 10


@pytest.mark.slow
def test_figures_are_computed_not_written_in(quick_runs: dict[int, tuple[str, Path]]) -> None:
    first, second = quick_runs[0][0], quick_runs[1][0]
    assert _numbers(first) != _numbers(second)
