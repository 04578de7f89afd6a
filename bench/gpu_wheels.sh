#!/usr/bin/env bash
# The wheels bench/gpu_suite.sh installs on a GPU machine that reaches no package index.
#
#   bench/gpu_wheels.sh [DIR]        (default .whl; run where pip reaches PyPI)
#
# For the lent machines' Python (3.12, x86-64, torch 2.11 with CUDA 13): what they lack of
# crossfield's dependencies, cuequivariance with its CUDA 13 kernels, and mace-torch (no
# dependencies) with the modules it imports, for the comparison rows. About 45 MB: the
# device tool carries 64 MiB with the working tree, so keep DIR out of git
# (echo /.whl/ >> .git/info/exclude) and name it in the call's carry list.
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    vesin==0.6.2 vesin-torch==0.6.2 e3nn==0.6.0 ase==3.29.0 protobuf==7.36.2 \
    grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    cuequivariance==0.13.0 cuequivariance-torch==0.13.0 cuequivariance-ops-torch-cu13==0.13.0 \
    mace-torch==0.3.16 torch-ema==0.3 matscipy==1.3.1 lmdb==3.0.0 orjson==3.13.0
du -sh "$dir"
