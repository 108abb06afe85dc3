"""Summary of a benchmarks/gpu.sh output folder: one table per benchmark and the EMPIAR-10180-sized epoch estimate.

Run: .venv/bin/python benchmarks/gpu_summary.py OUTDIR [--epoch-row 13941:128]
Reads OUTDIR/train_*.json (train_throughput.py, one file per precision, compile setting and objective), projector.json,
reconstruct.json and tf32_rendering.json, whichever are there. The epoch estimate is EPOCH_IMAGES / the best images/s
measured for the training step at --epoch-row's residues and box (any batch, precision, compile), once for each
objective timed (the original's, one draw per image; training's default, 8 draws): step time only, without the
validation pass, checkpoints or the one-off compilation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EPOCH_IMAGES = 327_000  # EMPIAR-10180: 327,000 particles of a 13,941-residue complex, trained at 128 px
TARGET_EPOCH_MIN = 2.0  # on one H100-class GPU
OBJECTIVES = {False: "original", True: "default"}  # train_throughput.py without and with --default-objective


def parse_size(spec: str) -> tuple[int, int]:
    """'RESIDUES:BOX_PX' -> (residues, box)."""
    values = [int(value) for value in spec.split(":")]
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{spec!r}: use RESIDUES:BOX_PX")
    return values[0], values[1]


def _load(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _cuda_MB(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:>8.0f}" if key in row else f"{'-':>8}"


def train_rows(out: Path) -> list[dict[str, Any]]:
    """Every training-step row of the folder with its file's precision, compile setting and objective, by size."""
    rows = []
    for path in out.glob("train_*.json"):
        result = _load(path)
        for row in result["rows"]:
            if "error" in row:  # a failed row (train_throughput.py records it and goes on)
                continue
            objective = OBJECTIVES[bool(result.get("default_objective", False))]
            rows.append(dict(row, precision=result["precision"], compile=result["compile"], objective=objective))
    order = list(OBJECTIVES.values())
    return sorted(rows, key=lambda r: (
        -r["residues"], r["box_px"], r["batch"], order.index(r["objective"]), r["compile"], r["precision"] != "fp32",
    ))  # fmt: skip


def failed_rows(out: Path) -> list[str]:
    """A line for each training row that failed, with the last line of its error (out of memory, say)."""
    lines = []
    for path in sorted(out.glob("train_*.json")):
        for row in _load(path)["rows"]:
            if "error" in row:
                last = row["error"].strip().splitlines()[-1] if row["error"].strip() else "no message"
                size = ":".join(str(row[key]) for key in ("residues", "box_px", "batch", "segments"))
                lines.append(f"Failed: {path.stem} {size}: {last}")
    return lines


def print_train(rows: list[dict[str, Any]]) -> None:
    print("Training step (train_throughput.py): mean of the timed steps after the warm-up steps")
    print(
        f"residues  box batch objective precision compile  ms/step    img/s  cuda MB  {EPOCH_IMAGES:,}-image epoch min"
    )
    for row in rows:
        print(
            f"{row['residues']:>8} {row['box_px']:>4} {row['batch']:>5} {row['objective']:>9} {row['precision']:>9} "
            f"{'yes' if row['compile'] else 'no':>7} {row['ms_per_step']:>8.1f} {row['images_per_s']:>8.1f} "
            f"{_cuda_MB(row, 'cuda_peak_allocated_MB')} {EPOCH_IMAGES / row['images_per_s'] / 60:>12.1f}"
        )


