"""report.html for `cryoflex analyze`: one self-contained page (figures as data URIs, inline CSS, no scripts).

The page opens offline and can be mailed or archived as one file; links to the other outputs are relative, so
they keep working when the output folder is moved as a whole.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from cryoflex.analysis.latent import save_figure
from cryoflex.errors import CryoflexInputError
from cryoflex.io.atomic import atomic_path

logger = logging.getLogger(__name__)

# Keys of a metrics.jsonl line that are bookkeeping or timings, not loss terms.
_NOT_LOSS_TERMS = frozenset(
    {"kind", "epoch", "step", "seconds", "images_per_s", "threads", "noise_variance", "image_scale", "sigma_A"}
)
# Loss terms renamed since older runs were written: old key -> current key (same values).
_RENAMED_TERMS = {"correlation": "one_minus_correlation"}
# Panel titles of terms whose key is not a readable name.
_TERM_LABELS = {"one_minus_correlation": "1 - correlation", "image_nll": "-log p(image | structure), nats"}
# Table cells show floats to this many significant figures (the configuration table shows them exactly).
_SIGNIFICANT_DIGITS = 3
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The files of `cryoflex reconstruct` (analysis/reconstruct.py) that the report shows.
RECONSTRUCT_FSC_CSV = "fsc.csv"
RECONSTRUCT_FSC_JSON = "fsc.json"
RECONSTRUCT_FSC_PNG = "fsc.png"
RECONSTRUCT_BIAS_CSV = "model_bias.csv"
RECONSTRUCT_BIAS_JSON = "model_bias.json"
RECONSTRUCT_BIAS_PNG = "model_bias.png"
RECONSTRUCT_DEFORMED_JSON = "deformed.json"
_FSC_CAPTION = (
    "Gold-standard FSC between the two half-maps of each group (a fixed random half split of the particles), with "
    "the resolutions where it falls below 0.143 and 0.5; maps reconstructed from the particle images"
)
_BIAS_CAPTION = (
    "Model-bias check: mean FSC (up to the consensus resolution) of each group's map reconstructed from the images "
    "(rows) against the mean map of each group's decoded structures (columns); the learned motion is supported by "
    "the data when each row is highest on the diagonal"
)
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; max-width: 50em; padding-top: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


@dataclass(frozen=True)
class ReportSection:
    """A heading and its figures, each (title, PNG path), shown in order."""

    title: str
    figures: Sequence[tuple[str, Path]] = field(default_factory=list)


# ------------------------------------------------------------ training curves


def read_metrics(metrics_path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, one dict per line (blank lines and a cut-off last line skipped).

    Terms of older runs come back under their current names ("correlation" as "one_minus_correlation": the value
    was always 1 - correlation), so old and new runs plot alike.
    """
    path = Path(metrics_path)
    if not path.is_file():
        raise CryoflexInputError(path, "file not found", fix="give the folder of a cryoflex train run")
    records = []
    lines = path.read_text().splitlines()
    last = max((number for number, line in enumerate(lines, start=1) if line.strip()), default=0)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == last:  # a run killed while writing its last line
                logger.warning("%s: skipping the incomplete last line %d", path, number)
                continue
            raise CryoflexInputError(
                path, f"line {number} is not JSON ({error})", fix="remove the damaged line", field=f"line {number}"
            ) from None
        if not isinstance(record, dict) or record.get("kind") not in ("step", "epoch") or "step" not in record:
            raise CryoflexInputError(
                path,
                f"line {number} is not a metrics record ({{'kind': 'step'|'epoch', 'step': ..., ...}})",
                fix="remove the damaged line",
                field=f"line {number}",
            )
        records.append({_current_name(key, record): value for key, value in record.items()})
    return records


def _current_name(key: str, record: Mapping[str, Any]) -> str:
    """The current name of a term of an older run (unless the record already holds the current one)."""
    new = _RENAMED_TERMS.get(key)
    return key if new is None or new in record else new


