#!/usr/bin/env bash
# Extra libvirt hosts for tests on one machine: each a libvirtd in a mount namespace of its own.
#
#   scripts/test-host.sh start NAME [--private-dir DIR]... [--qemu-conf FILE]
#                                                            start host NAME (nothing to do if it runs)
#   scripts/test-host.sh stop NAME                           destroy its domains, end it, remove its files
#   scripts/test-host.sh kill NAME                           SIGKILL its libvirtd only, as a crash: its QEMUs run on
#   scripts/test-host.sh uri NAME                            print its libvirt URI (whether it runs or not)
#
# A host NAME lives under $VMQUOTA_TEST_HOSTS (/tmp/vmquota-hosts)/NAME. Inside its namespace
# (`unshare -m --propagation private`) these folders of that directory are bind-mounted:
#   run/   over /run/libvirt       its sockets (libvirt-sock: the URI's socket) and QEMU's runtime state
#   lib/   over /var/lib/libvirt   QEMU's per-domain folders (monitor sockets)
#   log/   over /var/log/libvirt   libvirtd.log, and qemu/<domain>.log written by QEMU itself
#   cache/ over /var/cache/libvirt QEMU's capabilities, copied from the system's so a start probes nothing
#   etc/   over /etc/libvirt       a copy of /etc/libvirt without the system daemon's domains, networks,
#                                  pools and secrets; host_uuid of its own in libvirtd.conf (libvirt refuses a
#                                  migration between hosts with the same UUID); in qemu.conf: QEMU writes its
#                                  own logs (no virtlogd needed), no cgroups (the system daemon's cgroup names
#                                  would collide with a migrating domain's), the ports libvirt picks itself
#                                  (the NBD server of a storage copy) in 49240-49250, so migrate URIs can use
#                                  49200-49239 (libvirt refuses a loopback migration_address: the migration
#                                  driver asks the target to listen on the address of its migrate URI instead).
# The daemon listens on no TCP port: only its unix sockets. It answers at
#   qemu+unix:///system?socket=<dir>/run/libvirt-sock
#
# --qemu-conf FILE: the host's qemu.conf is FILE instead of the system's (the settings above are added to it), as
# `scripts/libvirtd-up.sh --write-qemu-conf` writes one for QEMU as libvirt-qemu under the DAC driver.
#
# --private-dir DIR bind-mounts an empty folder of the host's own (private/N/) over DIR inside its namespace:
# the same path is a different file there ("local disks"). Without it the host sees this machine's files
# ("shared storage"). DIR must be an existing absolute folder.
#
# `stop` ends only this host's daemon, found by its own pid file and checked to be a libvirtd in this host's
# namespace, never the system daemon (/run/libvirtd.pid); it destroys only the domains of this host (through
# its own socket, then any QEMU its pid files name that is still there) and removes its folder. Both commands can be
# repeated. `start` after `kill` brings the daemon back, in a new namespace over the same folders, with the host's
# state (host_uuid, definitions, files) and its running QEMUs, which it finds again through their monitor sockets.
# Needs root.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

ROOT="${VMQUOTA_TEST_HOSTS:-/tmp/vmquota-hosts}"
WAIT_SECS="${TEST_HOST_WAIT:-60}"  # a daemon that must probe QEMU (no valid cache) takes 8 to 10 s at a load of 12
# The ports libvirt picks by itself on this host (its NBD server for a storage copy; a migration without a port):
# the top of the suite's 49200-49250, so a caller's own migrate URI port (49200-49239) never collides with them.
LIBVIRT_PORTS=(49240 49250)

say() { printf 'test-host: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

check_name() {
    [[ "$1" =~ ^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$ ]] \
        || die "invalid host name '$1': lower-case letters, digits and '-', at most 32 characters"
}

uri_of() { printf 'qemu+unix:///system?socket=%s/run/libvirt-sock\n' "$ROOT/$1"; }

# The pid of this host's libvirtd if it runs: its pid file names a live libvirtd that is not the system daemon
# and runs in another mount namespace than ours.
host_pid() {
    local dir="$1" pid system
    pid=$(cat "$dir/libvirtd.pid" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = libvirtd ] || return 1
    system=$(cat /run/libvirtd.pid 2>/dev/null || true)
    [ "$pid" != "$system" ] || return 1
    [ "$(readlink "/proc/$pid/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] || return 1
    grep -qxF -- "$(readlink "/proc/$pid/ns/mnt")" "$dir/mntns" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}

answers() { timeout 10 virsh -c "$1" version >/dev/null 2>&1; }

# The QEMU processes of the host's domains, by the pid files its libvirtd wrote (run/qemu/<domain>.pid), each
# checked to be a QEMU of that domain. libvirt starts every QEMU in a mount namespace of its own (its private
# /dev), so they are not found by the daemon's namespace; the files outlive a killed daemon.
host_qemus() {
    local base="$1" file pid domain
    for file in "$base"/run/qemu/*.pid; do
        [ -f "$file" ] || continue
        pid=$(cat "$file" 2>/dev/null) && [[ "$pid" =~ ^[0-9]+$ ]] || continue
        domain=$(basename "$file" .pid)
        is_qemu "$pid" && tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "guest=$domain,debug-threads=on" \
            && printf '%s\n' "$pid"
    done
}

# A QEMU capabilities probe that a killed daemon left behind (lib/qemu/qmp-*/qmp.pid) would hold the next
# daemon's probe up; it is no guest.
host_probes() {
    local base="$1" file pid
    for file in "$base"/lib/qemu/qmp-*/qmp.pid; do
        [ -f "$file" ] || continue
        pid=$(cat "$file" 2>/dev/null) && [[ "$pid" =~ ^[0-9]+$ ]] || continue
        is_qemu "$pid" && printf '%s\n' "$pid"
    done
}

is_qemu() {
    case "$(cat "/proc/$1/comm" 2>/dev/null)" in qemu-system-*|qemu-kvm) return 0 ;; *) return 1 ;; esac
}

