#!/usr/bin/env bash
# CUDA 13.0's compiler and headers from PyPI, for building rlhf's `cuda`/`nccl`
# features on a machine without a CUDA toolkit (CI's compile check; a build machine
# without a GPU). With --libs it also fetches the libraries the binary links against
# (cuBLAS, cuRAND, NVRTC, NCCL) and makes a link-time stand-in for the driver's
# libcuda.so: the driver itself comes with the GPU's machine, which must run a driver
# for CUDA 13.0 or newer (the PTX is made by nvcc 13.0).
#
#   eval "$(tools/cuda-toolchain.sh DIR [--libs])"
#   cargo build --release --features nccl
#
# Prints the exports to evaluate: CUDA_HOME, PATH, CUDA_COMPUTE_CAP (90, Hopper,
# unless already set: the compute capability the kernels are compiled for) and
# CUDARC_CUDA_VERSION.
set -euo pipefail
DIR=${1:?usage: tools/cuda-toolchain.sh DIR [--libs]}
LIBS=${2:-}
V=13.0.88
PKGS=(nvidia-cuda-nvcc==$V nvidia-nvvm==$V nvidia-cuda-crt==$V nvidia-cuda-runtime==13.0.96
      nvidia-cuda-cccl==13.0.85)
if [ "$LIBS" = --libs ]; then
  PKGS+=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==$V nvidia-nccl-cu13==2.32.3)
fi
mkdir -p "$DIR"
# One install, every version pinned: pip --target replaces the shared `nvidia/`
# folder on a second install, and unpinned dependencies pull a newer nvvm whose PTX
# an older driver cannot load.
python3 -m pip install -q --disable-pip-version-check --target "$DIR/site" "${PKGS[@]}" >&2 \
  || python3 -m pip install -q --disable-pip-version-check --break-system-packages --target "$DIR/site" "${PKGS[@]}" >&2
CU="$DIR/site/nvidia/cu13"
ROOT="$DIR/root"
mkdir -p "$ROOT/lib"
ln -sfn "$CU/bin" "$ROOT/bin"
ln -sfn "$CU/include" "$ROOT/include"
if [ "$LIBS" = --libs ]; then
  for l in cublas cublasLt nvrtc; do ln -sf "$CU/lib/lib$l.so.13" "$ROOT/lib/lib$l.so"; done
  ln -sf "$CU/lib/libcudart.so.13" "$ROOT/lib/libcudart.so"
  ln -sf "$CU/lib/libcurand.so.10" "$ROOT/lib/libcurand.so"
  ln -sf "$DIR/site/nvidia/nccl/lib/libnccl.so.2" "$ROOT/lib/libnccl.so"
  # The driver API's entry points as empty functions under the driver's soname: the
  # linker needs them resolved; at run time the real libcuda.so.1 is loaded instead.
  SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1)
  if [ -z "$SYS" ]; then
    echo "cudarc's sources are not fetched yet: run \`cargo fetch\` first" >&2
    exit 2
  fi
  grep -oE "pub unsafe fn cu[A-Za-z0-9_]+" "$SYS" | awk '{print "void "$4"(void){}"}' | sort -u > "$ROOT/cuda_stub.c"
  cc -shared -fPIC -o "$ROOT/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$ROOT/cuda_stub.c"
fi
echo "export CUDA_HOME='$ROOT' PATH='$ROOT/bin':\"\$PATH\" CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000"
