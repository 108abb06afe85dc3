"""Recovery of the AdK motion across SNRs and dataset sizes, against the best constant predictions (issue: low SNR).

Run: .venv/bin/python benchmarks/recovery_snr.py [--snr 0.1 0.01 0.003 0.001 0.0003] [--n-images 10000 50000]
     [--epochs 20] [--set NAME=VALUE ...] [--out benchmarks/results/recovery_snr.json]
     .venv/bin/python benchmarks/recovery_snr.py --replot RESULTS.json (the figure again, RESULTS.png, from the first
     run of each SNR and size in a JSON of recovery_adk.py rows; rows of other particles are left out)
Each (SNR, size) is one run of benchmarks/recovery_adk.py (the DIMS AdK trajectory, 64 px at 2 A/px, trained at
32 px, closed state as the nominal structure, default settings unless --set). Prints the table, writes JSON and a
figure of median RMSD and LID-NMP distance correlation against SNR (benchmarks/results/recovery_snr.png).
A sound estimator is below both oracle constants at every SNR. The full grid takes hours on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import yaml
from recovery_adk import print_table, run_recovery

from cryoflex.io.atomic import write_text_atomic


def figure(rows: list[dict], path: Path) -> None:
    """Median RMSD (with the constant predictions) and distance correlation against SNR, one line per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for n_images in sorted({row["n_images"] for row in rows}):
        chosen = sorted((row for row in rows if row["n_images"] == n_images), key=lambda row: row["snr"])
        snrs = [row["snr"] for row in chosen]
        left.plot(snrs, [row["median_rmsd_A"] for row in chosen], "o-", label=f"cryoflex, {n_images:,} images")
        right.plot(snrs, [row["distance_correlation"] for row in chosen], "o-", label=f"{n_images:,} images")
    # the constant predictions and bounds of the size run at the most SNRs (each size has its own images)
    sizes = [row["n_images"] for row in rows]
    reference = max(set(sizes), key=sizes.count)
    ordered = sorted((row for row in rows if row["n_images"] == reference), key=lambda row: row["snr"])
    snrs = [row["snr"] for row in ordered]
    for key, label, style in (("baseline_median_rmsd_A", "nominal for every image", ":"),
                              ("ensemble_mean_median_rmsd_A", "mean structure (oracle)", "--"),
                              ("best_frame_median_rmsd_A", "best single frame (oracle)", "-.")):  # fmt: skip
        left.plot(snrs, [row[key] for row in ordered], style, color="grey", label=label)
    if all("bayes_median_rmsd_A" in row for row in ordered):  # the exact posterior over the true frames
        left.plot(snrs, [row["bayes_median_rmsd_A"] for row in ordered], ":", color="black", label="Bayes bound")
        bayes_r = [row["bayes_distance_correlation"] for row in ordered]
        right.plot(snrs, bayes_r, ":", color="black", label="Bayes bound")
    if all("rigid_floor_median_rmsd_A" in row for row in ordered):  # the learned segmentation's own limit
        floors = [row["rigid_floor_median_rmsd_A"] for row in ordered]
        left.plot(snrs, floors, "--", color="black", label="rigid floor of the learned segments")
    for axis, ylabel in ((left, "median per-image C-alpha RMSD (A)"), (right, "LID-NMP distance correlation")):
        axis.set_xscale("log")
        axis.set_xlabel("SNR")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(results: Path) -> None:
    """The figure of a JSON of recovery_adk.py rows (RESULTS.png): the first row of each SNR and size among those of
    the benchmark's own particles (the ones that carry the Bayes bound), so repeated seeds do not zigzag the lines."""
    rows, seen = [], set()
    for row in json.loads(results.read_text())["rows"]:
        key = (row["snr"], row["n_images"])
        if "bayes_median_rmsd_A" in row and key not in seen:
            seen.add(key)
            rows.append(row)
    figure(rows, results.with_suffix(".png"))
    print(f"wrote {results.with_suffix('.png')} from {len(rows)} runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snr", type=float, nargs="+", default=[0.1, 0.01, 0.003, 0.001, 0.0003])
    parser.add_argument("--n-images", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", help="training settings (YAML values)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cryoflex_recovery_snr"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recovery_snr.json"))
    parser.add_argument("--replot", type=Path, metavar="RESULTS.json", help="only redraw the figure of these rows")
    args = parser.parse_args()
    if args.replot is not None:
        replot(args.replot)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = {name: yaml.safe_load(value) for name, value in (item.split("=", 1) for item in args.set)}
    rows = []
    for n_images in args.n_images:
        for snr in args.snr:
            work = args.work / f"n{n_images}_snr{snr}"
            shutil.rmtree(work, ignore_errors=True)
            row = run_recovery(
                work, snr=snr, n_images=n_images, epochs=args.epochs, downsample=32,
                train_overrides=settings, progress=False,
            )  # fmt: skip
            rows.append(row)
            write_text_atomic(args.out, json.dumps({"settings": settings, "rows": rows}, indent=1))
    print_table(rows)
    figure(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
