#!/usr/bin/env bash
# Run the emulated ARM python3 prepared by prepare.sh.
#
# usage: scripts/devices/run.sh arm64|armhf [python3 args...]
#   e.g. scripts/devices/run.sh arm64 -c 'import numpy, onnxruntime'
#        DEVICE_PYTHONPATH=$PWD scripts/devices/run.sh arm64 -m pytest ...
#
# No chroot/binfmt: qemu-*-static -L ROOTFS ROOTFS/usr/bin/python3. Host paths
# (the repo, /tmp, the site dir) stay visible to the guest, because qemu only
# redirects an absolute path into ROOTFS when it exists there.
# The guest gets PYTHONPATH = DEVICE_PYTHONPATH:SITE (the host's PYTHONPATH,
# PYTHONHOME and virtualenv are NOT passed through).
# Exit 77 if the ARCH was not prepared.
set -euo pipefail
ARCH="${1:-}"
case "$ARCH" in arm64 | armhf) ;; *) echo "usage: $0 arm64|armhf [python3 args...]" >&2; exit 2 ;; esac
shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${CRAFT_DEVICES_CACHE:-$HERE/../../.cache/devices}/$ARCH"
if [[ ! -f $CACHE/env.sh ]]; then
  echo "[run $ARCH] SKIP: not prepared; run scripts/devices/prepare.sh $ARCH" >&2
  exit 77
fi
# shellcheck source=/dev/null
. "$CACHE/env.sh"
PP="$DEVICE_SITE"
[[ -n ${DEVICE_PYTHONPATH:-} ]] && PP="$DEVICE_PYTHONPATH:$PP"
exec env -u PYTHONHOME -u VIRTUAL_ENV -u PYTHONSTARTUP -u LD_LIBRARY_PATH -u LD_PRELOAD \
  PYTHONPATH="$PP" "$DEVICE_QEMU" -L "$DEVICE_ROOTFS" "$DEVICE_PYTHON" "$@"