copy_config() {
    local etc="$1" qemu_conf="$2"
    cp -a /etc/libvirt/. "$etc/"
    [ -z "$qemu_conf" ] || cp "$qemu_conf" "$etc/qemu.conf"
    # The system daemon's own objects stay its own: no domain, network, pool or secret is copied.
    rm -rf "$etc/qemu" "$etc/storage" "$etc/secrets" "$etc/qemu.conf.vmquota-orig"
    mkdir -p "$etc/qemu/networks" "$etc/storage" "$etc/secrets"
    {
        printf '\n# scripts/test-host.sh: an extra test host\n'
        printf 'host_uuid = "%s"\n' "$(cat /proc/sys/kernel/random/uuid)"
        printf 'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
    } >>"$etc/libvirtd.conf"
    {
        printf '\n# scripts/test-host.sh: an extra test host\n'
        printf 'stdio_handler = "file"\n'
        printf 'cgroup_controllers = [ ]\n'
        printf 'migration_port_min = %s\nmigration_port_max = %s\n' "${LIBVIRT_PORTS[@]}"
    } >>"$etc/qemu.conf"
}

cmd_start() {
    local name="$1"; shift
    local private=() dir qemu_conf=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --qemu-conf)
                [ $# -ge 2 ] || die "--qemu-conf needs a file"
                [ -f "$2" ] || die "--qemu-conf $2: no such file"
                qemu_conf=$(realpath "$2"); shift 2 ;;
            --private-dir)
                [ $# -ge 2 ] || die "--private-dir needs a folder"
                [[ "$2" = /* ]] || die "--private-dir $2: not an absolute path"
                [ -d "$2" ] || die "--private-dir $2: no such folder"
                dir=$(realpath "$2")
                case "$dir" in /|/proc*|/sys*|/dev*|/run|/run/libvirt*|/etc*|/usr*|"$ROOT"*)
                    die "--private-dir $2: not a folder a test host may hide" ;;
                esac
                case "$ROOT/" in "$dir"/*)  # it would hide the hosts' own folders (sockets, pid files)
                    die "--private-dir $2: not a folder a test host may hide (it holds $ROOT)" ;;
                esac
                private+=("$dir"); shift 2 ;;
            *) die "start: unknown option '$1'" ;;
        esac
    done
    [ "$(id -u)" -eq 0 ] || die "must run as root to start libvirtd"
    command -v libvirtd >/dev/null || die "libvirtd not found (scripts/bootstrap.sh installs it)"
    local base="$ROOT/$name" uri
    uri=$(uri_of "$name")
    local wanted
    wanted=$(printf '%s\n' "${private[@]+"${private[@]}"}")
    if host_pid "$base" >/dev/null && answers "$uri"; then
        [ "$(cat "$base/private-dirs")" = "$wanted" ] \
            || die "host $name already runs with other private folders ($(tr '\n' ' ' <"$base/private-dirs")); stop it first"
        printf '%s\n' "$uri"
        return 0
    fi
    if pid=$(host_pid "$base"); then
        die "the libvirtd of host $name (pid $pid) runs but does not answer; stop it first"
    fi
    local started_ms comeback=""
    started_ms=$(($(date +%s%N) / 1000000))
    if [ -s "$base/etc/libvirtd.conf" ] && [ -e "$base/private-dirs" ]; then
        # A host whose daemon was killed comes back with what it had: the same host_uuid, definitions and files,
        # and its guests' QEMU processes that outlived the daemon (found again through their monitor sockets).
        [ "$(cat "$base/private-dirs")" = "$wanted" ] \
            || die "host $name was started with other private folders ($(tr '\n' ' ' <"$base/private-dirs")); stop it first"
        comeback=1
        # shellcheck disable=SC2046
        kill -KILL $(host_probes "$base") 2>/dev/null || true
        rm -f "$base/run/libvirt-sock" "$base/run/libvirt-sock-ro" "$base/run/libvirt-admin-sock" \
            "$base/libvirtd.pid"  # the dead daemon's: the start-up check below waits for the new one's
    else
        [ ! -e "$base" ] || rm -rf --one-file-system "$base"  # a start that failed half-way
        mkdir -p "$base"/{run,lib,log,cache,etc,private}
        chmod 0700 "$base"
        copy_config "$base/etc" "$qemu_conf"
        cp -a /var/cache/libvirt/. "$base/cache/" 2>/dev/null || true
        printf '%s' "$wanted" >"$base/private-dirs"
        [ -z "$wanted" ] || printf '\n' >>"$base/private-dirs"
    fi
    # The mounts, then libvirtd, in one shell inside the new namespace. libvirtd --daemon forks; its child keeps
    # the namespace (and its mounts) alive until it and its QEMU processes end.
    local script='set -e
        base=$1; shift
        mount --bind "$base/run" /run/libvirt
        mount --bind "$base/lib" /var/lib/libvirt
        mount --bind "$base/log" /var/log/libvirt
        mount --bind "$base/cache" /var/cache/libvirt
        mount --bind "$base/etc" /etc/libvirt
        i=0
        for dir in "$@"; do
            mkdir -p "$base/private/$i"
            mount --bind "$base/private/$i" "$dir"
            i=$((i + 1))
        done
        mkdir -p /run/libvirt/qemu /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt/qemu
        readlink /proc/self/ns/mnt >>"$base/mntns"
        exec libvirtd --daemon --pid-file "$base/libvirtd.pid" </dev/null >>"$base/log/libvirtd.log" 2>&1'
    mkdir -p /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
    local launched=0
    unshare -m --propagation private bash -c "$script" test-host "$base" "${private[@]+"${private[@]}"}" && launched=1
    if [ "$launched" -ne 1 ]; then
        tail -n 20 "$base/log/libvirtd.log" >&2 2>/dev/null || true
        [ -n "$comeback" ] || cmd_stop "$name" 2>/dev/null
        die "libvirtd of host $name failed to start"
    fi
    local deadline=$((SECONDS + WAIT_SECS))
    until [ -S "$base/run/libvirt-sock" ] && answers "$uri"; do
        if ! host_pid "$base" >/dev/null && [ -s "$base/libvirtd.pid" ]; then
            say "last lines of $base/log/libvirtd.log:"
            tail -n 20 "$base/log/libvirtd.log" >&2 2>/dev/null || true
            [ -n "$comeback" ] || cmd_stop "$name" 2>/dev/null
            die "libvirtd of host $name exited during start-up"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "last lines of $base/log/libvirtd.log:"
            tail -n 20 "$base/log/libvirtd.log" >&2 2>/dev/null || true
            [ -n "$comeback" ] || cmd_stop "$name" 2>/dev/null
            die "host $name did not answer within ${WAIT_SECS}s"
        fi
        sleep 0.05
    done
    say "host $name answers at $uri (in $(($(date +%s%N) / 1000000 - started_ms)) ms)"
    printf '%s\n' "$uri"
}

cmd_stop() {
    local name="$1" base="$ROOT/$1" uri pid domain
    [ -e "$base" ] || return 0
    uri=$(uri_of "$name")
    if pid=$(host_pid "$base"); then
        # Its domains, through its own socket: the system daemon and the other hosts are never asked.
        if answers "$uri"; then
            while read -r domain; do
                [ -n "$domain" ] || continue
                timeout 30 virsh -c "$uri" destroy "$domain" >/dev/null 2>&1 || true
                timeout 30 virsh -c "$uri" undefine "$domain" >/dev/null 2>&1 || true
            done < <(timeout 30 virsh -c "$uri" list --all --name 2>/dev/null || true)
        fi
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 10))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # Whatever QEMU of it still runs (one whose daemon died first, or a probe) goes too.
    local left
    left=$(host_qemus "$base"; host_probes "$base")
    if [ -n "$left" ]; then
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
        local deadline=$((SECONDS + 10))
        while [ -n "$(host_qemus "$base"; host_probes "$base")" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    fi
    # The mounts live in the namespace only, which is gone with its processes: these are plain folders now.
    rm -rf --one-file-system "$base"
    say "host $name stopped"
}

cmd_kill() {
    local name="$1" base="$ROOT/$1" pid
    pid=$(host_pid "$base") || die "host $name has no libvirtd running"
    kill -KILL "$pid"
    local deadline=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.02; done
    say "killed the libvirtd of host $name (pid $pid); its QEMU processes run on"
}

[ $# -ge 2 ] || usage
command=$1 name=$2
shift 2
check_name "$name"
case "$command" in
    start) cmd_start "$name" "$@" ;;
    stop) [ $# -eq 0 ] || die "stop takes no options"; cmd_stop "$name" ;;
    kill) [ $# -eq 0 ] || die "kill takes no options"; cmd_kill "$name" ;;
    uri) [ $# -eq 0 ] || die "uri takes no options"; uri_of "$name" ;;
    *) usage ;;
esac
