#!/usr/bin/env bash
# Set up a vmquota development/CI machine (Debian 12, root, no systemd needed):
#   1. Debian packages for libvirt/QEMU/KVM and for building libvirt-python
#      (installed only if missing; `apt-get update` only when needed),
#   2. .venv in the repo root with pip >= 25.1 and `pip install -e . --group dev`
#      (re-run only when pyproject.toml is newer than .venv/.installed-stamp),
#   3. scripts/libvirtd-up.sh (libvirtd answering on qemu:///system).
# Idempotent; a run with nothing to do takes about a second.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.installed-stamp"
PYTHON="${PYTHON:-python3}"
MIN_PIP="25.1"

APT_PACKAGES=(
    libvirt-daemon-system
    libvirt-daemon
    libvirt-clients
    qemu-system-x86
    qemu-utils
    libvirt-dev
    pkg-config
    gcc
    python3-dev
    prometheus  # promtool and a real Prometheus for the tests of monitoring/ (the daemon is never started)
    chromium  # the dashboard's browser tests (tests/test_dashboard.py): Playwright drives it headless
    # scripts/build-test-guest.sh: the real Linux guest of the end-to-end tests (its kernel is downloaded, not installed)
    busybox-static
    syslinux
    syslinux-common
    mtools
    dosfstools
    cpio
)

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# run_logged LOGFILE CMD...: run quietly; on failure print the log's tail and fail.
run_logged() {
    local log="$1"; shift
    if ! "$@" >>"$log" 2>&1; then
        say "command failed: $*"
        say "last lines of $log:"
        tail -n 40 "$log" >&2 || true
        exit 1
    fi
}

# --- 1. Debian packages ------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to install: ${missing[*]}"
        SUDO="sudo"
    fi
    APT_LOG="/tmp/vmquota-bootstrap-apt.log"
    : >"$APT_LOG"
    say "installing Debian packages: ${missing[*]} (log: $APT_LOG)"
    run_logged "$APT_LOG" $SUDO apt-get update
    run_logged "$APT_LOG" $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
fi

# --- 2. virtualenv + editable install ----------------------------------------
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "creating virtualenv $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed"
    rm -f "$STAMP"
fi
mkdir -p "$VENV"
PIP_LOG="$VENV/pip-install.log"

pip_ok() {
    "$VENV/bin/python" - "$MIN_PIP" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
def key(v):
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        out.append(int(digits))
    return tuple(out)
sys.exit(0 if key(version("pip")) >= key(sys.argv[1]) else 1)
EOF
}

if [ ! -f "$STAMP" ] || [ "$REPO_ROOT/pyproject.toml" -nt "$STAMP" ] || ! pip_ok; then
    : >"$PIP_LOG"
    if ! pip_ok; then
        say "upgrading pip in .venv to >= $MIN_PIP (dependency groups, PEP 735)"
        run_logged "$PIP_LOG" "$VENV/bin/python" -m pip install --upgrade "pip>=$MIN_PIP"
    fi
    say "pip install -e . --group dev (builds libvirt-python against the host libvirt; log: $PIP_LOG)"
    (cd "$REPO_ROOT" && run_logged "$PIP_LOG" "$VENV/bin/python" -m pip install -e . --group dev)
    touch "$STAMP"
    say "python deps installed ($("$VENV/bin/python" -m pip --version | cut -d' ' -f1-2))"
fi

# --- 3. libvirtd ---------------------------------------------------------------
bash "$REPO_ROOT/scripts/libvirtd-up.sh"
say "done (activate with: . .venv/bin/activate)"
