#!/usr/bin/env bash
# Prepare an emulated ARM userland for Craft's Python/numpy/onnxruntime runtime.
#
# usage: scripts/devices/prepare.sh arm64|armhf
#
# Builds, without chroot and without binfmt_misc, a minimal Debian bookworm
# rootfs for ARCH under .cache/devices/ARCH/ (git-ignored) so that
#   qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3 ...   (arm64)
#   qemu-arm-static     -L ROOTFS ROOTFS/usr/bin/python3 ...   (armhf)
# works. Use scripts/devices/run.sh ARCH ... to run python3 in it.
#
#   arm64: Debian python3 (3.11) + numpy / onnxruntime / sentencepiece / click
#          manylinux aarch64 wheels unpacked into .cache/devices/arm64/site
#          (PYTHONPATH), and a fake ARM /proc/cpuinfo inside the rootfs that
#          onnxruntime >= 1.28 needs to import under qemu (see README.md).
#          Plus one hard-linked twin of the rootfs per emulated CPU
#          (.cache/devices/arm64/cpu/NAME, DEVICE_CPUS) whose /proc/cpuinfo
#          matches that CPU; run.sh picks one with DEVICE_CPU=NAME.
#   armhf: Debian python3 + python3-numpy (+ libblas/liblapack alternative
#          symlinks) + python3-sentencepiece + python3-click; no onnxruntime
#          (no 32-bit ARM wheel exists). Emulated CPU: cortex-a7.
#
# Idempotent: every stage is skipped when its stamp matches; a warm run takes
# a few seconds. Exit 77 = skipped (tools unavailable), not a failure.
#
# Environment knobs:
#   ORT_VERSION      onnxruntime version for arm64 (default 1.32.0)
#   NUMPY_SPEC       numpy requirement for arm64 (default: "numpy" or,
#                    for ORT < 1.19, "numpy<2")
#   EXTRA_WHEELS     extra requirement specs for arm64 (space separated)
#   FAKE_CPUINFO     1 (default) / 0: install the fake /proc/cpuinfo (arm64)
#   DEVICE_CPUS      arm64 CPU twins to build (default: cortex-a53 cortex-a72
#                    cortex-a76 = Pi Zero 2 W / 3, Pi 4, Pi 5)
#   PREPARE_SMOKE    1 (default) / 0: skip the final import smoke test
#   DEBIAN_MIRROR    default http://deb.debian.org/debian
#   CRAFT_DEVICES_CACHE  cache root (default REPO/.cache/devices)
set -euo pipefail

ARCH="${1:-}"
case "$ARCH" in
  arm64) QEMU=qemu-aarch64-static; TRIPLET=aarch64-linux-gnu; DEFAULT_CPU=cortex-a53 ;;
  armhf) QEMU=qemu-arm-static; TRIPLET=arm-linux-gnueabihf; DEFAULT_CPU=cortex-a7 ;;
  *) echo "usage: $0 arm64|armhf" >&2; exit 2 ;;
esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"
CACHE_ROOT="${CRAFT_DEVICES_CACHE:-$REPO/.cache/devices}"
CACHE="$CACHE_ROOT/$ARCH"
ROOTFS="$CACHE/rootfs"
SITE="$CACHE/site"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ORT_VERSION="${ORT_VERSION:-1.32.0}"
FAKE_CPUINFO="${FAKE_CPUINFO:-1}"
HOST_PY="${HOST_PYTHON:-python3}"

log() { printf '[prepare %s] %s\n' "$ARCH" "$*"; }
skip() { printf '[prepare %s] SKIP: %s\n' "$ARCH" "$*" >&2; exit 77; }
die() { printf '[prepare %s] ERROR: %s\n' "$ARCH" "$*" >&2; exit 1; }

