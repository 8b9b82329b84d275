#!/usr/bin/env bash
# Download into .whl/ the wheels that the lent GPU machine's image lacks, for its Python 3.12 on
# manylinux x86_64 (that machine has no network; bench/gpu_check.sh installs .whl/*.whl there with
# --no-index --no-deps into /tmp/site). Run it on a machine with PyPI; .whl/ is git-ignored and
# travels with `carry: [".whl"]` (64 MiB per call for the whole working tree).
#
# Each wheel is fetched with --no-deps, so every dependency is listed here; those marked "image"
# are on the GPU image already (its package list: the device docs' KINDS.md).
#   bitsandbytes 0.50.2  needs torch, numpy, packaging            (image)  ~43 MB, has cuda130 libs
#   gemlite 0.6.0.post2  needs numpy, tqdm, triton>=3.6           (image)  sdist only: wheel built here
#   gptq-triton 0.0.4    needs triton, torch, transformers        (image)
# Not fetched: peft, pytest-benchmark, safetensors, matplotlib, accelerate (on the image);
# gptqmodel (sdist with CUDA extensions, no wheel); exllamav2 (its py3 wheel compiles the CUDA
# extension at first import, minutes of nvcc on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all:
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

fetch() {  # fetch NAME==VERSION: one binary wheel, any older copy of it removed first
  local name=${1%%==*}
  rm -f "$DEST/${name//-/_}"-*.whl "$DEST/$name"-*.whl
  "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST" "$1"
}

status=0
fetch bitsandbytes==0.50.2 || { echo "prepare_wheels: bitsandbytes did not resolve" >&2; status=1; }
fetch gptq-triton==0.0.4 || { echo "prepare_wheels: gptq-triton did not resolve" >&2; status=1; }
# gemlite is pure Python + Triton but ships only an sdist: build the wheel here (no compiler needed)
rm -f "$DEST"/gemlite-*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" gemlite==0.6.0.post2 \
  || { echo "prepare_wheels: gemlite did not build" >&2; status=1; }

ls -l "$DEST"
size=$(du -sm "$DEST" | cut -f1)
echo "prepare_wheels: $DEST holds ${size} MiB (the working tree that travels must stay under 64 MiB)"
[ "$size" -lt 60 ] || { echo "prepare_wheels: too large to carry" >&2; status=1; }
exit $status
