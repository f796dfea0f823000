#!/usr/bin/env bash
# The wheels bench/gpu_suite.py needs on a GPU machine that has torch (2.11, CUDA 13, Python 3.12)
# but no DeepSpeed and no internet: DeepSpeed, built here as a pure-Python wheel (its ops compile
# just in time there), and what it requires that such a machine lacks.
#
#     bash bench/gpu_wheels.sh .whl        # then: python3 bench/gpu_suite.py --wheels .whl --out $OUT
#
# PYTHON: an interpreter with torch and pip (default .venv/bin/python). TARGET_PY: the GPU
# machine's Python version (default 3.12).
set -euo pipefail
out=${1:-.whl}
py=${PYTHON:-.venv/bin/python}
target_py=${TARGET_PY:-3.12}
mkdir -p "$out"
# DeepSpeed publishes a source archive only; DS_BUILD_OPS=0 builds no extension into the wheel.
DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" "deepspeed==0.19.8"
# pydantic and its core must match each other exactly; the core is compiled, so take the target's build.
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$target_py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$out" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
    "hjson==3.1.0"
ls -l "$out"
