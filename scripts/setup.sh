#!/usr/bin/env bash
# Creates .venv and installs poa_keras with every backend. torch==2.13.0 (the CPU wheel) goes in
# FIRST: an unpinned torch pulled in later would fetch several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q ".[torch,test]"
.venv/bin/python -c "import keras, poa_keras; print('poa_keras', poa_keras.__version__, 'keras', keras.__version__)"
