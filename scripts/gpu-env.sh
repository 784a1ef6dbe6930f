# Source this on a GPU machine before running a hotspa built with --features cuda:
#   . scripts/gpu-env.sh
# It puts the folders holding libcublas.so.13, libnvrtc.so.13 and libnccl.so.2 on
# LD_LIBRARY_PATH: the CUDA toolkit's, or the pip wheels' that PyTorch brings.
for lib in libcublas.so.13 libnvrtc.so.13 libnccl.so.2; do
  if ! ldconfig -p 2>/dev/null | grep -q "$lib"; then
    d=$(find /usr/local/cuda*/ /usr/local/nvidia /opt /usr/lib /usr/local/lib -name "$lib" 2>/dev/null | head -1)
    if [ -n "$d" ]; then
      LD_LIBRARY_PATH="$(dirname "$d")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    else
      echo "gpu-env: $lib not found" >&2
    fi
  fi
done
export LD_LIBRARY_PATH
