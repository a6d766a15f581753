#!/usr/bin/env bash
# Idempotent developer set-up used by the Makefile: Python >= 3.11, .venv with fogline[dev],
# and the Mosquitto broker + clients. Prints nothing when everything is already in place.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.fogline-installed"

say() { echo "fogline setup: $*"; }
die() { echo "fogline setup: $*" >&2; exit 1; }

# --- Python -------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 \
        || die "$PYTHON not found; install Python 3.11 or newer (or set PYTHON=/path/to/python3.11)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$("$PYTHON" --version 2>&1) is too old; fogline needs Python 3.11 or newer (set PYTHON=...)"
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$VENV uses $("$VENV/bin/python" --version 2>&1); fogline needs 3.11+: rm -rf $VENV and rerun"

# Reinstall only when pyproject.toml changed since the last successful install.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    say "installing fogline and dev tools into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    touch "$STAMP"
fi

# --- Mosquitto ----------------------------------------------------------------------------
# Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
have() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]
}

missing=()
for tool in mosquitto mosquitto_sub mosquitto_pub; do
    have "$tool" || missing+=("$tool")
done

if [ "${#missing[@]}" -gt 0 ]; then
    install_cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto mosquitto-clients"
    if [ "$(id -u)" -ne 0 ]; then
        die "missing ${missing[*]}; run: sudo sh -c '$install_cmd'  (then rerun make)"
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "missing ${missing[*]} and apt-get is not available; install mosquitto and mosquitto-clients with your package manager"
    say "installing mosquitto and mosquitto-clients (missing: ${missing[*]})"
    # On Debian this may also start a system mosquitto on 1883; fogline brokers use their own ports.
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    for tool in mosquitto mosquitto_sub mosquitto_pub; do
        have "$tool" || die "$tool is still missing after apt-get install; check the apt output above"
    done
fi

# --- libfaketime, for the clock-skew chaos test (optional: the test skips and says why) --------
if ! ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing faketime (clock-skew tests)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null) \
            || say "could not install faketime; the clock-skew tests will be skipped"
    else
        say "faketime is not installed; the clock-skew tests will be skipped (apt-get install faketime)"
    fi
fi

# --- tflite-runtime 2.14 (numpy < 2) in .venv-legacy, for the cross-runtime model test --------
# Never fails the set-up: without a wheel for this machine the test skips and says why.
bash scripts/setup-legacy.sh