def _loss_terms(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Numeric loss terms in order of first appearance."""
    terms: dict[str, None] = {}
    for record in records:
        for name, value in record.items():
            if name not in _NOT_LOSS_TERMS and isinstance(value, int | float) and not isinstance(value, bool):
                terms.setdefault(name)
    return list(terms)


def _series(records: Sequence[Mapping[str, Any]], kind: str, term: str) -> tuple[list[float], list[float]]:
    points = [(float(r["step"]), float(r[term])) for r in records if r["kind"] == kind and term in r]
    return [p[0] for p in points], [p[1] for p in points]


def training_curves(records: Sequence[Mapping[str, Any]]) -> Figure:
    """One panel per loss term against the step (logged steps as lines, epoch means as dots)."""
    terms = _loss_terms(records)
    columns = min(3, len(terms))
    rows = math.ceil(len(terms) / columns)
    figure = Figure(figsize=(4.2 * columns, 2.8 * rows), layout="constrained")
    for position, term in enumerate(terms):
        axes = figure.add_subplot(rows, columns, position + 1)
        steps, values = _series(records, "step", term)
        axes.plot(steps, values, lw=1, color="tab:blue", label="step")
        steps, values = _series(records, "epoch", term)
        axes.plot(steps, values, "o", ms=4, color="tab:orange", label="epoch mean")
        axes.set_title(_TERM_LABELS.get(term, term))
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if position == 0:
            axes.legend(fontsize="small")
    return figure


def training_curves_figure(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Plot each loss term of RUN/metrics.jsonl against the step into out_png (see training_curves)."""
    path = Path(metrics_path)
    records = read_metrics(path)
    if not _loss_terms(records):
        raise CryoflexInputError(path, "holds no loss values to plot", fix="train for at least one epoch first")
    figure = training_curves(records)
    return save_figure(figure, Path(out_png))


# ------------------------------------------------------------ cryoflex reconstruct


def reconstruction_content(
    directory: str | Path, model_fingerprint: str | None = None, clusters_fingerprint: str | None = None
) -> tuple[list[ReportSection], dict[str, list[dict[str, Any]]]]:
    """The report's section and tables for the results of `cryoflex reconstruct` in `directory` (none when absent):
    the FSC figure, the resolutions table, the model-bias figure and table, and the deformed backprojection's table
    when that reconstruction made one. Results of another model state, or of other k-means clusters, than the
    fingerprints given are not shown: a note says to reconstruct again."""
    directory = Path(directory)
    fsc_json = directory / RECONSTRUCT_FSC_JSON
    if not fsc_json.is_file():
        return [], {}
    fsc = json.loads(fsc_json.read_text())
    stale = None
    if model_fingerprint and fsc.get("model_fingerprint") not in (None, model_fingerprint):
        stale = f"of the model after epoch {fsc.get('epoch')}, another model state than this one's"
    elif clusters_fingerprint and fsc.get("clusters_fingerprint") not in (None, clusters_fingerprint):
        stale = "of other k-means clusters than this analysis's"
    if stale:
        note = f"{directory} holds maps {stale}: run `cryoflex reconstruct` again to see them here"
        return [], {"Density from the particles": [{"note": note}]}
    figures = [(_FSC_CAPTION, directory / RECONSTRUCT_FSC_PNG)]
    tables: dict[str, list[dict[str, Any]]] = {
        "Reconstructions (resolution where the half-map FSC falls below 0.5 and 0.143)": [
            {key: group[key] for key in ("group", "particles", "half_a", "half_b", "resolution_0.5_A",
                                         "resolution_0.143_A")}
            for group in fsc["groups"]
        ]
    }  # fmt: skip
    bias_json = directory / RECONSTRUCT_BIAS_JSON
    if bias_json.is_file():
        bias = json.loads(bias_json.read_text())
        figures.append((f"{_BIAS_CAPTION}. Result: {bias['summary']}", directory / RECONSTRUCT_BIAS_PNG))
        tables["Model-bias check (mean FSC, rows: reconstructed map, columns: structure map)"] = [
            {"map": row_name, **dict(zip(bias["groups"], row, strict=True))}
            for row_name, row in zip(bias["groups"], bias["mean_fsc"], strict=True)
        ]
    deformed_json = directory / RECONSTRUCT_DEFORMED_JSON
    if deformed_json.is_file() and fsc.get("deformed", True):  # an older fsc.json did not record it
        regions = json.loads(deformed_json.read_text())
        title = "Deformed backprojection (half-map FSC 0.143 resolution of the consensus, plain and motion-corrected)"
        tables[title] = [
            {"region": region, "plain_resolution_A": values["plain_resolution_A"],
             "deformed_resolution_A": values["deformed_resolution_A"]}
            for region, values in regions.items()
        ]  # fmt: skip
    return [ReportSection("Density from the particles", figures)], tables


# ------------------------------------------------------------ HTML


def _png_data_uri(title: str, path: Path) -> str:
    data = Path(path).read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"figure {title!r} ({path}) is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as dotted keys, in order."""
    rows: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        rows.extend(_flatten(value, name + ".") if isinstance(value, Mapping) else [(name, value)])
    return rows


def _float_format(values: Sequence[Any]) -> str:
    """Format of a column's floats: fixed decimals that give its smallest non-zero magnitude 3 significant figures
    (so the column lines up: 1.49, 12.30, 0.950), or 3 significant figures each when it spans tiny or huge values."""
    magnitudes = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v) and v != 0.0]
    if not magnitudes:
        return ".0f"
    if min(magnitudes) < 1e-3 or max(magnitudes) >= 1e6:
        return f".{_SIGNIFICANT_DIGITS}g"
    return f".{max(0, _SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(min(magnitudes))))}f"


