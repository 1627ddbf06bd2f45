#!/usr/bin/env bash
# Print the Python interpreter testbed installs with: $PYTHON if set, else python3.11, else
# python3 when it is 3.11. Ray needs the same minor version on every node of a lab, and the
# pinned numpy, scipy, matplotlib and pillow need 3.11, so nothing else is taken: on Ubuntu
# 22.04 (JetPack 6 too) python3 is 3.10, and this says what to install instead. Exit 2 then.
set -u
want=3.11
version() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}
if [ -n "${PYTHON:-}" ]; then
    got=$(version "$PYTHON") || got="not a working Python"
    if [ "$got" = "$want" ]; then
        command -v "$PYTHON"
        exit 0
    fi
    echo "install.sh: PYTHON=$PYTHON is $got; testbed needs Python $want" >&2
    exit 2
fi
for cand in python$want python3; do
    command -v "$cand" >/dev/null 2>&1 || continue
    if [ "$(version "$cand")" = "$want" ]; then
        command -v "$cand"
        exit 0
    fi
done
found=$(python3 --version 2>/dev/null || echo "no python3")
echo "install.sh: testbed needs Python $want (found: $found). Debian 12: apt-get install" \
     "python3 python3-venv; Ubuntu 22.04 / JetPack 6: apt-get install python3.11" \
     "python3.11-venv (or the deadsnakes PPA), then run again (or set PYTHON=/path/to/python3.11)" >&2
exit 2
