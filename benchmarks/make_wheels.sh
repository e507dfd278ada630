#!/usr/bin/env bash
# Wheels for benchmarks/gpu.py on a CUDA machine that has torch, timm, numpy, pillow, pyarrow, pyyaml,
# safetensors, scikit-image and tensorboard but no network and none of: deepspeed, webdataset, pydantic.
# (Ray and boto3 are not needed: the check runs under torchrun on a local run folder.)
#
#   bash benchmarks/make_wheels.sh [DIR] [PYTHON_VERSION]      # default: .whl 3.12
#
# DIR is git-ignored. On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
PYV="${2:-3.12}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$DIR"
grep -qxF "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> .git/info/exclude
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# pure-Python or binary wheels for the GPU machine's Python
for pkg in webdataset braceexpand hjson pydantic pydantic_core annotated-types typing-inspection; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    "${PLAT[@]}" -d "$DIR" "$pkg==$(ver "$pkg")"
done
# DeepSpeed ships an sdist only: build its (pure-Python, ops compiled on demand) wheel here
if ! ls "$DIR"/deepspeed-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "deepspeed==$(ver deepspeed)"
fi
du -sh "$DIR"; ls "$DIR"
