#!/bin/sh
# Install edgeterm and its dependencies, and nothing else, into a new virtualenv.
#
#   install.sh PREFIX SOURCE_DIR
#
# The Dockerfile's build stage runs exactly this (PREFIX=/opt/edgeterm), and so does the test
# (tests/integration/test_deploy_docker.py) in a temporary directory, with the same Python
# minor version as the distroless image (3.11). PYTHON picks the interpreter (default python3).
set -eu
prefix=$1
src=$2
python=${PYTHON:-python3}

# The virtualenv that ships: --without-pip, so no pip, setuptools, pkg_resources or
# _distutils_hack (what `python -m venv` seeds by default) is ever in it.
"$python" -m venv --without-pip "$prefix"

# A throwaway virtualenv that holds pip, which installs into the shipped one from outside
# (pip --python); removed at the end.
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$python" -m venv "$tools"

# No editable install and no build tools left behind: a wheel is built from SOURCE_DIR in an
# isolated environment, then installed with its dependencies (binary wheels only: the final
# image has no compiler, and none is needed on x86-64 or arm64).
# The modules are byte-compiled here: the image's file system is read-only at run time.
"$tools/bin/pip" --python "$prefix/bin/python" install --disable-pip-version-check \
    --only-binary=:all: --no-binary=edgeterm "$src"

# Fail the build here, not at run time, if something is missing or something extra came in.
"$prefix/bin/edgeterm" --help >/dev/null
# -I: import from the virtualenv, never from the source tree in the current directory.
"$prefix/bin/python" -I -c "import edgeterm.supervisor, edgeterm.workers, cryptography, psutil"
"$prefix/bin/python" -I -c '
import importlib.util, sys
extra = [m for m in ("pip", "setuptools", "pkg_resources", "_distutils_hack", "wheel")
         if importlib.util.find_spec(m) is not None]
sys.exit(f"not for the image: {extra}" if extra else 0)
'