def print_projector(result: dict[str, Any]) -> None:
    print(f"Projector (projector.py, no CTF): matmul rate {result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print("residues  box batch  fwd img/s  fwd+bwd img/s  x floor  cuda MB")
    for row in result["rows"]:
        print(
            f"{row['residues']:>8} {row['box_px']:>4} {row['batch']:>5} {row['forward_images_per_s']:>10.0f} "
            f"{row['forward_backward_images_per_s']:>14.0f} {row['forward_over_floor']:>8.2f} "
            f"{_cuda_MB(row, 'cuda_peak_allocated_MB')}"
        )


def print_reconstruct(result: dict[str, Any]) -> None:
    print("Reconstruction (reconstruct.py, FourierAccumulator.insert, batch 64)")
    print("box padding  insert part/s  x floor  volume s  peak MB")
    for row in result["rows"]:
        print(
            f"{row['box_px']:>3} {row['padding']:>7} {row['insert_particles_per_s']:>14.1f} "
            f"{row['insert_over_floor']:>8.1f} {row['volume_s']:>9.2f} {row['peak_MB']:>8.0f}"
        )


def print_tf32(result: dict[str, Any]) -> None:
    print("TF32 projection products (tf32_rendering.py): relative error against float64")
    print(f"{'rendering':>12} {'row':>12} {'fp32 image':>10} {'tf32 image':>10} {'fp32 grad':>9} {'tf32 grad':>9} "
          f"{'tf32 / noise at SNR 0.1':>23}  tf32")  # fmt: skip
    for row in result["rows"]:
        size = f"{row['residues']}:{row['box_px']}:{row['images']}"
        print(
            f"{row['rendering']:>12} {size:>12} {row['float32_image']:>10.1e} {row['tf32_image']:>10.1e} "
            f"{row['float32_gradient']:>9.1e} {row['tf32_gradient']:>9.1e} "
            f"{row['tf32_image_over_noise_at_snr']:>23.1e}  {row['tf32']}"
        )


def epoch_estimate(rows: list[dict[str, Any]], residues: int, box_px: int, objective: str) -> str:
    """The estimate line of one objective: the fastest training row at this size, and the epoch time at its rate."""
    size = (residues, box_px)
    matching = [row for row in rows if (row["residues"], row["box_px"]) == size and row["objective"] == objective]
    if not matching:
        return f"Epoch estimate, {objective} objective: no training row at {residues:,} residues, {box_px} px"
    best = max(matching, key=lambda row: row["images_per_s"])
    minutes = EPOCH_IMAGES / best["images_per_s"] / 60
    verdict = "meets" if minutes <= TARGET_EPOCH_MIN else "misses"
    return (
        f"Epoch estimate, {objective} objective: {EPOCH_IMAGES:,} images at {best['images_per_s']:.1f} img/s "
        f"({residues:,} residues, {box_px} px, batch {best['batch']}, {best['precision']}, "
        f"compile {'on' if best['compile'] else 'off'}) "
        f"= {minutes:.1f} min per epoch (step time only); {verdict} the {TARGET_EPOCH_MIN:g}-min target"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder gpu.sh wrote")
    parser.add_argument(
        "--epoch-row", type=parse_size, default=(13941, 128), help="RESIDUES:BOX_PX of the epoch estimate"
    )
    args = parser.parse_args()
    train = train_rows(args.out)
    projector, reconstruct = args.out / "projector.json", args.out / "reconstruct.json"
    sources = sorted(args.out.glob("train_*.json")) + [path for path in (projector, reconstruct) if path.exists()]
    if not sources:
        sys.exit(f"no benchmark results in {args.out}")
    first = _load(sources[0])  # reconstruct.json names the device under "machine"
    print(
        f"== GPU benchmark summary: {args.out}, device {first['device']} "
        f"({first.get('device_name') or first.get('machine')}), torch {first['torch']} =="
    )
    if train:
        print_train(train)
    if projector.exists():
        print_projector(_load(projector))
    if reconstruct.exists():
        print_reconstruct(_load(reconstruct))
    if (args.out / "tf32_rendering.json").exists():
        print_tf32(_load(args.out / "tf32_rendering.json"))
    for objective in OBJECTIVES.values():
        print(epoch_estimate(train, *args.epoch_row, objective))
    for line in failed_rows(args.out):
        print(line)


if __name__ == "__main__":
    main()
