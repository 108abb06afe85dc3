"""report.html: one offline page with embedded figures, tables, configuration and links; training curves."""

from __future__ import annotations

import base64
import json
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cryoflex.analysis.latent import PNG_DPI
from cryoflex.analysis.report import (
    ReportSection,
    read_metrics,
    training_curves,
    training_curves_figure,
    write_report,
)
from cryoflex.errors import CryoflexInputError

_PNG = b"\x89PNG\r\n\x1a\n"
_TERMS = ("total", "one_minus_correlation", "latent_kl", "segmentation_kl", "continuity", "clash")


class _Page(HTMLParser):
    """Collects what the tests look at: tags seen, <img> sources, link targets and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.links: list[str | None] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        if tag == "a":
            self.links.append(dict(attrs).get("href"))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(_PNG)
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def _metrics(path: Path, terms: tuple[str, ...] = _TERMS) -> Path:
    """Two epochs of 3 steps, logged at steps 2 and 3 and per epoch, with timings that are not loss terms."""
    lines = []
    for epoch in (1, 2):
        for step in (3 * epoch - 1, 3 * epoch):
            values = {term: 1.0 / (step + k) for k, term in enumerate(terms)}
            lines.append({"kind": "step", "epoch": epoch, "step": step, **values})
        values = {term: 1.0 / (3 * epoch + k + 0.5) for k, term in enumerate(terms)}
        lines.append(
            {"kind": "epoch", "epoch": epoch, "step": 3 * epoch, **values, "seconds": 4.2, "images_per_s": 9.5}
        )
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return path


def test_training_curves_plot_one_panel_per_loss_term(tmp_path: Path) -> None:
    metrics = _metrics(tmp_path / "metrics.jsonl")
    assert len(read_metrics(metrics)) == 6
    png = training_curves_figure(metrics, tmp_path / "figures" / "training_curves.png")
    # 6 terms -> 3 x 2 panels of 4.2 x 2.8 in; counting seconds and images_per_s would give 3 rows.
    assert _png_size(png) == (round(3 * 4.2 * PNG_DPI), round(2 * 2.8 * PNG_DPI))
    assert [p.name for p in png.parent.iterdir()] == ["training_curves.png"]


def test_runs_that_logged_correlation_plot_as_one_minus_correlation(tmp_path: Path) -> None:
    """Older runs wrote 1 - correlation under the key "correlation": it reads and plots as the current term."""
    legacy_terms = tuple("correlation" if term == "one_minus_correlation" else term for term in _TERMS)
    legacy, current = _metrics(tmp_path / "legacy.jsonl", legacy_terms), _metrics(tmp_path / "current.jsonl")
    assert read_metrics(legacy) == read_metrics(current)
    assert all("correlation" not in record for record in read_metrics(legacy))
    for path in (legacy, current):
        titles = [axes.get_title() for axes in training_curves(read_metrics(path)).axes]
        assert titles == ["total", "1 - correlation", "latent_kl", "segmentation_kl", "continuity", "clash"]


def test_damaged_metrics_are_reported_with_their_line(tmp_path: Path) -> None:
    metrics = _metrics(tmp_path / "metrics.jsonl")  # 6 records, then a blank line 7
    good = metrics.read_text()
    metrics.write_text(good + '{"kind": "step", "ste\n')  # a run killed while writing line 8
    assert len(read_metrics(metrics)) == 6
    metrics.write_text(good + '{"kind": "step", "ste\n' + good)
    with pytest.raises(CryoflexInputError, match="line 8 is not JSON"):
        training_curves_figure(metrics, tmp_path / "curves.png")
    metrics.write_text(good + '{"kind": "train", "step": 9}\n')
    with pytest.raises(CryoflexInputError, match="line 8 is not a metrics record"):
        read_metrics(metrics)
    (tmp_path / "timings.jsonl").write_text('{"kind": "epoch", "epoch": 1, "step": 3, "seconds": 2.0}\n')
    with pytest.raises(CryoflexInputError, match="no loss values"):
        training_curves_figure(tmp_path / "timings.jsonl", tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_report_is_one_offline_page_with_everything(tmp_path: Path) -> None:
    out = tmp_path / "analysis"
    curves = training_curves_figure(_metrics(tmp_path / "metrics.jsonl"), out / "figures" / "curves.png")
    other = out / "figures" / "pca.png"
    other.write_bytes(curves.read_bytes()[:-1] + b"\x82")  # a different, still PNG-signed file
    config = {
        "particles": "data/particles.star",
        "latent_dim": 8,
        "tau": 20.5,
        "parts": ["A:1-120:3", "B:4"],
        "ctf": None,
        "cache": True,
        "optim": {"learning_rate": 0.0003},
    }
    tables = {
        "Segments": [{"segment": 1, "first residue": "A:1", "residues": 120}, {"segment": 2, "first residue": "A:121"}],
        "Evaluation <summary>": [{"metric": "rmsd_A", "value": 1.23456789}],
    }
    written = [out / "per_particle_coords.npy", out / "subsets" / "cluster_1.star"]
    html = write_report(
        out / "report.html",
        title="cryoflex analyze: run <a&b>",
        sections=[
            ReportSection("Training", [("Training curves", curves)]),
            ReportSection("Latent space", [("PCA", other), ("PCA again", other)]),
        ],
        config=config,
        tables=tables,
        files=written,
    )
    page = _parse(html)
    assert "script" not in page.tags and "link" not in page.tags and "style" in page.tags
    assert "://" not in html.read_text(encoding="utf-8")  # nothing fetched from the network (base64 has no ':')
    assert len(page.images) == 3
    sources = [image["src"] or "" for image in page.images]
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    decoded = [base64.b64decode(src.split(",", 1)[1], validate=True) for src in sources]
    assert decoded == [curves.read_bytes(), other.read_bytes(), other.read_bytes()]
    assert [image["alt"] for image in page.images] == ["Training curves", "PCA", "PCA again"]
    text = [chunk.strip() for chunk in page.text if chunk.strip()]
    assert "cryoflex analyze: run <a&b>" in text  # escaped in the file, read back as written
    for expected in (
        "particles",
        "data/particles.star",
        "latent_dim",
        "8",
        "20.5",
        '["A:1-120:3", "B:4"]',
        "true",
        "optim.learning_rate",
        "0.0003",
        "Segments",
        "A:121",
        "Evaluation <summary>",
        "1.23",
    ):
        assert expected in text, expected
    assert page.links == ["per_particle_coords.npy", "subsets/cluster_1.star"]
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.html"]  # no temporary file left


def test_table_numbers_are_rounded_per_column_and_the_configuration_is_exact(tmp_path: Path) -> None:
    tables = {
        "Against the truth": [
            {"median RMSD (A)": 1.4904712, "correlation": 0.95012, "images": 40, "tiny": 1.234e-5, "none": None},
            {"median RMSD (A)": 12.3, "correlation": -0.1234, "images": 7, "tiny": 2.0, "none": float("nan")},
        ]
    }
    config = {"learning_rate": 0.0003, "sigma_A": 1.4904712}
    page = _parse(write_report(tmp_path / "report.html", title="t", sections=[], config=config, tables=tables))
    text = [chunk.strip() for chunk in page.text if chunk.strip()]
    for expected in ("1.49", "12.30", "0.950", "-0.123", "40", "1.23e-05", "2", "nan", "0.0003", "1.4904712"):
        assert expected in text, expected
    assert "1.49047" not in text and "0.95012" not in text


def test_report_refuses_a_figure_that_is_not_png(tmp_path: Path) -> None:
    fake = tmp_path / "map.png"
    fake.write_bytes(b"MRC not a png")
    with pytest.raises(ValueError, match="not a PNG"):
        write_report(
            tmp_path / "report.html", title="t", sections=[ReportSection("s", [("map", fake)])], config={}, tables={}
        )
    assert not (tmp_path / "report.html").exists()
