#!/usr/bin/env bash
# Build the real Linux guest of vmquota's end-to-end tests, from Debian's packages only, and cache it.
#
#   scripts/build-test-guest.sh          prints the path of the cached raw disk image (building it if needed)
#
# The image is a FAT file system on the whole disk (a "superfloppy": no partition table to write, no loop
# mount), made bootable by SYSLINUX, holding Debian's kernel and a busybox initramfs. Its init:
#   - prints to the serial console (ttyS0), as "vmquota-guest: ..." lines the tests wait for;
#   - brings up eth0 by DHCP (QEMU's user-mode network gives 10.0.2.15);
#   - mounts a NoCloud (label cidata) or config-drive (label config-2) seed if there is one, and runs its
#     user data when it is a "#!" script, as cloud-init runs a script part;
#   - serves /var/www over HTTP on port 80 (busybox httpd);
#   - powers off on the ACPI power button (busybox acpid) and on `poweroff`; a shell runs on ttyS0.
# Under plain QEMU emulation (vmquota serve --use-emulation) it boots to userspace in about ten seconds.
#
# The kernel package is fetched with `apt-get download` and unpacked into the cache, not installed: the host's
# /boot and initramfs hooks are left alone. The build tools come from Debian (installed when missing).
# The cache key is this script's content and the kernel's version, so editing the script rebuilds.
set -euo pipefail

CACHE="${VMQUOTA_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmquota/test-guest}"
TOOLS=(busybox-static syslinux syslinux-common mtools dosfstools cpio)
# The drivers the guest needs, loaded in this order after their dependencies: virtio disks and network,
# the IDE or SATA CD-ROM a seed may be attached as, ISO 9660 for the seed, and the ACPI power button with evdev.
MODULES=(virtio_pci virtio_blk virtio_net ata_piix ahci sr_mod isofs button evdev)
IMAGE_MB=48

say() { printf 'build-test-guest: %s\n' "$*" >&2; }

missing=()
for pkg in "${TOOLS[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" = installed ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

kernel_package() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
KPKG="$(kernel_package)"
if [ -z "$KPKG" ]; then
    apt-get update -qq >&2
    KPKG="$(kernel_package)"
fi
[ -n "$KPKG" ] || { say "no linux-image-amd64 in the apt lists"; exit 1; }
KEY="$(cat "$0" | sha256sum | cut -c1-12)-${KPKG#linux-image-}"
OUT="$CACHE/guest-$KEY.img"
if [ -f "$OUT" ]; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say "building $OUT from $KPKG"

# --- the kernel and its modules, unpacked from the Debian package ------------------------------
(cd "$WORK" && apt-get download -qq "$KPKG" 2>/dev/null) || (cd "$WORK" && apt-get download "$KPKG" >&2)
dpkg-deb -x "$WORK"/"$KPKG"_*.deb "$WORK/kernel"
KVER="${KPKG#linux-image-}"
MODDIR="$WORK/kernel/lib/modules/$KVER"

