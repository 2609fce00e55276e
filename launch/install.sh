#!/usr/bin/env bash
# Install distbn into ./.venv on a fresh machine: Gloo's headers and library (Debian's
# libgloo-dev, for distbn's sync all-reduce), MXNet (CPU or CUDA 11.2 build), Horovod compiled
# against it (MXNet + Gloo, plus NCCL on GPU machines), then distbn itself; and Fashion-MNIST
# where no copy is found (a download, else Debian's dataset-fashion-mnist as root).
# GPU machines need only NVIDIA's driver: CUDA's libraries come from PyPI (launch/cuda11.txt),
# and Horovod's NCCL build compiles with CUDA 11.8's nvcc (launch/cuda_toolkit.sh; docs/gpu.md).
#
#   launch/install.sh            # auto: CUDA build if `nvidia-smi -L` lists a GPU, else CPU
#   DISTBN_DEVICE=gpu launch/install.sh   # force mxnet-cu112 and CUDA 11.8 from PyPI
#   DISTBN_DEVICE=cpu launch/install.sh   # force the CPU build
#   DISTBN_EXTRAS=dev,bench,book launch/install.sh   # extras of pyproject.toml (default: dev)
#
# Idempotent: a stamp in .venv records what was installed; with nothing changed a re-run only
# re-verifies (a few seconds). The Horovod wheel is cached by us under a directory whose name
# records Python, MXNet build and Horovod version, because pip's own wheel cache ignores the
# HOROVOD_* variables and would silently reuse a wheel built without MXNet.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
PYTHON=${PYTHON:-python3}
VENV=${DISTBN_VENV:-$here/.venv}
EXTRAS=${DISTBN_EXTRAS:-dev}
HOROVOD_VERSION=0.28.1
MXNET_VERSION=1.9.1
WHEEL_CACHE=${DISTBN_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distbn/wheels}

log() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

device=${DISTBN_DEVICE:-auto}
if [ "$device" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    device=gpu
  else
    device=cpu
  fi
fi
case "$device" in
  cpu) mxnet_pkg=mxnet; cuda_reqs=() ;;
  gpu) mxnet_pkg=mxnet-cu112; cuda_reqs=(-r "$here/launch/cuda11.txt") ;;
  *) die "DISTBN_DEVICE must be auto, cpu or gpu (got '$device')" ;;
esac

