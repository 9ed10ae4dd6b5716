#!/usr/bin/env bash
# Download the onnxruntime-gpu wheel for the GPU machine (cp312, x86-64) and split it into
# parts small enough to travel one per call (bench/README.md, "GPU check").
# Usage: bench/gpu/split-ort-wheel.sh DIR [VERSION]
set -euo pipefail
dir=${1:?usage: split-ort-wheel.sh DIR [VERSION]}
ver=${2:-1.31.1}
mkdir -p "$dir"
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 -d "$tmp" "onnxruntime-gpu==$ver"
whl=$(ls "$tmp"/onnxruntime_gpu-*.whl)
split -b 44700000 -d "$whl" "$dir/ort.p."
sha256sum "$whl" | tee "$dir/ort.sha256"
echo "wheel: $(basename "$whl")" | tee "$dir/ort.name"
ls -la "$dir"
rm -rf "$tmp"
