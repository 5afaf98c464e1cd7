#!/usr/bin/env bash
# Which onnxruntime aarch64 wheels import and run under qemu-aarch64-static?
#
# usage: scripts/devices/ort_matrix.sh [--bisect] [VERSION...]
#   default VERSIONs: newest patch of every minor that `pip index versions
#   onnxruntime` lists. For each version: pip download the cp311 aarch64 wheel
#   into .cache/devices/arm64/ort/VERSION, then run check_ort.py (tiny models
#   from make_test_models.py, compared with the host's onnxruntime) twice:
#     real  - rootfs whose /proc is the host's (x86 /proc/cpuinfo)
#     fake  - rootfs with the fake ARM /proc/cpuinfo that prepare.sh installs
#   --bisect: binary search for the newest version that imports in "real" mode
#   (assumes old versions work and new ones break) and test only the probes.
# Needs: prepare.sh arm64 done; host python with onnx+onnxruntime for the
# models (MODEL_PYTHON, default /work/venv/bin/python if present, else python3).
# Results: table on stdout and in .cache/devices/arm64/ort-matrix.txt.
# Runs on qemu's default CPU (`max`: SVE, I8MM, ...) with the Neoverse-N1 cpuinfo and compares
# UNOPTIMIZED sessions; check.sh --ort-sweep runs the real artifact with the real runtime on a
# Pi CPU model (cortex-a53) instead. See README.md for why that difference matters.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${CRAFT_DEVICES_CACHE:-$REPO/.cache/devices}/arm64"
MODELS="${CRAFT_DEVICES_CACHE:-$REPO/.cache/devices}/models"
HOST_PY="${HOST_PYTHON:-python3}"
# shellcheck source=lib.sh
. "$HERE/lib.sh"
if [[ -z ${MODEL_PYTHON:-} ]]; then
  if [[ -x /work/venv/bin/python ]]; then MODEL_PYTHON=/work/venv/bin/python; else MODEL_PYTHON=python3; fi
fi
[[ -f $CACHE/env.sh ]] || { echo "SKIP: run scripts/devices/prepare.sh arm64 first" >&2; exit 77; }
# shellcheck source=/dev/null
. "$CACHE/env.sh"
[[ -f $DEVICE_ROOTFS/proc/cpuinfo ]] || { echo "prepare.sh ran with FAKE_CPUINFO=0; rerun it with 1" >&2; exit 1; }

BISECT=0
if [[ ${1:-} == --bisect ]]; then BISECT=1; shift; fi

# rootfs twin with the host /proc (hard links: costs ~nothing)
REAL="$CACHE/rootfs-realproc"
rm -rf "$REAL"
cp -al "$DEVICE_ROOTFS" "$REAL"
rm -rf "$REAL/proc" && ln -s /proc "$REAL/proc"

if [[ ! -f $MODELS/core.onnx ]]; then
  "$MODEL_PYTHON" "$HERE/make_test_models.py" "$MODELS" | grep -v '^Warn' || true
fi
HOST_ORT=$("$MODEL_PYTHON" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || echo "?")

declare -A RES
check() { # $1 version, $2 real|fake -> sets RES[v,mode] to a one-line summary
  local v="$1" mode="$2" pp root out rc
  pp=$(HOST_PY="$HOST_PY" devices_ort_pythonpath "$CACHE" "$v") || { RES[$v,$mode]="no-wheel"; return; }
  if [[ $mode == real ]]; then root=$REAL; else root=$DEVICE_ROOTFS; fi
  set +e
  out=$(env -u PYTHONHOME -u VIRTUAL_ENV PYTHONPATH="$pp" timeout 600 \
    "$DEVICE_QEMU" -L "$root" "$DEVICE_PYTHON" "$HERE/check_ort.py" "$MODELS" 2>&1)
  rc=$?
  set -e
  if grep -q '^SUMMARY' <<<"$out"; then
    RES[$v,$mode]=$(grep '^SUMMARY' <<<"$out" | sed 's/^SUMMARY ort=[^ ]* //')
  elif grep -q 'signal 11' <<<"$out"; then
    RES[$v,$mode]="SEGFAULT (rc=$rc)"
  else
    RES[$v,$mode]="FAIL rc=$rc: $(tail -1 <<<"$out" | cut -c1-120)"
  fi
  echo "$v $mode: ${RES[$v,$mode]}" >&2
  { echo "== $v $mode rc=$rc"; echo "$out"; } >>"$CACHE/ort-matrix.log"
}
imports() { [[ ${RES[$1,real]} != SEGFAULT* && ${RES[$1,real]} != FAIL* && ${RES[$1,real]} != no-wheel ]]; }

if (($# == 0)); then
  mapfile -t ALL < <("$HOST_PY" -m pip index versions onnxruntime 2>/dev/null |
    sed -n 's/^Available versions: //p' | tr ',' '\n' | tr -d ' ' | grep -E '^1\.(1[5-9]|[2-9][0-9])\.' |
    sort -V | awk -F. '{k=$1"."$2; last[k]=$0; if(!(k in seen)){order[++n]=k; seen[k]=1}} END{for(i=1;i<=n;i++) print last[order[i]]}')
  ((${#ALL[@]})) || { echo "pip index versions onnxruntime failed" >&2; exit 1; }
else
  ALL=("$@")
fi
: >"$CACHE/ort-matrix.log"
TESTED=()
if ((BISECT)); then
  lo=0 hi=$((${#ALL[@]} - 1))
  check "${ALL[$lo]}" real; TESTED+=("${ALL[$lo]}")
  imports "${ALL[$lo]}" || { echo "oldest ${ALL[$lo]} does not import; nothing to bisect" >&2; exit 1; }
  check "${ALL[$hi]}" real; TESTED+=("${ALL[$hi]}")
  if imports "${ALL[$hi]}"; then lo=$hi; fi
  while ((hi - lo > 1)); do
    mid=$(((lo + hi) / 2))
    check "${ALL[$mid]}" real; TESTED+=("${ALL[$mid]}")
    if imports "${ALL[$mid]}"; then lo=$mid; else hi=$mid; fi
  done
  echo "newest importing without the fake /proc/cpuinfo: ${ALL[$lo]}" >&2
  for v in "${TESTED[@]}"; do check "$v" fake; done
else
  for v in "${ALL[@]}"; do check "$v" real; check "$v" fake; TESTED+=("$v"); done
fi

{
  echo "# onnxruntime aarch64 wheels under $($DEVICE_QEMU --version | head -1); host ORT $HOST_ORT"
  echo "# real = host /proc/cpuinfo; fake = ARM /proc/cpuinfo in rootfs; columns: import time, model checks, max opset"
  for v in $(printf '%s\n' "${TESTED[@]}" | sort -uV); do
    printf '%-8s real: %s\n%-8s fake: %s\n' "$v" "${RES[$v,real]:-}" "" "${RES[$v,fake]:-}"
  done
} | tee "$CACHE/ort-matrix.txt"
