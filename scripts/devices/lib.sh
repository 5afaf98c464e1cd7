# shellcheck shell=bash
# Helpers shared by prepare.sh, ort_matrix.sh and check.py (via ort_site.sh). Source it.

# pip download of cp311 manylinux aarch64 wheels (Debian bookworm: python 3.11, glibc 2.36)
devices_pipdl() { # $1 = dest dir, $2.. = requirement specs
  local dest="$1"; shift
  "${HOST_PY:-python3}" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
    --implementation cp --python-version 3.11 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
    -d "$dest" "$@" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
}

# Unpack the wheels for SPECS into DIR/site once (DIR/.ok marks it done); prints DIR/site.
devices_site_for() { # $1 = dir, $2.. = requirement specs
  local dir="$1"; shift
  if [[ ! -f $dir/.ok ]]; then
    rm -rf "$dir" && mkdir -p "$dir/whl" "$dir/site"
    devices_pipdl "$dir/whl" "$@"
    ls "$dir"/whl/*.whl >/dev/null 2>&1 || { echo "no aarch64 cp311 wheel for $*" >&2; return 1; }
    local w
    for w in "$dir"/whl/*.whl; do "${HOST_PY:-python3}" -m zipfile -e "$w" "$dir/site"; done
    # CPython 3.11 .pyc are arch-independent: compile here, not under emulation
    if "${HOST_PY:-python3}" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      "${HOST_PY:-python3}" -m compileall -q -j0 "$dir/site" >/dev/null 2>&1 || true
    fi
    rm -rf "$dir/whl" # keep only the unpacked site (~2x smaller)
    touch "$dir/.ok"
  fi
  echo "$dir/site"
}

devices_ver_lt() { [[ $1 != "$2" && $(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1) == "$1" ]]; }

# PYTHONPATH entries (ORT site:numpy site) for one onnxruntime version, cached under
# CACHE_ARM64/ort/VERSION and CACHE_ARM64/ort/numpy{1,2} (ORT < 1.19 needs numpy < 2).
devices_ort_pythonpath() { # $1 = arm64 cache dir, $2 = version
  local cache="$1" v="$2" ortsite npsite
  ortsite=$(devices_site_for "$cache/ort/$v" "onnxruntime==$v") || return 1
  if devices_ver_lt "$v" 1.19; then
    npsite=$(devices_site_for "$cache/ort/numpy1" "numpy<2") || return 1
  else
    npsite=$(devices_site_for "$cache/ort/numpy2" "numpy>=2") || return 1
  fi
  echo "$ortsite:$npsite"
}

# /proc/cpuinfo of a Raspberry Pi-class CPU as Linux on it shows it (one entry per core).
# qemu -L serves PREFIX/proc/cpuinfo instead of the host's x86 one: onnxruntime >= 1.28
# (pytorch/cpuinfo) segfaults on the x86 file, and it picks its kernels from the CPU part
# and Features here, so they must match QEMU_CPU (a Neoverse-N1 file under -cpu cortex-a72
# makes ORT run SDOT instructions the CPU lacks: SIGILL).
devices_cpuinfo() { # $1 = qemu cpu name, $2 = cores
  local cpu="$1" n="${2:-4}" part variant rev bogo feat i
  case "$cpu" in
    cortex-a53) part=0xd03 variant=0x0 rev=4 bogo=38.40 feat="fp asimd evtstrm crc32 cpuid" ;;
    cortex-a72) part=0xd08 variant=0x0 rev=3 bogo=108.00 feat="fp asimd evtstrm crc32 cpuid" ;;
    cortex-a76) part=0xd0b variant=0x4 rev=1 bogo=108.00
      feat="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
    neoverse-n1 | max) part=0xd0c variant=0x3 rev=1 bogo=50.00
      feat="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs" ;;
    *) echo "devices_cpuinfo: no cpuinfo for '$cpu'" >&2; return 1 ;;
  esac
  for ((i = 0; i < n; i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: %s\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
      "$i" "$bogo" "$feat" "$variant" "$part" "$rev"
  done
}
