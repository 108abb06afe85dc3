#!/usr/bin/env bash
# GPU benchmark run: the training step (precision fp32, and bf16 networks with TF32 projection products, each eager
# and with torch.compile; the original's objective, and training's default one in bf16, eager, with the segment count
# training would choose: 40 at 13,941 residues, as for images with signal, and 20 at 214 residues, as at low SNR),
# the TF32 images' error, the projector and the reconstruction at 13,941 residues / 128 px and 214 residues / 64 px on
# CUDA, all JSON into one folder, then a summary with the time of an EMPIAR-10180-sized epoch
# (benchmarks/gpu_summary.py; also saved as summary.txt).
#
#   benchmarks/gpu.sh [OUTDIR]               CUDA; OUTDIR defaults to $OUT, else benchmarks/results/gpu
#   benchmarks/gpu.sh --cpu-smoke [OUTDIR]   the same pipeline on CPU at tiny sizes (default benchmarks/results/gpu_smoke)
#
# Sized to finish in about 10 minutes on one H200 (mostly process start-up and the compilations). Simulated data goes
# to a temporary folder, shared by the five training runs and removed at exit. Uses $CRYOFLEX_PYTHON if set, else the
# repository's .venv python if there is one, else python3, else python; src/ is put on PYTHONPATH so that an
# uninstalled checkout runs. A machine without network access and without the field's packages (gemmi, mrcfile,
# starfile, roma, MDAnalysis) installs them from the wheels in .gpu_wheels/ (benchmarks/gpu_wheels.sh makes them;
# carry the folder). A stage that fails is reported and the next one runs; the exit status is 1 if any failed.
set -euo pipefail

usage() { sed -n '2,8s/^# \{0,1\}//p' "$0"; }

smoke=0
case "${1:-}" in
    --cpu-smoke) smoke=1; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then usage >&2; exit 2; fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${CRYOFLEX_PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3 || command -v python)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
packages=(gemmi mrcfile starfile roma MDAnalysis)  # the field's libraries, absent from a bare GPU image

if [ "$smoke" = 1 ]; then
    out="${1:-$root/benchmarks/results/gpu_smoke}"
    device=cpu
    steps=2
    train_rows=(214:32:4 300:32:4)
    default_rows=(214:32:4:20 300:32:4:20)
    projector_rows=(214:16:4 300:32:4)
    reconstruct_boxes=(16 32)
    tf32_rows=(214:16:2)
    epoch_row=300:32
else
    out="${1:-${OUT:-$root/benchmarks/results/gpu}}"
    device=cuda
    steps=10
    train_rows=(13941:128:32 13941:128:128 214:64:32 214:64:128)
    default_rows=(13941:128:32:40 214:64:32:20)  # segments 40 and 20, as chosen by default; batch 32 x 8 draws
    projector_rows=("${train_rows[@]}")
    reconstruct_boxes=(64 128)
    tf32_rows=(214:64:64 13941:128:8)
    epoch_row=13941:128
    if ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "gpu.sh: CUDA is not available to $py" \
            "(torch $("$py" -c 'import torch; print(torch.__version__ + ", CUDA " + str(torch.version.cuda))')):" \
            "run it on a machine with an NVIDIA GPU and a CUDA build of torch, or use --cpu-smoke" >&2
        exit 1
    fi
fi

mkdir -p "$out"
work="$(mktemp -d "${TMPDIR:-/tmp}/cryoflex_gpu_bench.XXXXXX")"
trap 'rm -rf "$work"' EXIT
started=$SECONDS

stage() { echo "== [$((SECONDS - started)) s] $*"; }

imports="$(IFS=,; echo "${packages[*]}")"
importable() { "$py" -c "import $imports" 2>/dev/null; }
if ! importable; then
    wheels=("$root"/.gpu_wheels/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        echo "gpu.sh: $py cannot import all of ${packages[*]}: install the project (make install), or on a" \
            "machine without network access run benchmarks/gpu_wheels.sh beforehand and carry .gpu_wheels" >&2
        exit 1
    fi
    stage "installing ${#wheels[@]} wheels from .gpu_wheels"
    "$py" -m pip install --quiet --no-index --no-deps --target "$work/site-packages" "${wheels[@]}"
    export PYTHONPATH="$work/site-packages:$PYTHONPATH"
    importable || { "$py" -c "import $imports"; exit 1; }
fi

failed=()
attempt() {  # attempt NAME COMMAND...: run a stage; on failure say so, remember it and go on
    local name="$1"
    shift
    "$@" || { stage "$name failed (exit $?); going on"; failed+=("$name"); }
}

train() {  # train PRECISION [--compile | --default-objective]: one training-step run over its rows
    local suffix="" rows=("${train_rows[@]}")
    case "${2:-}" in
        "") ;;
        --compile) suffix=_compiled ;;
        --default-objective) suffix=_default_objective rows=("${default_rows[@]}") ;;
        *) echo "gpu.sh: train: unknown option $2" >&2; exit 2 ;;
    esac
    local name="train_$1$suffix"
    stage "$name"
    "$py" "$root/benchmarks/train_throughput.py" --device "$device" --precision "$1" ${2:+"$2"} \
        --rows "${rows[@]}" --steps "$steps" --work "$work" --out "$out/$name.json"
}

# eager runs first: their figures come back even if the compiled runs outlast the machine's time
attempt train_fp32 train fp32
attempt train_bf16 train bf16
attempt train_bf16_default_objective train bf16 --default-objective
stage projector
attempt projector "$py" "$root/benchmarks/projector.py" --device "$device" --rows "${projector_rows[@]}" \
    --out "$out/projector.json"
stage "tf32 rendering"
attempt tf32_rendering "$py" "$root/benchmarks/tf32_rendering.py" --device "$device" --rows "${tf32_rows[@]}" \
    --out "$out/tf32_rendering.json"
stage reconstruct
attempt reconstruct "$py" "$root/benchmarks/reconstruct.py" --device "$device" --boxes "${reconstruct_boxes[@]}" \
    --out "$out/reconstruct.json"
attempt train_fp32_compiled train fp32 --compile
attempt train_bf16_compiled train bf16 --compile
stage "done; summary:"
"$py" "$root/benchmarks/gpu_summary.py" "$out" --epoch-row "$epoch_row" | tee "$out/summary.txt" || failed+=(summary)
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu.sh: failed: ${failed[*]}" >&2
    exit 1
fi
