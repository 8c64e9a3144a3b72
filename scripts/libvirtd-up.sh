#!/usr/bin/env bash
# Make sure a system libvirtd answers on qemu:///system, starting it by hand
# when there is no service manager (no systemd; Debian 12's monolithic libvirtd).
#
# - If `virsh -c qemu:///system version` already answers: exit 0 at once.
# - Otherwise: configure /etc/libvirt/qemu.conf so QEMU runs as root without a
#   security driver (disk images anywhere under /root are readable), create the
#   runtime/log folders, start virtlogd and libvirtd daemonised (unix socket
#   only, no TCP/TLS listener), and wait up to LIBVIRTD_WAIT seconds (30).
# - Print whether KVM works or QEMU will fall back to TCG emulation.
# Needs root. Safe to run any number of times.
set -euo pipefail

URI="qemu:///system"
QEMU_CONF="/etc/libvirt/qemu.conf"
LOG_DIR="/var/log/libvirt"
LIBVIRTD_LOG="$LOG_DIR/libvirtd.log"
VIRTLOGD_LOG="$LOG_DIR/virtlogd.log"
WAIT_SECS="${LIBVIRTD_WAIT:-30}"
export PATH="$PATH:/usr/sbin:/sbin"

say() { printf 'libvirtd-up: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

virsh_answers() {
    timeout 10 virsh -c "$URI" version >/dev/null 2>&1
}

report_kvm() {
    if timeout 60 virsh -c "$URI" domcapabilities --virttype kvm >/dev/null 2>&1; then
        say "KVM: available"
    else
        say "KVM: not available, QEMU emulation (TCG) will be used"
    fi
}

if virsh_answers; then
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root to start libvirtd"
for bin in libvirtd virtlogd virsh; do
    command -v "$bin" >/dev/null 2>&1 \
        || die "$bin not found; install libvirt-daemon-system and libvirt-clients (scripts/bootstrap.sh does)"
done

# --- qemu.conf: QEMU as root, no relabelling, no AppArmor/SELinux ----------
# set_conf KEY VALUE: make sure exactly one active "KEY = VALUE" line exists.
conf_changed=0
set_conf() {
    local key="$1" value="$2" want
    want="$key = $value"
    local active
    active=$(grep -Ec "^[[:space:]]*${key}[[:space:]]*=" "$QEMU_CONF" || true)
    if [ "$active" -gt 0 ]; then
        if [ "$active" -eq 1 ] && grep -Fxq "$want" "$QEMU_CONF"; then
            return 0
        fi
        backup_conf
        # Replace every active setting of KEY by the wanted one (dups collapse to same line).
        sed -i -E "s|^[[:space:]]*${key}[[:space:]]*=.*$|${want//|/\\|}|" "$QEMU_CONF"
        # Keep only the first occurrence.
        awk -v w="$want" '$0 == w { if (seen++) next } { print }' "$QEMU_CONF" >"$QEMU_CONF.tmp" \
            && cat "$QEMU_CONF.tmp" >"$QEMU_CONF" && rm -f "$QEMU_CONF.tmp"
    else
        backup_conf
        if ! grep -Fq "# Added by vmquota scripts/libvirtd-up.sh" "$QEMU_CONF"; then
            printf '\n# Added by vmquota scripts/libvirtd-up.sh\n' >>"$QEMU_CONF"
        fi
        printf '%s\n' "$want" >>"$QEMU_CONF"
    fi
    conf_changed=1
}
backup_conf() {
    [ -e "$QEMU_CONF.vmquota-orig" ] || cp -p "$QEMU_CONF" "$QEMU_CONF.vmquota-orig"
}

[ -f "$QEMU_CONF" ] || die "$QEMU_CONF missing (is libvirt-daemon-driver-qemu installed?)"
set_conf user '"root"'
set_conf group '"root"'
set_conf dynamic_ownership 0
set_conf remember_owner 0
set_conf security_driver '"none"'
if [ "$conf_changed" -eq 1 ]; then
    say "configured $QEMU_CONF (QEMU as root, no security driver; backup: $QEMU_CONF.vmquota-orig)"
fi

# --- folders libvirtd and QEMU expect (normally made by systemd-tmpfiles) -----
mkdir -p /run/libvirt /run/libvirt/qemu /run/libvirt/network /run/libvirt/common \
    "$LOG_DIR" "$LOG_DIR/qemu" \
    /var/lib/libvirt/qemu /var/lib/libvirt/images /var/lib/libvirt/boot \
    /var/cache/libvirt/qemu

# --- virtlogd (QEMU's stdio handler "logd" talks to it) -----------------------
if ! pidof virtlogd >/dev/null 2>&1; then
    say "starting virtlogd"
    LIBVIRT_LOG_OUTPUTS="3:file:$VIRTLOGD_LOG" \
        virtlogd --daemon </dev/null >>"$VIRTLOGD_LOG" 2>&1 \
        || die "virtlogd failed to start; see $VIRTLOGD_LOG: $(tail -n 5 "$VIRTLOGD_LOG" 2>/dev/null)"
fi
# virtlockd is only used with lock_manager = "lockd" in qemu.conf (default: none).
if grep -Eq '^[[:space:]]*lock_manager[[:space:]]*=[[:space:]]*"lockd"' "$QEMU_CONF" \
    && ! pidof virtlockd >/dev/null 2>&1; then
    say "starting virtlockd"
    virtlockd --daemon </dev/null >>"$LOG_DIR/virtlockd.log" 2>&1 || die "virtlockd failed to start"
fi

# --- libvirtd -----------------------------------------------------------------
# Without --listen, libvirtd only opens its unix sockets (no TCP/TLS).
# An old libvirtd that is still shutting down (e.g. just sent SIGTERM) holds the
# pidfile lock, so wait for it to go before starting a new one.
# The system daemon is the one whose pid /run/libvirtd.pid holds: the tests' extra libvirt hosts (each a
# libvirtd in a mount namespace of its own, scripts/test-host.sh) are libvirtd processes too, and `pidof`
# would take them for it.
system_libvirtd_running() {
    local pid
    pid=$(cat /run/libvirtd.pid 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = libvirtd ]
}
start_libvirtd() {
    say "starting libvirtd"
    printf '\n=== libvirtd started by scripts/libvirtd-up.sh at %s ===\n' "$(date -Is)" >>"$LIBVIRTD_LOG"
    # Log level 3 = warnings and errors.
    LIBVIRT_LOG_OUTPUTS="3:file:$LIBVIRTD_LOG" \
        libvirtd --daemon </dev/null >>"$LIBVIRTD_LOG" 2>&1 \
        || { tail -n 20 "$LIBVIRTD_LOG" >&2 || true; die "libvirtd --daemon failed"; }
}
fail_with_log() {
    say "last lines of $LIBVIRTD_LOG:"
    tail -n 30 "$LIBVIRTD_LOG" >&2 || true
    die "$1"
}

starts=0
waited_msg=0
deadline=$((SECONDS + WAIT_SECS))
until virsh_answers; do
    if ! system_libvirtd_running; then
        [ "$starts" -lt 2 ] || fail_with_log "libvirtd exited during start-up"
        start_libvirtd
        starts=$((starts + 1))
    elif [ "$starts" -eq 0 ] && [ "$waited_msg" -eq 0 ]; then
        say "a libvirtd process exists but does not answer yet; waiting for it"
        waited_msg=1
    fi
    [ "$SECONDS" -lt "$deadline" ] || fail_with_log "libvirtd did not answer on $URI within ${WAIT_SECS}s"
    sleep 0.5
done
say "libvirtd answers on $URI ($(virsh -c "$URI" version 2>/dev/null | sed -n 's/^Running hypervisor: //p'))"

report_kvm
