#!/usr/bin/env bash
# A serving environment with no MXNet, no Horovod and no distbn: ONNX Runtime's current release
# with the numpy it asks for (>= 1.24, which MXNet 1.9.1 cannot import: hence a venv of its own).
# examples/serve.py --backend onnxruntime runs in it (docs/export.md).
#
#   launch/serve_env.sh            # makes ./.venv-serve (idempotent: a few seconds when there)
#   launch/serve_env.sh DIR        # elsewhere
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$here/.venv-serve}
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import onnxruntime' 2>/dev/null; then
  exit 0
fi
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip --disable-pip-version-check install -q onnxruntime
"$venv/bin/python" -c 'import numpy, onnxruntime; print(f"[serve_env] onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__} in '"$venv"'")'
