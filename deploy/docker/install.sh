#!/bin/sh
# Install edgeterm and its dependencies into a new virtualenv.
#
#   install.sh PREFIX SOURCE_DIR
#
# The Dockerfile's build stage runs exactly this (PREFIX=/opt/edgeterm), and so does the test
# (tests/integration/test_deploy_docker.py) in a temporary directory, with the same Python
# minor version as the distroless image (3.11). PYTHON picks the interpreter (default python3).
set -eu
prefix=$1
src=$2
"${PYTHON:-python3}" -m venv "$prefix"
# No editable install and no build tools left behind: a wheel is built from SOURCE_DIR in an
# isolated environment, then installed with its dependencies (binary wheels only: the final
# image has no compiler, and none is needed on x86-64 or arm64).
"$prefix/bin/pip" install --disable-pip-version-check --only-binary=:all: --no-binary=edgeterm "$src"
# pip itself is not needed at run time.
"$prefix/bin/pip" uninstall --yes --disable-pip-version-check pip >/dev/null
# Fail the build here, not at run time, if something is missing.
"$prefix/bin/edgeterm" --help >/dev/null
# -I: import from the virtualenv, never from the source tree in the current directory.
"$prefix/bin/python" -I -c "import edgeterm.supervisor, edgeterm.workers, cryptography, psutil"
