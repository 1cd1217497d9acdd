#!/usr/bin/env bash
# Creates or updates the project virtualenv. Facts behind each step: ../shared/ENVIRONMENT.md.
set -euo pipefail
PY=${PY:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip wheel
# torch first, and only if absent: a bare `torch` requirement would pull a CUDA build.
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install -q "$TORCH_SPEC"
"$VPY" -m pip install -q -e ".[dev,eval]"
# encodec imports torchaudio; PyPI's torchaudio wheel is CUDA-linked and its native libs fail to load
# beside CPU torch. Its pure-Python parts (resample, convert_audio) are all encodec needs here, so
# install both without deps and drop the native libs when torch is a CPU build. Audio I/O uses soundfile.
if ! "$VPY" -c "import encodec" 2>/dev/null; then
  "$VPY" -m pip install -q --no-deps "encodec==0.1.1" "torchaudio==2.11.0"
  if "$VPY" -c "import torch,sys; sys.exit(0 if torch.version.cuda is None else 1)"; then
    TA_DIR=$("$VPY" -c "import importlib.util,os; print(os.path.dirname(importlib.util.find_spec('torchaudio').origin))")
    rm -f "$TA_DIR"/lib/*.so
  fi
  "$VPY" -c "import encodec"
fi
