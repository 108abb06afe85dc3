#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu.sh installs on a GPU machine without network access: the field's libraries
# cryoflex imports (gemmi, mrcfile, starfile, roma, MDAnalysis) and MDAnalysis's dependencies that such an image lacks,
# built for that machine's Python (CPython 3.12 on x86-64 Linux unless told otherwise). Everything else cryoflex needs
# (torch, numpy, scipy, pandas, matplotlib, scikit-learn, PyYAML, tqdm, tensorboard) comes with a PyTorch GPU image.
#
#   benchmarks/gpu_wheels.sh [DIR]     DIR defaults to .gpu_wheels at the repository root (git ignores it)
#   GPU_PYTHON_VERSION=3.11 benchmarks/gpu_wheels.sh    for another Python on the GPU machine
#
# Then, through the device tool: command "bash benchmarks/gpu.sh", carry [".gpu_wheels"] (about 22 MB).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/.gpu_wheels}"
py="$root/.venv/bin/python"
[ -x "$py" ] || py="$(command -v python3 || command -v python)"
wheels=(
    "gemmi>=0.7" "mrcfile>=1.5" "starfile>=0.5.6" "roma>=1.5" "MDAnalysis>=2.7"
    GridDataFormats mmtf-python mda-xdrlib  # MDAnalysis's dependencies that a PyTorch image does not hold
)

mkdir -p "$dir"
"$py" -m pip download --quiet --only-binary=:all: --no-deps --implementation cp \
    --python-version "${GPU_PYTHON_VERSION:-3.12}" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$dir" "${wheels[@]}"
ls -1 "$dir"
