#!/usr/bin/env bash
# The device check: the same int8 .onnx on emulated aarch64 and armv7 (qemu-user) must give the
# x86_64 greedy output token for token, and the small int8 model must generate under a Pi Zero 2 W
# memory cap. Prints a short report; exit 0 pass, 1 fail, 77 skipped (qemu-user / debootstrap
# cannot be installed, or not root). Body: check.py (its docstring lists the knobs).
#
# usage: scripts/devices/check.sh      (or: make devices)
# Needs the host python with craft[train] installed (the CI venv): HOST_PYTHON, else the
# active virtualenv's python3, else REPO/.venv/bin/python, else python3.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
if [[ -z ${HOST_PYTHON:-} ]]; then
  if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then HOST_PYTHON=$VIRTUAL_ENV/bin/python
  elif [[ -x $REPO/.venv/bin/python ]]; then HOST_PYTHON=$REPO/.venv/bin/python
  else HOST_PYTHON=python3; fi
fi
export HOST_PYTHON
if ! "$HOST_PYTHON" -c 'import craft, torch, onnx, onnxruntime' 2>/dev/null; then
  echo "device check: $HOST_PYTHON cannot import craft, torch, onnx and onnxruntime;" \
    "install the project with its [train] extras (pip install -e '.[train,dev]') or set HOST_PYTHON" >&2
  exit 1
fi
exec "$HOST_PYTHON" "$HERE/check.py" "$@"
