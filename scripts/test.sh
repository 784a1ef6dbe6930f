#!/usr/bin/env bash
# The whole test suite on a fresh machine with only Rust and the OS package manager: installs
# what the tests need, or says exactly how, then runs them (what `.ci/run` runs after its format
# and lint checks).
#
#   cargo-nextest            cargo install (crates.io)
#   OpenMPI, libclang        the `mpi` feature and crates/cli/tests/mpi.rs (apt-get)
#   DejaVu Sans              `hotspa plot` (apt-get)
#   python3 with numpy,      the independent reference of crates/cli/tests/train_cli.rs, in a
#   autograd, safetensors    virtual environment under target/test-venv (pip)
#   NVRTC (no GPU, no        the CUDA kernels compile in crates/kernels/tests/cuda.rs (the
#   driver)                  nvidia-cuda-nvrtc wheel, in the same environment)
#
# Set HOTSPA_TEST_NO_INSTALL=1 to install nothing (what is missing is then only listed);
# `scripts/test.sh --setup` installs and stops (`.ci/run` lints with the MPI feature first).
set -euo pipefail
cd "$(dirname "$0")/.."
setup_only=0
[ "${1:-}" = "--setup" ] && setup_only=1

install=${HOTSPA_TEST_NO_INSTALL:-0}
missing=()

# Debian/Ubuntu packages, as root or through sudo.
apt_install() {
  if [ "$install" = 1 ]; then missing+=("apt-get install $*"); return; fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      missing+=("as root: apt-get install -y $*"); return
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    missing+=("with your package manager: $* (the Debian names)"); return
  fi
  $sudo apt-get update -q && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  if [ "$install" = 1 ]; then missing+=("cargo install cargo-nextest --locked"); else
    cargo install cargo-nextest --locked
  fi
fi

pkgs=()
# (A machine with Rust has a C linker; the -sys crates need it too.)
command -v cc >/dev/null 2>&1 || pkgs+=(gcc libc6-dev)
command -v mpirun >/dev/null 2>&1 || pkgs+=(openmpi-bin)
dpkg -s libopenmpi-dev >/dev/null 2>&1 || pkgs+=(libopenmpi-dev)
dpkg -s libclang-dev >/dev/null 2>&1 || pkgs+=(libclang-dev)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || pkgs+=(fonts-dejavu-core)
if ! command -v python3 >/dev/null 2>&1; then
  pkgs+=(python3 python3-venv)
elif ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then
  pkgs+=(python3-venv)
fi
[ ${#pkgs[@]} -eq 0 ] || apt_install "${pkgs[@]}"

# The Python side in its own environment (a distribution's python3 refuses pip installs into
# itself); the tests find it first on PATH.
venv=target/test-venv
if [ ! -x "$venv/bin/pip" ] && command -v python3 >/dev/null 2>&1; then
  if [ "$install" = 1 ]; then missing+=("python3 -m venv $venv"); else
    # (A half-made environment of an earlier try, this script's own, is made again.)
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
fi
if [ -x "$venv/bin/pip" ]; then
  if ! "$venv/bin/python3" -c "import numpy, autograd, safetensors, nvidia.cu13" >/dev/null 2>&1; then
    if [ "$install" = 1 ]; then
      missing+=("$venv/bin/pip install numpy autograd safetensors nvidia-cuda-nvrtc==13.0.*")
    else
      "$venv/bin/pip" install --quiet --disable-pip-version-check \
        numpy autograd safetensors "nvidia-cuda-nvrtc==13.0.*"
    fi
  fi
  export PATH="$PWD/$venv/bin:$PATH"
  nvrtc=$("$venv/bin/python3" -c 'import nvidia.cu13; print(list(nvidia.cu13.__path__)[0] + "/lib")' 2>/dev/null || true)
  [ -z "$nvrtc" ] || export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "The tests need, and this script did not install:" >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi
[ "$setup_only" = 0 ] || exit 0

cargo nextest run --workspace --no-fail-fast
cargo test --workspace --doc
cargo test -p kernels --features cuda --test cuda
cargo nextest run -p hotspa --features mpi --test mpi
