#!/usr/bin/env bash
# launch/cuda_toolkit.sh SITE_PACKAGES DEST: a CUDA 11.8 toolkit in DEST for compiling Horovod's
# NCCL build against the CUDA of launch/cuda11.txt (installed in SITE_PACKAGES); prints the root
# to compile with (DEST, or CUDA_HOME: below). Build time only: install.sh deletes DEST once
# Horovod's wheel is built and cached.
#
# PyPI's CUDA 11 wheels carry the headers, the runtime and NCCL, but not the compiler: their
# nvidia-cuda-nvcc-cu11 holds ptxas and NVVM, no nvcc, cicc or cudafe++, and no CUDA 11 wheel
# has the static runtime (libcudart_static.a, libcudadevrt.a) that nvcc and Horovod's CMake
# link. Those come from Debian 12's packages of the same CUDA release (nvidia-cuda-toolkit and
# nvidia-cuda-dev 11.8.89, non-free), unpacked here, nothing installed. With CUDA_HOME set to a
# CUDA 11 toolkit of the machine's own, DEST holds only the NCCL folder and CUDA_HOME is printed.
#
# DEST/bin        nvcc, cicc, ptxas, fatbinary, nvlink, cudafe++, bin2c, crt/; nvcc.profile
# DEST/include    PyPI's CUDA headers, one folder (the layout nvcc and CMake's FindCUDAToolkit expect)
# DEST/lib64      libcudart.so -> PyPI's libcudart.so.11.0; the two static archives
# DEST/nvvm       libdevice
# DEST/nccl       include/ and lib/libnccl.so -> PyPI's NCCL (for HOROVOD_NCCL_HOME)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/debian_nonfree.sh"
site=${1:?usage: cuda_toolkit.sh SITE_PACKAGES DEST}
dest=${2:?usage: cuda_toolkit.sh SITE_PACKAGES DEST}
nv=$site/nvidia

mkdir -p "$dest/nccl/lib"
ln -sfn "$nv/nccl/include" "$dest/nccl/include"
ln -sfn "$nv/nccl/lib/libnccl.so.2" "$dest/nccl/lib/libnccl.so"

# The machine's own toolkit, when CUDA_HOME names a CUDA 11 one: nothing more to assemble.
if [ -n "${CUDA_HOME:-}" ] && "$CUDA_HOME/bin/nvcc" --version 2>/dev/null | grep -q 'release 11\.'; then
  echo "$CUDA_HOME"
  exit 0
fi

mkdir -p "$dest/include" "$dest/lib64" "$dest/bin" "$dest/nvvm"
debs=$(mktemp -d)
trap 'rm -rf "$debs"' EXIT
nonfree_download "$debs" "nvidia-cuda-toolkit=$CUDA_DEB_VERSION" "nvidia-cuda-dev=$CUDA_DEB_VERSION" ||
  { echo "could not fetch CUDA 11.8's compiler from Debian; set CUDA_HOME to a CUDA 11 toolkit" >&2; exit 1; }
x=$debs/x
mkdir -p "$x"
dpkg-deb --fsys-tarfile "$debs"/nvidia-cuda-toolkit_*.deb | tar -x -C "$x" ./usr/bin ./usr/lib/nvidia-cuda-toolkit
dpkg-deb --fsys-tarfile "$debs"/nvidia-cuda-dev_*.deb |
  tar -x -C "$x" ./usr/lib/x86_64-linux-gnu/libcudart_static.a ./usr/lib/x86_64-linux-gnu/libcudadevrt.a
# Debian's /usr/bin/nvcc is a wrapper script; the compiler is under usr/lib/nvidia-cuda-toolkit.
cp -a "$x/usr/lib/nvidia-cuda-toolkit/bin/nvcc" "$x/usr/lib/nvidia-cuda-toolkit/bin/cicc" \
      "$x/usr/lib/nvidia-cuda-toolkit/bin/crt" "$dest/bin/"
for tool in ptxas fatbinary nvlink cudafe++ bin2c; do cp -a "$x/usr/bin/$tool" "$dest/bin/"; done
cp -a "$x/usr/lib/nvidia-cuda-toolkit/libdevice" "$dest/nvvm/libdevice"
cp -a "$x"/usr/lib/x86_64-linux-gnu/lib*.a "$dest/lib64/"
# nvcc reads nvcc.profile beside itself; Debian's points into /usr, this one into DEST.
cat > "$dest/bin/nvcc.profile" <<'EOF'
TOP = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH += $(_HERE_):
INCLUDES += "-I$(TOP)/include" $(_SPACE_)
LIBRARIES =+ $(_SPACE_) "-L$(TOP)/lib64"
EOF

for pkg in cuda_runtime cuda_nvcc cuda_nvrtc cublas cudnn cufft curand cusolver nvtx; do
  for entry in "$nv/$pkg/include"/*; do
    case "$(basename "$entry")" in __init__.py|__pycache__) ;; *) ln -sfn "$entry" "$dest/include/" ;; esac
  done
done
ln -sfn "$nv/cuda_runtime/lib/libcudart.so.11.0" "$dest/lib64/libcudart.so"
"$dest/bin/nvcc" --version | grep -q 'release 11\.8' || { echo "the assembled nvcc does not run" >&2; exit 1; }
echo "$dest"
