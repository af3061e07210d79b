#!/bin/busybox sh
# fission initramfs /init: load the virtio drivers, assemble the root, hand over to the agent.
#
# Disks are found by label, not by order: "fission-root" is the read-only language image,
# "fission-scratch" the per-VM writable disk whose size is the run's disk cap. The writable
# root is an overlay of the two, mounted nosuid so no set-uid program can raise privileges.
bb=/bin/busybox
fail() { $bb echo "fission-init: $*" > /dev/ttyS0; $bb poweroff -f; }

$bb mount -t devtmpfs devtmpfs /dev
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys

for m in virtio_ring virtio virtio_mmio virtio_blk virtio_console virtio-rng overlay; do
  $bb insmod /lib/modules/$m.ko || fail "cannot load module $m"
done

case " $($bb cat /proc/cmdline) " in
  *" fission.probe=1 "*) $bb echo "FISSION-PROBE-OK" > /dev/ttyS0; $bb poweroff -f ;;
esac

find_disk() {  # wait up to 10 s for a block device with label $1
  i=0
  while [ $i -lt 1000 ]; do
    dev=$($bb findfs "LABEL=$1" 2>/dev/null) && { $bb echo "$dev"; return 0; }
    i=$((i + 1)); $bb usleep 10000
  done
  return 1
}
root_dev=$(find_disk fission-root) || fail "no root disk"
scratch_dev=$(find_disk fission-scratch) || fail "no scratch disk"

$bb mkdir -p /mnt/root /mnt/scratch /newroot
$bb mount -t ext4 -o ro,noatime "$root_dev" /mnt/root || fail "cannot mount root"
$bb mount -t ext4 -o noatime,nosuid,nodev "$scratch_dev" /mnt/scratch || fail "cannot mount scratch"
$bb mkdir -p /mnt/scratch/upper /mnt/scratch/work
$bb mount -t overlay overlay -o lowerdir=/mnt/root,upperdir=/mnt/scratch/upper,workdir=/mnt/scratch/work,nosuid,nodev /newroot \
  || fail "cannot mount overlay"

$bb mount --move /dev /newroot/dev
$bb mount -t proc -o nosuid,nodev,noexec,hidepid=2 proc /newroot/proc
$bb mount -t sysfs -o nosuid,nodev,noexec,ro sysfs /newroot/sys
$bb mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /newroot/sys/fs/cgroup
$bb mount -t tmpfs -o nosuid,nodev,mode=0755,size=16m tmpfs /newroot/run
$bb mkdir -p /newroot/dev/shm
$bb mount -t tmpfs -o nosuid,nodev,mode=1777,size=64m tmpfs /newroot/dev/shm
$bb hostname fission
$bb ip link set lo up
$bb umount /proc /sys

exec $bb switch_root /newroot /usr/bin/python3 -E -s -S /opt/fission/agent.py
fail "switch_root failed"