def _cell(value: Any, float_format: str | None) -> str:
    """A table cell: numbers right-aligned (floats in float_format, None: exactly), None blank, lists as JSON."""
    if isinstance(value, bool) or value is None:
        return f"<td>{'' if value is None else html.escape(str(value).lower())}</td>"
    if isinstance(value, int | float):
        if isinstance(value, float):
            text = repr(value) if float_format is None or not math.isfinite(value) else format(value, float_format)
        else:
            text = str(value)
        return f'<td class="num">{html.escape(text)}</td>'
    text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return f"<td>{html.escape(text)}</td>"


def _table(rows: Sequence[Mapping[str, Any]], *, exact: bool = False) -> str:
    """An HTML table whose columns are the union of the rows' keys, in order of first appearance.

    Floats are rounded per column to 3 significant figures, or shown exactly (shortest round-trip) when `exact`.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row))
    formats = {c: None if exact else _float_format([row.get(c) for row in rows]) for c in columns}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c), formats[c]) for c in columns) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _figures_html(section: ReportSection) -> str:
    parts = [f"<h2>{html.escape(section.title)}</h2>\n"]
    for title, path in section.figures:
        parts.append(
            f'<figure><img src="{_png_data_uri(title, path)}" alt="{html.escape(title)}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>\n"
        )
    return "".join(parts)


def _links_html(out_html: Path, files: Sequence[Path]) -> str:
    items = []
    for path in files:
        relative = Path(os.path.relpath(Path(path).resolve(), out_html.parent.resolve())).as_posix()
        items.append(f'<li><a href="{html.escape(relative)}">{html.escape(relative)}</a></li>')
    return "<h2>Files</h2>\n<ul>\n" + "\n".join(items) + "\n</ul>\n"


def write_report(
    out_html: str | Path,
    *,
    title: str,
    sections: Sequence[ReportSection],
    config: Mapping[str, Any],
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
    files: Sequence[Path] = (),
) -> Path:
    """Write the self-contained report page (figure sections, tables, configuration, file links), atomically."""
    out_html = Path(out_html)
    body = [f"<h1>{html.escape(title)}</h1>\n"]
    body.extend(_figures_html(section) for section in sections)
    for name, rows in tables.items():
        body.append(f"<h2>{html.escape(name)}</h2>\n" + (_table(rows) if rows else "<p>(empty)</p>\n"))
    config_rows = [{"setting": key, "value": value} for key, value in _flatten(config)]
    body.append("<h2>Configuration</h2>\n" + _table(config_rows, exact=True))
    if files:
        body.append(_links_html(out_html, files))
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "".join(body)
        + "</body>\n</html>\n"
    )
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out_html


__all__ = [
    "ReportSection",
    "read_metrics",
    "reconstruction_content",
    "training_curves",
    "training_curves_figure",
    "write_report",
]
