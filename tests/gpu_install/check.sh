#!/usr/bin/env bash
# The GPU install, checked on a machine without a GPU (`make check-gpu-install`; docs/gpu.md).
#
# 1. NVIDIA's driver library stands in for the driver: libcuda.so.1 of Debian 12's libcuda1
#    (driver 535, non-free), unpacked into the cache and put on the library path, where a
#    driver install puts it. With no GPU and no kernel module, cuInit answers "no CUDA-capable
#    device": what MXNet sees on a GPU machine whose GPUs are hidden (CUDA_VISIBLE_DEVICES=).
# 2. The install exactly as a GPU machine runs it: DISTBN_DEVICE=gpu launch/install.sh, into a
#    venv of its own (DISTBN_GPU_VENV, default .venv-gpu).
# 3. What the install must give: mxnet, horovod.mxnet and distbn import; every CUDA library
#    libmxnet.so needs resolves inside the venv (only libcuda.so.1 outside it); Horovod lists
#    NCCL; the wheel's GPU code is for exactly distbn.gpu's compute capabilities (cuobjdump of
#    CUDA 11.8); then a named set of the CPU tests, on the GPU wheel (TESTS below).
# Prints the time, what was downloaded and the venv's size; exits non-zero at the first failure.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$here"
. launch/debian_nonfree.sh
VENV=${DISTBN_GPU_VENV:-$here/.venv-gpu}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/distbn
driver=$cache/driver-stand-in
# Layer proofs at 2 workers with their negative controls (the C++ kernels, and the MXNet-operator
# graph that GPUs take), the one-process layer tests, the GPU lines of distbn/csrc, the GPU
# refusal, and short trainer runs at 1 and 2 workers.
mp=tests/test_syncbn_mp.py
TESTS=(tests/test_native.py tests/test_gpu.py tests/test_layers.py
       "$mp::test_sync_equals_plain_bn_on_the_concatenated_batch[equal-2-2]"
       "$mp::test_sync_equals_plain_bn_on_the_concatenated_batch[unequal-4-2]"
       "$mp::test_sync_with_mxnet_operator_statistics[2]"
       "$mp::test_local_bn_is_caught_by_the_same_check"
       "$mp::test_model_zoo_network_equals_one_process[resnet18_v1-2]"
       "$mp::test_model_zoo_local_bn_is_caught_by_the_same_check"
       tests/test_train.py::test_smoke_one_process_writes_everything
       tests/test_train.py::test_two_workers_sync_bn_identical_replicas_and_tracks_one_process)

say() { printf '[gpu-install check] %s\n' "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }
received() { awk -F'[: ]+' 'NR > 2 && $2 != "lo" { s += $3 } END { printf "%.0f\n", s }' /proc/net/dev; }

start=$(date +%s) rx0=$(received)
if [ ! -e "$driver/libcuda.so.1" ]; then
  say "fetching the driver's libcuda.so.1 (Debian's libcuda1) into $driver"
  tmp=$(mktemp -d)
  nonfree_download "$tmp" libcuda1 || fail "could not fetch Debian's libcuda1"
  dpkg-deb -x "$tmp"/libcuda1_*.deb "$tmp/x"
  mkdir -p "$driver"
  cp -a "$tmp"/x/usr/lib/x86_64-linux-gnu/nvidia/current/libcuda.so* "$driver/"
  rm -rf "$tmp"
fi
export LD_LIBRARY_PATH=$driver${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

say "DISTBN_DEVICE=gpu DISTBN_VENV=$VENV launch/install.sh"
DISTBN_DEVICE=gpu DISTBN_VENV="$VENV" bash launch/install.sh || fail "the GPU install"
installed=$(date +%s) rx1=$(received)
py=$VENV/bin/python

"$py" -W ignore -c '
import mxnet as mx, horovod.mxnet as hvd, distbn
from distbn import native
assert mx.runtime.Features().is_enabled("CUDA"), "not the CUDA build of MXNet"
assert mx.context.num_gpus() == 0, "the stand-in driver reported GPUs"
hvd.init()
assert hvd.nccl_built() and hvd.size() == 1
assert native.available() and native.kernels(), "distbn/csrc is not loaded, or not on the CPU path"
print("imports: mxnet", mx.__version__, "(CUDA build, 0 GPUs seen), horovod.mxnet (NCCL built), distbn")
' || fail "imports"

site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
libs=$(ldd "$site/mxnet/libmxnet.so")
! grep -q 'not found' <<<"$libs" || fail "libmxnet.so: $(grep 'not found' <<<"$libs")"
for soname in libcudart.so.11.0 libcublas.so.11 libcudnn.so.8 libcufft.so.10 libcusolver.so.11 \
              libcurand.so.10 libnvrtc.so.11.2 libnvToolsExt.so.1 libnccl.so.2; do
  where=$(realpath -m "$(awk -v s="$soname" '$1 == s { print $3 }' <<<"$libs")")
  case "$where" in "$site"/nvidia/*) ;; *) fail "$soname resolves to '$where', not the venv's" ;; esac
done
say "libraries: libmxnet.so finds CUDA's 9 libraries in $site/nvidia, libcuda.so.1 at $(awk '$1 == "libcuda.so.1" { print $3 }' <<<"$libs")"

"$VENV/bin/horovodrun" --check-build | grep -q '\[X\] NCCL' || fail "horovodrun --check-build lists no NCCL"
say "horovodrun --check-build: NCCL, Gloo, MXNet"

tmp=$(mktemp -d)
nonfree_download "$tmp" "nvidia-cuda-toolkit=$CUDA_DEB_VERSION" || fail "could not fetch cuobjdump"
dpkg-deb --fsys-tarfile "$tmp"/nvidia-cuda-toolkit_*.deb | tar -x -C "$tmp" ./usr/bin/cuobjdump
cubins=$("$tmp/usr/bin/cuobjdump" --list-elf "$site/mxnet/libmxnet.so" | grep -o 'sm_[0-9]*' | sort -u | xargs)
ptx=$("$tmp/usr/bin/cuobjdump" --list-ptx "$site/mxnet/libmxnet.so" 2>&1 | grep -c '^PTX file' || true)
rm -rf "$tmp"
want=$("$py" -c "import sys; sys.path.insert(0, 'distbn'); import gpu
print(' '.join(f'sm_{m}{n}' for m, n in gpu.WHEEL_ARCHITECTURES))")
[ "$cubins" = "$want" ] && [ "$ptx" = 0 ] || fail "the wheel has cubins $cubins and $ptx PTX; distbn.gpu says $want"
say "the wheel's GPU code: cubins $cubins, no PTX: distbn.gpu's list"

say "the CPU tests on the GPU wheel: ${TESTS[*]}"
bash tests/hosts/install.sh
"$py" -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}" || fail "the tests above"
end=$(date +%s) rx2=$(received)
say "passed: install $((installed - start)) s, checks and tests $((end - installed)) s;" \
    "this machine received $(( (rx1 - rx0) / 1000000 )) MB during the install and" \
    "$(( (rx2 - rx1) / 1000000 )) MB after it; venv $(du -sh "$VENV" | cut -f1)"
