#!/usr/bin/env bash
# Make sure a system libvirtd answers on qemu:///system, starting it by hand
# when there is no service manager (no systemd; Debian 12's monolithic libvirtd).
#
#   scripts/libvirtd-up.sh                         start libvirtd if it does not answer (below)
#   scripts/libvirtd-up.sh --write-qemu-conf FILE  only write the qemu.conf settings below into FILE (a copy of
#                                                  a qemu.conf: a test host's, or /etc/libvirt/qemu.conf before
#                                                  a restart), and change nothing else
#
# - QEMU runs unprivileged, as libvirt-qemu:kvm under libvirt's DAC driver (dynamic_ownership: libvirt chowns
#   each disk to that user while its domain runs), not as root: a guest that escapes QEMU gets an
#   unprivileged user. So /dev/kvm must be 0660 root:kvm, as Debian's udev rule makes it (this machine has
#   no udev), and the disks' folders must be reachable by libvirt-qemu (vmquota serve's data dir for root is
#   /var/lib/vmquota for that reason).
# - If `virsh -c qemu:///system version` already answers: nothing is changed and nothing restarted. If its
#   qemu.conf is not the unprivileged one yet, the script says so and how to switch, and exits 0.
# - Otherwise: configure /etc/libvirt/qemu.conf and /dev/kvm, create the runtime/log folders, start
#   virtlogd and libvirtd daemonised (unix socket only, no TCP/TLS listener), and wait up to LIBVIRTD_WAIT
#   seconds (30).
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

# --- qemu.conf: QEMU as libvirt-qemu:kvm under the DAC driver -----------------
QEMU_USER="libvirt-qemu"
QEMU_GROUP="kvm"
# set_conf KEY VALUE: make sure exactly one active "KEY = VALUE" line exists in $QEMU_CONF.
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
    [ -n "${BACKUP:-}" ] || return 0
    [ -e "$QEMU_CONF.vmquota-orig" ] || cp -p "$QEMU_CONF" "$QEMU_CONF.vmquota-orig"
}
# The settings, into $QEMU_CONF.
# - user/group: QEMU's unprivileged identity (Debian's package makes both; kvm may open /dev/kvm).
# - dynamic_ownership: the DAC driver chowns a domain's disks, seeds and logs to that user while it runs.
# - remember_owner = 0: give files back to root:root when a domain stops, without recording the old owner in
#   extended attributes: several libvirt daemons see the same files (the tests' extra hosts, a migration's
#   shared disks), and a recorded owner would make each refuse the files the other one holds.
# - security_driver = "none": no AppArmor or SELinux driver (neither is available in this machine's kernel);
#   the DAC driver is always on and does the work.
configure_qemu_conf() {
    set_conf user "\"$QEMU_USER\""
    set_conf group "\"$QEMU_GROUP\""
    set_conf dynamic_ownership 1
    set_conf remember_owner 0
    set_conf security_driver '"none"'
}
# Whether $QEMU_CONF already has the settings (nothing would change).
qemu_conf_is_unprivileged() {
    local copy
    copy=$(mktemp)
    cp "$QEMU_CONF" "$copy"
    ( QEMU_CONF="$copy"; BACKUP=""; configure_qemu_conf >/dev/null; cmp -s "$copy" "$1" )
    local same=$?
    rm -f "$copy"
    return "$same"
}
# /dev/kvm 0660 root:kvm, as Debian's udev rule (60-qemu-system-common) makes it on a host with udev.
kvm_node_ok() {
    [ ! -e /dev/kvm ] || [ "$(stat -c '%a %U:%G' /dev/kvm)" = "660 root:$QEMU_GROUP" ]
}

if [ "${1:-}" = "--write-qemu-conf" ]; then
    [ $# -eq 2 ] || die "usage: $0 --write-qemu-conf FILE"
    QEMU_CONF="$2"
    [ -f "$QEMU_CONF" ] || die "$QEMU_CONF: no such file (start from a copy of /etc/libvirt/qemu.conf)"
    BACKUP=""
    configure_qemu_conf
    [ "$conf_changed" -eq 0 ] || say "wrote QEMU as $QEMU_USER:$QEMU_GROUP (DAC, dynamic ownership) into $QEMU_CONF"
    exit 0
fi
[ $# -eq 0 ] || die "unknown arguments: $* (see the comment at the top of $0)"

if virsh_answers; then
    # A running daemon is never reconfigured or restarted here: its QEMU processes, and the disks of the VMs
    # they run, belong to the identity it started them with.
    if ! qemu_conf_is_unprivileged "$QEMU_CONF" || ! kvm_node_ok; then
        say "NOTE: libvirtd runs, and its QEMU does not run as $QEMU_USER:$QEMU_GROUP yet ($QEMU_CONF$(kvm_node_ok \
            || printf ', /dev/kvm %s' "$(stat -c '%a %U:%G' /dev/kvm)")). Nothing was changed. To switch, with no"
        say "      VM running: $0 --write-qemu-conf $QEMU_CONF; chgrp $QEMU_GROUP /dev/kvm; chmod 0660 /dev/kvm;"
        say "      kill \$(cat /run/libvirtd.pid); $0   (docs/qemu-unprivileged.md)"
    fi
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root to start libvirtd"
for bin in libvirtd virtlogd virsh; do
    command -v "$bin" >/dev/null 2>&1 \
        || die "$bin not found; install libvirt-daemon-system and libvirt-clients (scripts/bootstrap.sh does)"
done

[ -f "$QEMU_CONF" ] || die "$QEMU_CONF missing (is libvirt-daemon-driver-qemu installed?)"
BACKUP=1
configure_qemu_conf
if [ "$conf_changed" -eq 1 ]; then
    say "configured $QEMU_CONF (QEMU as $QEMU_USER:$QEMU_GROUP under the DAC driver; backup: $QEMU_CONF.vmquota-orig)"
fi
if [ -e /dev/kvm ] && ! kvm_node_ok; then
    getent group "$QEMU_GROUP" >/dev/null || die "group $QEMU_GROUP missing (libvirt-daemon-system makes it)"
    chgrp "$QEMU_GROUP" /dev/kvm && chmod 0660 /dev/kvm
    say "/dev/kvm is now 0660 root:$QEMU_GROUP (no udev on this machine to make it so)"
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
