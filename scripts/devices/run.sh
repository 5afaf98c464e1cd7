#!/usr/bin/env bash
# Run the emulated ARM python3 prepared by prepare.sh.
#
# usage: [DEVICE_CPU=NAME] scripts/devices/run.sh arm64|armhf [python3 args...]
#   e.g. scripts/devices/run.sh arm64 -c 'import numpy, onnxruntime'
#        DEVICE_CPU=cortex-a76 DEVICE_PYTHONPATH=$PWD scripts/devices/run.sh arm64 -m pytest ...
#
# No chroot/binfmt: QEMU_CPU=NAME qemu-*-static -L PREFIX PREFIX/usr/bin/python3.
# Host paths (the repo, /tmp, the site dir) stay visible to the guest, because qemu
# only redirects an absolute path into PREFIX when it exists there.
# DEVICE_CPU: the emulated CPU. arm64: one of DEVICE_CPUS in the env.sh that
#   prepare.sh wrote (default cortex-a53 = Pi Zero 2 W / Pi 3; cortex-a72 = Pi 4;
#   cortex-a76 = Pi 5); PREFIX is that CPU's twin of the rootfs, whose
#   /proc/cpuinfo matches it. `max` = qemu's default CPU on the plain rootfs (a
#   Neoverse-N1 cpuinfo, but SVE and more: not a Pi). armhf: any qemu-arm CPU
#   (default cortex-a7, the Pi 2's; Pi 3 / Zero 2 W in 32-bit mode are a superset).
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
WANT_CPU="${DEVICE_CPU:-}"
# shellcheck source=/dev/null
. "$CACHE/env.sh"
CPU="${WANT_CPU:-${DEVICE_DEFAULT_CPU:-max}}"
PREFIX="$DEVICE_ROOTFS"
if [[ $ARCH == arm64 && $CPU != max ]]; then
  if [[ -z ${DEVICE_CPUS:-} && -z $WANT_CPU ]]; then
    CPU=max # prepared with FAKE_CPUINFO=0 or by an older prepare.sh: no twins
  else
    PREFIX="$(dirname "$DEVICE_ROOTFS")/cpu/$CPU"
    if [[ ! -x $PREFIX/usr/bin/python3 ]]; then
      echo "[run $ARCH] no prefix for CPU '$CPU'; prepared: ${DEVICE_CPUS:-none}. Run DEVICE_CPUS='$CPU ...' scripts/devices/prepare.sh arm64" >&2
      exit 2
    fi
  fi
fi
PP="$DEVICE_SITE"
[[ -n ${DEVICE_PYTHONPATH:-} ]] && PP="$DEVICE_PYTHONPATH:$PP"
QCPU=()
[[ $CPU != max ]] && QCPU=(QEMU_CPU="$CPU")
exec env -u PYTHONHOME -u VIRTUAL_ENV -u PYTHONSTARTUP -u LD_LIBRARY_PATH -u LD_PRELOAD -u QEMU_CPU "${QCPU[@]}" \
  PYTHONPATH="$PP" "$DEVICE_QEMU" -L "$PREFIX" "$PREFIX/usr/bin/python3" "$@"
