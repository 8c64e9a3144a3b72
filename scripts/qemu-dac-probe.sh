#!/usr/bin/env bash
# Can QEMU run unprivileged here? A private libvirtd, in a mount namespace of its own, with QEMU as
# libvirt-qemu:kvm under libvirt's DAC driver; the main libvirtd, its state and its domains are never touched.
#   unshare -m --propagation private scripts/qemu-dac-probe.sh "$(mktemp -d)"
# It starts a TCG and a KVM guest with the host's /dev/kvm, a KVM guest with /dev/kvm widened to group kvm
# (in the namespace only: a device node of its own bind-mounted over it), and one whose disk is under /root.
# Findings on the build machine: docs/qemu-unprivileged.md.
set -u
export PATH="$PATH:/usr/sbin:/sbin"
D="${1:?usage: qemu-dac-probe.sh WORKDIR (run under unshare -m)}"; mkdir -p "$D"
mount --make-rprivate /
for d in run lib log etc cache; do mkdir -p $D/$d; done
mount -t tmpfs tmpfs $D/run; mount -t tmpfs tmpfs $D/lib; mount -t tmpfs tmpfs $D/log; mount -t tmpfs tmpfs $D/cache
cp -a /etc/libvirt/. $D/etc/
rm -f $D/etc/qemu/networks/autostart/*.xml
cp $D/etc/qemu.conf.vmquota-orig $D/etc/qemu.conf   # Debian's defaults: user/group libvirt-qemu, DAC on
cat >> $D/etc/qemu.conf <<'CONF'
user = "libvirt-qemu"
group = "kvm"
dynamic_ownership = 1
remember_owner = 0
security_driver = "none"
CONF
echo 'host_uuid = "6f1b7c1e-1b8a-4c6e-9d2f-000000000d4c"' >> $D/etc/libvirtd.conf
mount --bind $D/run /var/run/libvirt 2>/dev/null || mount --bind $D/run /run/libvirt
mount --bind $D/lib /var/lib/libvirt; mount --bind $D/log /var/log/libvirt; mount --bind $D/etc /etc/libvirt
mount --bind $D/cache /var/cache/libvirt 2>/dev/null
mkdir -p /var/lib/libvirt/qemu /var/lib/libvirt/images /var/run/libvirt/qemu /var/log/libvirt/qemu
echo "== /dev/kvm as the host has it: $(stat -c '%A %U:%G' /dev/kvm)"
virtlogd -d -p $D/run/virtlogd.pid
libvirtd -d -p $D/run/libvirtd.pid
for i in $(seq 1 30); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.5; done
virsh -c qemu:///system version | head -3
qemu-img create -f qcow2 $D/lib/images/d.qcow2 64M >/dev/null
mkdir -p /root/vmquota-dac-test && qemu-img create -f qcow2 /root/vmquota-dac-test/d.qcow2 64M >/dev/null
domain() {  # name type disk
cat <<XML
<domain type='$2'><name>$1</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$3'/><target dev='vda' bus='virtio'/></disk>
<serial type='pty'/><console type='pty'/></devices></domain>
XML
}
try() {
  domain "$1" "$2" "$3" > $D/$1.xml
  echo "== $1: type $2, disk $3"
  timeout 30 virsh -c qemu:///system create $D/$1.xml 2>&1 | tail -2; echo "   (exit ${PIPESTATUS[0]})"
  pid=$(pgrep -f "guest=$1," | head -1)
  [ -n "$pid" ] && ps -o user,group,pid,cmd -p "$pid" | cut -c1-120 && ls -l "$3"
  timeout 20 virsh -c qemu:///system destroy "$1" >/dev/null 2>&1
}
try dac-kvm kvm $D/lib/images/d.qcow2
try dac-tcg qemu $D/lib/images/d.qcow2
# /dev/kvm widened in this namespace only: a node of our own, bind-mounted over it
mknod $D/run/kvm c 10 232 && chown root:kvm $D/run/kvm && chmod 0660 $D/run/kvm && mount --bind $D/run/kvm /dev/kvm \
  && echo "== /dev/kvm in this namespace: $(stat -c '%A %U:%G' /dev/kvm)"
qemu-img create -f qcow2 $D/lib/images/e.qcow2 64M >/dev/null
try dac-kvm-group kvm $D/lib/images/e.qcow2
try dac-root-dir qemu /root/vmquota-dac-test/d.qcow2
timeout 10 virsh -c qemu:///system list --all
echo "== libvirtd log:"; tail -5 /var/log/libvirt/qemu/dac-kvm.log 2>/dev/null
kill $(cat $D/run/libvirtd.pid) 2>/dev/null; sleep 1
kill $(cat $D/run/virtlogd.pid) 2>/dev/null || true
rm -rf /root/vmquota-dac-test