# Everything that decides the result of an install goes into the stamp.
stamp_file="$VENV/.distbn-install-stamp"
stamp=$( { echo "$device $EXTRAS $HOROVOD_VERSION $MXNET_VERSION";
           cat pyproject.toml constraints.txt launch/install.sh launch/cuda11.txt launch/cuda_toolkit.sh launch/debian_nonfree.sh \
               distbn/csrc/*; } | sha256sum | cut -d' ' -f1)

verify() {
  # --check-build must list MXNet and Gloo as built; the import proves the extension loads.
  local out
  out=$("$VENV/bin/horovodrun" --check-build 2>&1) || { echo "$out" >&2; return 1; }
  grep -q '\[X\] MXNet' <<<"$out" || { echo "$out" >&2; echo "Horovod was built without MXNet" >&2; return 1; }
  grep -q '\[X\] Gloo' <<<"$out" || { echo "$out" >&2; echo "Horovod was built without Gloo" >&2; return 1; }
  [ "$device" = cpu ] || grep -q '\[X\] NCCL' <<<"$out" || { echo "$out" >&2; echo "Horovod was built without NCCL" >&2; return 1; }
  "$VENV/bin/python" -W ignore -c 'import horovod.mxnet as hvd, distbn; hvd.init(); assert hvd.size() == 1'
}

# Fashion-MNIST, which the trainer reads: found and verified where a copy is (DISTBN_DATA_DIR,
# the user cache, Debian's copy), else downloaded into the cache, else, as root, Debian's
# dataset-fashion-mnist package; otherwise distbn.data's message says what to do.
ensure_data() {
  local code=0
  "$VENV/bin/python" -W ignore -m distbn.data 2>/dev/null && return 0 || code=$?
  if [ "$code" = 3 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "Fashion-MNIST: no copy here and no download; installing Debian's dataset-fashion-mnist"
    apt_install dataset-fashion-mnist || die "apt-get install dataset-fashion-mnist failed"
  fi
  "$VENV/bin/python" -W ignore -m distbn.data || die "no Fashion-MNIST to train on (see above)"
}

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}

# mxnet-cu112's libmxnet.so looks for its libraries in its RPATH, $ORIGIN. PyPI's CUDA folders
# are added to it (patchelf; DT_RPATH as the wheel has it, which the libraries it loads search
# too), so every `import mxnet` in the venv finds them, whatever is imported first, with no
# LD_LIBRARY_PATH. Only libcuda.so.1 comes from the machine: it is the driver's.
link_cuda_libraries() {
  "${pip[@]}" install -q patchelf
  local so=$site/mxnet/libmxnet.so rpath='$ORIGIN' pkg
  for pkg in cuda_runtime cuda_nvrtc cublas cudnn cufft curand cusolver nvtx nccl; do
    rpath="$rpath:\$ORIGIN/../nvidia/$pkg/lib"
  done
  [ "$("$VENV/bin/patchelf" --print-rpath "$so")" = "$rpath" ] ||
    "$VENV/bin/patchelf" --force-rpath --set-rpath "$rpath" "$so"
}

# Horovod's NCCL build: CUDA 11.8 in $1 (launch/cuda_toolkit.sh: PyPI's headers, runtime and
# NCCL, Debian's nvcc; or CUDA_HOME's own CUDA 11 toolkit), kernels for exactly the compute
# capabilities of MXNet's wheel (distbn/gpu.py), and a host compiler nvcc 11.8 accepts.
nccl_build_env() {
  local tk=$1 cuda_home cxx
  cuda_home=$(bash "$here/launch/cuda_toolkit.sh" "$site" "$tk") || die "could not assemble CUDA 11.8 for Horovod's build"
  cxx=$(host_cxx) || die "nvcc 11.8 needs GCC 11 or older (here: $(g++ -dumpversion 2>/dev/null || echo none)): run 'sudo apt-get install g++-11', then again"
  build_env+=(HOROVOD_GPU_OPERATIONS=NCCL "HOROVOD_CUDA_HOME=$cuda_home" "HOROVOD_NCCL_HOME=$tk/nccl"
              HOROVOD_NCCL_LINK=SHARED "HOROVOD_BUILD_CUDA_CC_LIST=$(wheel_cc_list)"
              "CXX=$cxx" "CC=${cxx/g++/gcc}")
}

# The first g++ of version 11 or older (Horovod compiles CUDA with its C++ compiler); as root,
# Debian's g++-11 when there is none (Debian 12's own g++ is 12).
host_cxx() {
  local c
  for c in "${CXX:-g++}" g++-11 g++-10 g++-9; do
    if command -v "$c" >/dev/null 2>&1 && [ "$("$c" -dumpversion | cut -d. -f1)" -le 11 ]; then
      echo "$c"; return 0
    fi
  done
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
  log "installing Debian's g++-11 (the host compiler of nvcc 11.8)"
  apt_install g++-11 && echo g++-11
}

# 50,60,70,80,86: distbn.gpu's list, read without importing distbn (which imports MXNet).
wheel_cc_list() {
  "$VENV/bin/python" -c "import sys; sys.path.insert(0, '$here/distbn'); import gpu
print(','.join(f'{m}{n}' for m, n in gpu.WHEEL_ARCHITECTURES))"
}

# Gloo for distbn's own operator (Horovod builds its own copy from its sources, internally).
if [ ! -f /usr/include/gloo/allreduce_halving_doubling.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's libgloo-dev (Gloo, the sync layers' collective library)"
    apt_install libgloo-dev || die "apt-get install libgloo-dev failed"
  else
    die "Gloo's headers are missing: run 'sudo apt-get install libgloo-dev' (Debian 12 / Ubuntu 22.04 and later), then again"
  fi
fi

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && verify; then
  log "up to date ($device build in $VENV)"
  ensure_data
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PIP_CONSTRAINT="$here/constraints.txt"

# The other build first: both install into site-packages/mxnet, and removing one afterwards
# would delete the files of the other.
if [ "$device" = cpu ] && "${pip[@]}" show -q mxnet-cu112 >/dev/null 2>&1; then
  "${pip[@]}" uninstall -y -q mxnet-cu112
elif [ "$device" = gpu ] && "${pip[@]}" show -q mxnet >/dev/null 2>&1; then
  "${pip[@]}" uninstall -y -q mxnet
fi
what="numpy, $mxnet_pkg==$MXNET_VERSION"
[ "$device" = cpu ] || what="$what, CUDA 11.8's libraries (launch/cuda11.txt)"
log "installing $what and Horovod's build requirements"
"${pip[@]}" install -q numpy "$mxnet_pkg==$MXNET_VERSION" "${cuda_reqs[@]}" wheel packaging cloudpickle psutil pyyaml
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ "$device" = cpu ] || link_cuda_libraries
command -v cmake >/dev/null 2>&1 || "${pip[@]}" install -q cmake

pytag=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
ops=gloo; [ "$device" = gpu ] && ops=gloo-nccl-cu118
wheel_dir="$WHEEL_CACHE/horovod-$HOROVOD_VERSION-$pytag-$mxnet_pkg-$MXNET_VERSION-$ops-$(uname -m)"
if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  log "building Horovod $HOROVOD_VERSION against $mxnet_pkg (2-3 minutes) into $wheel_dir"
  tmp=$(mktemp -d "${WHEEL_CACHE%/}.tmp.XXXXXX" 2>/dev/null || { mkdir -p "$WHEEL_CACHE"; mktemp -d "$WHEEL_CACHE/.tmp.XXXXXX"; })
  build_env=(HOROVOD_WITH_MXNET=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1
             HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo)
  [ "$device" = cpu ] || nccl_build_env "$tmp/cuda"
  env "${build_env[@]}" MAKEFLAGS="-j$(nproc)" \
      "${pip[@]}" wheel --no-deps --no-build-isolation --no-cache-dir -w "$tmp" "horovod==$HOROVOD_VERSION"
  rm -rf "$tmp/cuda"
  mkdir -p "$(dirname "$wheel_dir")"
  rm -rf "$wheel_dir"
  mv "$tmp" "$wheel_dir"   # atomic: a half-built wheel never sits under the final name
fi
log "installing Horovod from $wheel_dir"
"${pip[@]}" install -q --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
"${pip[@]}" install -q cloudpickle psutil pyyaml

log "installing distbn (editable) with extras [$EXTRAS]"
"${pip[@]}" install -q -e ".[${EXTRAS}]"

log "building distbn's C++ batch-norm operators (distbn/csrc) against the installed MXNet"
"$VENV/bin/python" -W ignore -c 'from distbn import native; native.load(); print(native.library_path())' ||
  die "could not build distbn/csrc (needs g++ and libgloo-dev; see the message above)"
verify || die "verification failed: Horovod cannot run with MXNet in $VENV"
echo "$stamp" > "$stamp_file"
ensure_data
log "done ($device build in $VENV)"