T_ALL=$EPOCHREALTIME
T_STAGE=$EPOCHREALTIME
STAGE=""
TIMINGS=()
stage_begin() { STAGE="$1"; T_STAGE=$EPOCHREALTIME; log "stage $STAGE ..."; }
stage_end() { # $1 = note (cached/built)
  local dt
  dt=$(awk -v a="$T_STAGE" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')
  TIMINGS+=("$(printf '%-10s %6ss  %s' "$STAGE" "$dt" "$1")")
  log "stage $STAGE: ${dt}s ($1)"
}

# ---------------------------------------------------------------- tools
stage_begin tools
missing_tools() {
  need_install=()
  command -v "$QEMU" >/dev/null 2>&1 || need_install+=(qemu-user-static)
  command -v debootstrap >/dev/null 2>&1 || need_install+=(debootstrap)
  command -v wget >/dev/null 2>&1 || need_install+=(wget)
}
missing_tools
if ((${#need_install[@]})); then
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    skip "missing ${need_install[*]} and cannot apt-get install (need root + apt)"
  fi
  # check.py runs prepare.sh for both arches at once: on a fresh machine both apt-get installs ran
  # together, one lost dpkg's lock and the whole device check was skipped. One at a time, and what
  # the other installed meanwhile is not installed again.
  mkdir -p "$CACHE_ROOT"
  exec 8>"$CACHE_ROOT/apt.lock"
  command -v flock >/dev/null 2>&1 && flock 8
  missing_tools
fi
if ((${#need_install[@]})); then
  log "apt-get install ${need_install[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${need_install[@]}" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get install -y -qq --no-install-recommends "${need_install[@]}" >/dev/null 2>&1 ||
      skip "apt-get install ${need_install[*]} failed"
  fi
  for t in "$QEMU" debootstrap wget; do
    command -v "$t" >/dev/null 2>&1 || skip "$t still unavailable after apt-get install"
  done
  stage_end "installed ${need_install[*]}"
else
  stage_end "present"
fi
exec 8>&- # the other arch's apt-get may go on
[[ $(id -u) -eq 0 ]] || skip "debootstrap needs root (uid $(id -u))"
command -v dpkg-deb >/dev/null 2>&1 || skip "dpkg-deb not found"
command -v flock >/dev/null 2>&1 || skip "flock not found"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# ---------------------------------------------------------------- rootfs
if [[ $ARCH == arm64 ]]; then
  INCLUDE=python3
else
  INCLUDE=python3,python3-numpy,python3-sentencepiece,python3-click
fi
ROOTFS_KEY="v2 suite=$SUITE arch=$ARCH include=$INCLUDE fake_cpuinfo=$FAKE_CPUINFO"

extract_all() { # $1 = target rootfs: dpkg-deb -x every deb debootstrap fetched
  local target="$1" pkg path n=0
  while read -r pkg path; do
    dpkg-deb --fsys-tarfile "$target/$path" | tar -x --keep-directory-symlink -C "$target" -f -
    n=$((n + 1))
  done <"$target/debootstrap/debpaths"
  log "extracted $n packages"
}

fix_alternatives() { # what libblas3/liblapack3's postinst (update-alternatives) does,
  # with RELATIVE links: qemu -L resolves absolute symlink targets on the host.
  local target="$1" lib="$1/usr/lib/$TRIPLET" name
  for name in blas lapack; do
    if [[ -e $lib/$name/lib$name.so.3 ]]; then
      ln -sfn "$name/lib$name.so.3" "$lib/lib$name.so.3"
      log "alternative: usr/lib/$TRIPLET/lib$name.so.3 -> $name/lib$name.so.3"
    fi
  done
}

fake_cpuinfo() { # onnxruntime >= 1.28 (pytorch/cpuinfo) segfaults at import when it
  # parses the x86 host /proc/cpuinfo. qemu -L looks every absolute path up in
  # the prefix first, so a real rootfs/proc/ holding only cpuinfo shadows
  # /proc/cpuinfo while every other /proc path falls back to the host.
  # $1 = rootfs, $2 = cpu (neoverse-n1 for the default `max` CPU; see lib.sh)
  local target="$1" cpu="${2:-neoverse-n1}"
  [[ -L $target/proc ]] && rm -f "$target/proc" # debootstrap's symlink to /proc
  mkdir -p "$target/proc"
  rm -f "$target/proc/cpuinfo" # never write through a hard link shared with another twin
  devices_cpuinfo "$cpu" "$(nproc)" >"$target/proc/cpuinfo.tmp"
  mv "$target/proc/cpuinfo.tmp" "$target/proc/cpuinfo"
  log "fake /proc/cpuinfo in ${target#"$CACHE"/}: $(nproc) x $cpu"
}

relative_symlinks() { # absolute symlinks would resolve on the HOST (no chroot):
  # make them relative, like `symlinks -c` (dev/* and proc stay as they are)
  local target="$1" l dest n=0
  while IFS= read -r -d '' l; do
    dest=$(readlink "$l")
    ln -sfn "$(realpath -m --relative-to="$(dirname "/${l#"$target"/}")" "$dest")" "$l"
    n=$((n + 1))
  done < <(find "$target" -path "$target/dev" -prune -o -path "$target/proc" -prune -o \
    -type l -lname '/*' -print0)
  log "made $n absolute symlinks relative"
}

precompile() { # CPython 3.11 .pyc are arch-independent (magic 3495 for all 3.11.x):
  # compile on the host; under emulation that costs seconds per import.
  local target="$1"
  if ! "$HOST_PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    log "host $HOST_PY is not 3.11: not precompiling (imports will be slower)"
    return 0
  fi
  "$HOST_PY" -m compileall -q -j0 -s "$target" -p / "$target/usr/lib/python3.11" \
    "$target/usr/lib/python3/dist-packages" >/dev/null 2>&1 || true
}

stage_begin rootfs
if [[ -f $CACHE/rootfs.stamp && $(cat "$CACHE/rootfs.stamp") == "$ROOTFS_KEY" && -x $ROOTFS/usr/bin/python3.11 ]]; then
  stage_end "cached"
else
  rm -rf "$ROOTFS.tmp" "$ROOTFS" "$CACHE/rootfs.stamp"
  mkdir -p "$CACHE/debs"
  run_debootstrap() {
    debootstrap --foreign --arch="$ARCH" --variant=minbase --include="$1" \
      --cache-dir="$CACHE/debs" "$SUITE" "$ROOTFS.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1
  }
  if ! run_debootstrap "$INCLUDE"; then
    if [[ $INCLUDE == *python3-sentencepiece* ]] && grep -q "Couldn't find these debs" "$CACHE/debootstrap.log"; then
      log "WARNING: python3-sentencepiece not in $SUITE/$ARCH; continuing without it"
      INCLUDE=${INCLUDE/,python3-sentencepiece/}
      rm -rf "$ROOTFS.tmp"
      run_debootstrap "$INCLUDE" || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
    else
      tail -20 "$CACHE/debootstrap.log" >&2
      die "debootstrap failed (log: $CACHE/debootstrap.log)"
    fi
  fi
  extract_all "$ROOTFS.tmp"
  rm -f "$ROOTFS.tmp"/var/cache/apt/archives/*.deb # copies of $CACHE/debs
  rm -f "$ROOTFS.tmp"/var/lib/apt/lists/*_Packages  # ~48 MB, no apt in the guest
  relative_symlinks "$ROOTFS.tmp"
  [[ $ARCH == armhf ]] && fix_alternatives "$ROOTFS.tmp"
  precompile "$ROOTFS.tmp"
  [[ $ARCH == arm64 && $FAKE_CPUINFO == 1 ]] && fake_cpuinfo "$ROOTFS.tmp"
  mv "$ROOTFS.tmp" "$ROOTFS"
  echo "$ROOTFS_KEY" >"$CACHE/rootfs.stamp"
  stage_end "built"
fi
[[ -x $ROOTFS/usr/bin/python3.11 ]] || die "no python3.11 in $ROOTFS"

# ---------------------------------------------------------------- wheels (arm64)
if [[ $ARCH == arm64 ]]; then
  if [[ -z ${NUMPY_SPEC:-} ]]; then
    if devices_ver_lt "$ORT_VERSION" 1.19; then NUMPY_SPEC="numpy<2"; else NUMPY_SPEC="numpy"; fi
  fi
  SPECS=("onnxruntime==$ORT_VERSION" "$NUMPY_SPEC" sentencepiece click ${EXTRA_WHEELS:-})
  WHEEL_KEY="v1 ${SPECS[*]}"
  stage_begin wheels
  if [[ -f $CACHE/wheels.stamp && $(head -1 "$CACHE/wheels.stamp") == "$WHEEL_KEY" ]]; then
    stage_end "cached"
  else
    "$HOST_PY" -m pip --version >/dev/null 2>&1 || skip "host '$HOST_PY -m pip' not available"
    rm -rf "$CACHE/wheels.tmp"
    # Debian bookworm's python3 is 3.11 (cp311); glibc 2.36 -> manylinux_2_17..2_28.
    devices_pipdl "$CACHE/wheels.tmp" "${SPECS[@]}"
    n=$(find "$CACHE/wheels.tmp" -name '*.whl' 2>/dev/null | wc -l)
    [[ $n -ge ${#SPECS[@]} ]] || die "pip download got $n wheels for: ${SPECS[*]}"
    rm -rf "$CACHE/wheels"
    mv "$CACHE/wheels.tmp" "$CACHE/wheels"
    { echo "$WHEEL_KEY"; (cd "$CACHE/wheels" && ls *.whl); } >"$CACHE/wheels.stamp"
    rm -f "$CACHE/site.stamp"
    stage_end "downloaded $n wheels"
  fi

  stage_begin site
  if [[ -f $CACHE/site.stamp ]] && cmp -s "$CACHE/site.stamp" "$CACHE/wheels.stamp" && [[ -d $SITE ]]; then
    stage_end "cached"
  else
    rm -rf "$SITE.tmp" "$SITE"
    mkdir -p "$SITE.tmp"
    for w in "$CACHE"/wheels/*.whl; do
      "$HOST_PY" -m zipfile -e "$w" "$SITE.tmp"
    done
    # .pyc for CPython 3.11 are arch-independent: compile on the host instead
    # of paying for it under emulation on the first import.
    if "$HOST_PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      "$HOST_PY" -m compileall -q -j0 "$SITE.tmp" >/dev/null 2>&1 || true
    fi
    mv "$SITE.tmp" "$SITE"
    cp "$CACHE/wheels.stamp" "$CACHE/site.stamp"
    stage_end "unpacked"
  fi
else
  mkdir -p "$SITE" # empty: armhf uses Debian's dist-packages inside the rootfs
fi

# ---------------------------------------------------------------- cpu twins (arm64)
# One prefix per emulated CPU: a hard-linked copy of the rootfs (~0.2 s, no space)
# whose own proc/cpuinfo describes that CPU, so what ORT reads from /proc/cpuinfo
# agrees with what qemu -cpu NAME executes (see devices_cpuinfo in lib.sh).
CPUS=""
if [[ $ARCH == arm64 && $FAKE_CPUINFO == 1 ]]; then
  CPUS="${DEVICE_CPUS:-cortex-a53 cortex-a72 cortex-a76}"
  stage_begin cpus
  built=()
  for cpu in $CPUS; do
    twin="$CACHE/cpu/$cpu"
    key="$ROOTFS_KEY cpu=$cpu cores=$(nproc) rootfs_inode=$(stat -c %i "$ROOTFS/usr/bin/python3.11")"
    if [[ -f $twin.stamp && $(cat "$twin.stamp") == "$key" && -x $twin/usr/bin/python3.11 ]]; then
      continue
    fi
    rm -rf "$twin" "$twin.tmp" "$twin.stamp"
    mkdir -p "$CACHE/cpu"
    cp -al "$ROOTFS" "$twin.tmp"
    fake_cpuinfo "$twin.tmp" "$cpu"
    mv "$twin.tmp" "$twin"
    echo "$key" >"$twin.stamp"
    built+=("$cpu")
  done
  stage_end "$(if ((${#built[@]})); then echo "built ${built[*]}"; else echo cached; fi)"
fi

# ---------------------------------------------------------------- env file
cat >"$CACHE/env.sh" <<EOF
# generated by scripts/devices/prepare.sh $ARCH
DEVICE_ARCH=$ARCH
DEVICE_QEMU=$(command -v "$QEMU")
DEVICE_ROOTFS=$ROOTFS
DEVICE_SITE=$SITE
DEVICE_PYTHON=$ROOTFS/usr/bin/python3
DEVICE_DEFAULT_CPU=$DEFAULT_CPU
DEVICE_CPUS="$CPUS"
EOF

# ---------------------------------------------------------------- smoke
if [[ ${PREPARE_SMOKE:-1} == 0 ]]; then # check.py runs the real thing right after
  log "timings:"
  for line in "${TIMINGS[@]}"; do log "  $line"; done
  log "  total      $(awk -v a="$T_ALL" -v b="$EPOCHREALTIME" 'BEGIN{printf "%6.1f", b-a}')s (smoke test skipped)"
  exit 0
fi
stage_begin smoke
SMOKE='
import sys, time, platform, importlib.metadata
t = time.perf_counter()
import numpy
mods = ["python=%s" % platform.python_version(), "machine=%s" % platform.machine(),
        "numpy=%s" % numpy.__version__]
print("import numpy: %.2fs" % (time.perf_counter() - t))
numpy.dot(numpy.ones((64, 64)), numpy.ones((64, 64)))
for name in ("onnxruntime", "sentencepiece", "click"):
    t = time.perf_counter()
    try:
        m = __import__(name)
    except ImportError as e:
        mods.append("%s=MISSING" % name)
        continue
    print("import %s: %.2fs" % (name, time.perf_counter() - t))
    mods.append("%s=%s" % (name, importlib.metadata.version(name)))
print("SMOKE " + " ".join(mods))
'
if ! "$HERE/run.sh" "$ARCH" -c "$SMOKE" 2>&1 | sed "s/^/[prepare $ARCH]   /"; then
  die "smoke test failed under $QEMU"
fi
stage_end "ok"

# ---------------------------------------------------------------- summary
log "timings:"
for line in "${TIMINGS[@]}"; do log "  $line"; done
log "  total      $(awk -v a="$T_ALL" -v b="$EPOCHREALTIME" 'BEGIN{printf "%6.1f", b-a}')s"
log "cache sizes: $(cd "$CACHE" && du -sh rootfs debs $([[ -d wheels ]] && echo wheels) site 2>/dev/null | awk '{printf "%s=%s ", $2, $1}')"
log "run: [DEVICE_CPU=NAME] scripts/devices/run.sh $ARCH -c 'import numpy'  (default CPU $DEFAULT_CPU)"
