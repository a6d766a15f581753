#!/usr/bin/env bash
# Idempotent set-up of .venv-legacy: tflite-runtime 2.14 with numpy < 2, for the test that runs
# the same model files under both runtimes (tests/unit/test_models_runtimes.py). fogline itself
# needs numpy 2, so this interpreter lives in its own virtual environment.
#
# Prints nothing when the environment is already in place. If tflite-runtime cannot be
# installed here (no wheel for this platform or Python, no network), the set-up still succeeds:
# it says so once and records why in .venv-legacy/UNAVAILABLE, and the test skips with that
# reason. To retry after fixing the cause: rm -rf .venv-legacy && scripts/setup-legacy.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCRIPT=scripts/setup-legacy.sh
PYTHON="${LEGACY_PYTHON:-${PYTHON:-python3}}"
VENV=.venv-legacy
STAMP="$VENV/.fogline-legacy-installed"
MARKER="$VENV/UNAVAILABLE"
REQUIREMENTS=("tflite-runtime==2.14.0" "numpy<2")

# Done (installed, or recorded as unavailable) by this version of the script: nothing to do.
if [ -f "$STAMP" ] && [ ! "$SCRIPT" -nt "$STAMP" ]; then
    exit 0
fi

say() { echo "fogline setup: $*"; }

# Record why the legacy runtime is missing, warn once, and let the rest of the set-up go on.
unavailable() {
    local reason=$1 details=${2:-}
    mkdir -p "$VENV"
    {
        echo "$reason"
        if [ -n "$details" ]; then
            echo
            printf '%s\n' "$details"
        fi
    } >"$MARKER"
    touch "$STAMP"
    echo "fogline setup: $reason; the cross-runtime test will be skipped (details: $MARKER)" >&2
    exit 0
}

rm -f "$MARKER"
platform="$(uname -s) $(uname -m)"

if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 \
        || unavailable "$PYTHON not found, so no tflite-runtime 2.14 environment"
    say "creating $VENV for tflite-runtime 2.14"
    if ! out=$("$PYTHON" -m venv "$VENV" 2>&1); then
        unavailable "'$PYTHON -m venv $VENV' failed" "$(tail -n 20 <<<"$out")"
    fi
    # Keep the environment out of git (the repository's .gitignore only names .venv/).
    echo '*' >"$VENV/.gitignore"
fi

pyver=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>&1) \
    || unavailable "$VENV/bin/python does not run" "$pyver"
say "installing ${REQUIREMENTS[*]} into $VENV"
if ! out=$("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "${REQUIREMENTS[@]}" 2>&1); then
    unavailable "tflite-runtime 2.14.0 could not be installed for Python $pyver on $platform (pip failed)" \
        "$(tail -n 20 <<<"$out")"
fi
# A wheel that installs but cannot load (e.g. a too-old glibc) is just as unusable.
if ! out=$("$VENV/bin/python" -I -c 'import numpy, tflite_runtime.interpreter' 2>&1); then
    unavailable "tflite-runtime 2.14.0 installed but does not import on Python $pyver, $platform" \
        "$(tail -n 20 <<<"$out")"
fi
touch "$STAMP"