# --- the initramfs: busybox, the modules in dependency order, init's files --------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,run,tmp,mnt/seed,var/www,lib/modules,etc/acpi/PWRF,usr/bin,usr/sbin}
cp /bin/busybox "$ROOT/bin/busybox"
for applet in $(/bin/busybox --list-full); do
    [ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done
ln -sf /bin/busybox "$ROOT/init"
mknod -m 600 "$ROOT/dev/console" c 5 1
mknod -m 666 "$ROOT/dev/null" c 1 3

declare -A LOADED=()
ORDER=()
module_file() { find "$MODDIR" -name "$1.ko" -print -quit; }
add_module() {  # depth first: a module after everything it depends on
    local name="$1" file deps dep
    [ -n "${LOADED[$name]:-}" ] && return
    LOADED[$name]=1
    file="$(module_file "$name")"
    [ -n "$file" ] || { say "module $name not in $KPKG"; exit 1; }
    deps="$(tr '\0' '\n' <"$file" | grep -a '^depends=' | cut -d= -f2 | tr ',' ' ')"
    for dep in $deps; do add_module "$dep"; done
    cp "$file" "$ROOT/lib/modules/$name.ko"
    ORDER+=("$name")
}
for m in "${MODULES[@]}"; do add_module "$m"; done
printf '%s\n' "${ORDER[@]}" >"$ROOT/etc/modules"

cat >"$ROOT/etc/inittab" <<'EOF'
::sysinit:/etc/rc
ttyS0::respawn:-/bin/sh
::shutdown:/bin/echo "vmquota-guest: powering off"
::shutdown:/bin/umount -a -r
EOF

cat >"$ROOT/etc/rc" <<'EOF'
#!/bin/sh
# The guest's boot: drivers, network, the cloud-init seed, HTTP, the power button.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
say() { echo "vmquota-guest: $*" >/dev/console; }
say "init started"
for m in $(cat /etc/modules); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
hostname vmquota-guest
ip link set lo up
ip link set eth0 up 2>/dev/null && udhcpc -i eth0 -s /etc/udhcpc.script -t 20 -T 1 -n -q >/dev/null 2>&1
say "ip $(ip -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}')"
echo "vmquota-guest" >/var/www/index.html
httpd -p 80 -h /var/www
acpid -c /etc/acpi -l /run/acpid.log  # its default log folder, /var/log, does not exist here
# A seed is an ISO 9660 CD-ROM or disk holding NoCloud's files (cidata) or a config drive's (config-2); told apart
# by what it holds, as busybox's findfs misses some labels. The CD-ROM shows up a moment after its driver loads
# (the SCSI scan is asynchronous): look for a few seconds.
seed=""
for try in $(seq 50); do
    for dev in /dev/sr* /dev/vd[b-z]; do
        [ -b "$dev" ] && mount -t iso9660 -o ro "$dev" /mnt/seed 2>/dev/null || continue
        if [ -f /mnt/seed/meta-data ]; then seed=cidata; elif [ -d /mnt/seed/openstack ]; then seed=config-2; fi
        [ -n "$seed" ] && break 2
        umount /mnt/seed
    done
    sleep 0.1
done
if [ -n "$seed" ]; then
    say "seed $seed found"
    hostname "$(sed -n 's/^local-hostname: *//p' /mnt/seed/meta-data 2>/dev/null | head -n 1)" 2>/dev/null
    userdata=/mnt/seed/user-data
    [ "$seed" = config-2 ] && userdata=/mnt/seed/openstack/latest/user_data
    if [ "$(head -c 2 "$userdata" 2>/dev/null)" = "#!" ]; then
        cp "$userdata" /run/user-data && chmod 700 /run/user-data
        (/run/user-data >/dev/console 2>&1; say "user-data exited $?") &
    fi
fi
say "ready"
EOF
chmod 755 "$ROOT/etc/rc"

cat >"$ROOT/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc's hook: apply the lease it got.
case "$1" in
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
        : >/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        ;;
esac
EOF
chmod 755 "$ROOT/etc/udhcpc.script"

# busybox acpid runs /etc/acpi/<action> for an event; the power button's action is PWRF/00000080.
printf '#!/bin/sh\necho "vmquota-guest: power button" >/dev/console\npoweroff\n' >"$ROOT/etc/acpi/PWRF/00000080"
chmod 755 "$ROOT/etc/acpi/PWRF/00000080"
echo 'root::0:0:root:/:/bin/sh' >"$ROOT/etc/passwd"

(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -9) >"$WORK/initrd.gz"

# --- the disk: FAT on the whole disk, SYSLINUX in its boot sector ------------------------------
cat >"$WORK/syslinux.cfg" <<'EOF'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0,115200 loglevel=3 panic=-1 mitigations=off
EOF
truncate -s "${IMAGE_MB}M" "$WORK/disk.img"
mkfs.vfat -n VMQGUEST "$WORK/disk.img" >/dev/null
mcopy -i "$WORK/disk.img" "$WORK/kernel/boot/vmlinuz-$KVER" ::/vmlinuz
mcopy -i "$WORK/disk.img" "$WORK/initrd.gz" ::/initrd.gz
mcopy -i "$WORK/disk.img" "$WORK/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$WORK/disk.img"
mv "$WORK/disk.img" "$OUT.partial"
mv "$OUT.partial" "$OUT"  # a build that dies midway leaves no image that looks finished
find "$CACHE" -maxdepth 1 -name "guest-*.img" ! -path "$OUT" -delete  # earlier builds of an older script
say "built $OUT"
echo "$OUT"
