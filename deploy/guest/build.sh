#!/bin/sh
# Builds Paddock's guest image from Debian packages only:
#
#   out/vmlinuz            the kernel of linux-image-cloud-amd64 (ext4 built in)
#   out/initrd.img         initramfs: paddock-guest as /init, busybox-static
#                          with its applet links, mke2fs with its libraries,
#                          the virtio modules and their load order
#   out/trivial-initrd.img initramfs whose /init prints one line and powers
#                          off (the benchmark's plain boot of the same kernel)
#   out/versions.txt       every package version that went in
#
# Packages are fetched with `apt-get download` into a cache and unpacked with
# `dpkg-deb -x`; nothing is installed on the host. Once cached, a build takes
# seconds and is byte-for-byte reproducible (sorted cpio, fixed mtimes and
# owners, gzip -n).
#
#   deploy/guest/build.sh [--full] [--out DIR] [--cache DIR] [--refresh]
#
#   --full     also build out/full-initrd.img: a debootstrap'd Debian with
#              python3 and the same agent and modules (slow; needs network
#              to the Debian mirror and debootstrap installed)
#   --refresh  ignore cached packages and download the current versions
#
# Environment: PADDOCK_BUILD (build dir holding guest-agent/paddock-guest,
# default <repo>/build), PADDOCK_GUEST_CACHE, PADDOCK_GUEST_COMPRESS
# (none|gzip, default gzip), SOURCE_DATE_EPOCH (default 0).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT="$HERE/out"
CACHE=${PADDOCK_GUEST_CACHE:-$HERE/cache}
BUILD=${PADDOCK_BUILD:-$REPO/build}
COMPRESS=${PADDOCK_GUEST_COMPRESS:-gzip}
EPOCH=${SOURCE_DATE_EPOCH:-0}
FULL=0
REFRESH=0

while [ $# -gt 0 ]; do
    case "$1" in
    --full) FULL=1 ;;
    --refresh) REFRESH=1 ;;
    --out) OUT=$2; shift ;;
    --cache) CACHE=$2; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

die() {
    echo "build.sh: $*" >&2
    exit 1
}

for tool in apt-get dpkg-deb cpio gzip readelf modinfo; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/sbin/$tool" ] ||
        die "$tool is missing: run deploy/install-deps.sh"
done
MODINFO=$(command -v modinfo || echo /sbin/modinfo)

AGENT="$BUILD/guest-agent/paddock-guest"
[ -x "$AGENT" ] || die "$AGENT not built: run 'meson setup build && ninja -C build'"
# A dynamic /init would find no libc in the initramfs; refuse it here rather
# than have the kernel panic at boot.
if readelf -l "$AGENT" | grep -q 'program interpreter'; then
    die "$AGENT is dynamically linked (a sanitizer build?); use a plain build"
fi

mkdir -p "$CACHE" "$OUT"
chmod 755 "$CACHE" 2>/dev/null || true
[ "$REFRESH" = 1 ] && rm -f "$CACHE"/*.deb

# fetch NAME: makes sure one .deb of package NAME is in the cache and prints
# its path. The apt sandbox user cannot write everywhere, hence the option.
fetch() {
    name=$1
    deb=$(ls "$CACHE/${name}"_*.deb 2>/dev/null | sort | tail -1 || true)
    if [ -z "$deb" ]; then
        (cd "$CACHE" && apt-get -q -o APT::Sandbox::User=root download "$name" \
            >/dev/null) || die "apt-get download $name failed (apt-get update?)"
        deb=$(ls "$CACHE/${name}"_*.deb 2>/dev/null | sort | tail -1 || true)
        [ -n "$deb" ] || die "package $name not found after download"
    fi
    echo "$deb"
}

pkgver() {
    echo "$(dpkg-deb -f "$1" Package) $(dpkg-deb -f "$1" Version)"
}

# The kernel: the metapackage names the real image package in its Depends.
meta=$(fetch linux-image-cloud-amd64)
kpkg=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | sed 's/[ (].*//' |
    grep '^linux-image-' | head -1)
[ -n "$kpkg" ] || die "cannot find the kernel package in $meta"
kdeb=$(fetch "$kpkg")
bbdeb=$(fetch busybox-static)
e2debs=""
for p in e2fsprogs libext2fs2 libcom-err2 libblkid1 libuuid1 libc6; do
    e2debs="$e2debs $(fetch "$p")"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pd-guest-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---- unpack -------------------------------------------------------------
dpkg-deb -x "$kdeb" "$WORK/kernel"
dpkg-deb -x "$bbdeb" "$WORK/busybox"
for d in $e2debs; do
    dpkg-deb -x "$d" "$WORK/e2fs"
done

kver=$(ls "$WORK/kernel/lib/modules" | head -1)
MODDIR="$WORK/kernel/lib/modules/$kver"
[ -f "$WORK/kernel/boot/vmlinuz-$kver" ] || die "no vmlinuz in $kdeb"

# ---- root tree ----------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"
for d in bin sbin usr/bin usr/sbin etc proc sys dev tmp run root workspace \
    lib/modules var/tmp mnt; do
    mkdir -p "$ROOT/$d"
done
chmod 1777 "$ROOT/tmp" "$ROOT/var/tmp"
chmod 700 "$ROOT/root"

install -m 755 "$AGENT" "$ROOT/init"
install -m 755 "$WORK/busybox/bin/busybox" "$ROOT/bin/busybox"

# Applet links, from busybox's own list (paths relative to /).
"$WORK/busybox/bin/busybox" --list-full | sort | while read -r app; do
    case "$app" in
    linuxrc|init|sbin/init) continue ;;
    esac
    [ -e "$ROOT/$app" ] && continue
    mkdir -p "$ROOT/$(dirname "$app")"
    ln -s /bin/busybox "$ROOT/$app"
done

# mke2fs formats the workspace disk as ext4 on first boot (busybox's mke2fs
# only makes ext2). It is dynamic: copy what it NEEDs from the same packages.
E2=$WORK/e2fs
install -m 755 "$E2/sbin/mke2fs" "$ROOT/sbin/mke2fs"
ln -sf mke2fs "$ROOT/sbin/mkfs.ext4"
install -m 644 "$E2/etc/mke2fs.conf" "$ROOT/etc/mke2fs.conf"
mkdir -p "$ROOT/lib/x86_64-linux-gnu" "$ROOT/lib64"
copy_lib() {
    lib=$1
    [ -e "$ROOT/lib/x86_64-linux-gnu/$lib" ] && return 0
    src=""
    for dir in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
        if [ -e "$E2/$dir/$lib" ]; then src="$E2/$dir/$lib"; break; fi
    done
    [ -n "$src" ] || die "library $lib (needed by mke2fs) not in the packages"
    cp -L "$src" "$ROOT/lib/x86_64-linux-gnu/$lib"
    for n in $(readelf -d "$src" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p'); do
        copy_lib "$n"
    done
}
for n in $(readelf -d "$E2/sbin/mke2fs" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p'); do
    copy_lib "$n"
done
cp -L "$E2/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
    "$ROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \
    "$ROOT/lib64/ld-linux-x86-64.so.2"

# Kernel modules, with their dependencies first. The agent loads the lines
# of /lib/modules/load.order in order and ignores those whose device is
# absent.
WANT="virtio_ring virtio virtio_mmio virtio_pci virtio_console virtio_blk
virtio_net virtio-rng"
ORDER="$WORK/order"
: >"$ORDER"
add_mod() {
    local m f dep
    m=$1
    grep -qx "$m" "$ORDER" && return 0
    f=$(find "$MODDIR/kernel" -name "$m.ko" -o -name "$m.ko.xz" \
        -o -name "$m.ko.zst" | head -1)
    [ -n "$f" ] || die "module $m not in $kdeb"
    for dep in $("$MODINFO" -F depends "$f" | tr ',' ' '); do
        add_mod "$dep"
    done
    grep -qx "$m" "$ORDER" && return 0
    echo "$m" >>"$ORDER"
    case "$f" in
    *.ko) install -m 644 "$f" "$ROOT/lib/modules/$m.ko" ;;
    *) die "compressed module $f: the agent loads plain .ko only" ;;
    esac
}
for m in $WANT; do
    add_mod "$m"
done
cp "$ORDER" "$ROOT/lib/modules/load.order"

# Network and naming files for users' programs.
cat >"$ROOT/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc hook: configures the interface from the DHCP lease.
case "$1" in
deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; done
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    ;;
esac
exit 0
EOF
chmod 755 "$ROOT/etc/udhcpc.script"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' \
    >"$ROOT/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$ROOT/etc/group"
printf '127.0.0.1 localhost\n' >"$ROOT/etc/hosts"
: >"$ROOT/etc/resolv.conf"
printf 'hosts: files dns\n' >"$ROOT/etc/nsswitch.conf"

# ---- pack ---------------------------------------------------------------
# pack DIR FILE: a newc cpio with sorted names, root owner and fixed mtimes.
pack() {
    (cd "$1" && find . -mindepth 1 -exec touch -h -d "@$EPOCH" {} + &&
        find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet) >"$WORK/pack.cpio"
    case "$COMPRESS" in
    none) mv "$WORK/pack.cpio" "$2.tmp" ;;
    gzip) gzip -n -6 <"$WORK/pack.cpio" >"$2.tmp" ;;
    *) die "PADDOCK_GUEST_COMPRESS must be none or gzip" ;;
    esac
    mv "$2.tmp" "$2"
}

pack "$ROOT" "$OUT/initrd.img"
cp "$WORK/kernel/boot/vmlinuz-$kver" "$OUT/vmlinuz.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"

# The trivial image: busybox alone, and an /init that says it runs on the
# serial console (the benchmark times that line) and powers off at once,
# which ends QEMU. Not a reboot: -M microvm has no reset device the kernel
# uses, so a rebooting guest spins instead.
TRIV="$WORK/trivial"
mkdir -p "$TRIV/bin" "$TRIV/dev" "$TRIV/proc"
install -m 755 "$WORK/busybox/bin/busybox" "$TRIV/bin/busybox"
ln -s busybox "$TRIV/bin/sh"
cat >"$TRIV/init" <<'EOF'
#!/bin/sh
/bin/busybox mount -t devtmpfs dev /dev
echo "paddock-trivial: init runs" >/dev/ttyS0
/bin/busybox poweroff -f
EOF
chmod 755 "$TRIV/init"
pack "$TRIV" "$OUT/trivial-initrd.img"

# ---- versions -----------------------------------------------------------
{
    echo "kernel $kver"
    for d in "$meta" "$kdeb" "$bbdeb" $e2debs; do
        pkgver "$d"
    done
    echo "modules $(paste -sd ' ' "$ORDER")"
    echo "paddock-guest sha256 $(sha256sum "$AGENT" | cut -d' ' -f1)"
    echo "initrd.img sha256 $(sha256sum "$OUT/initrd.img" | cut -d' ' -f1)"
} >"$OUT/versions.txt"

if [ "$FULL" = 1 ]; then
    command -v debootstrap >/dev/null 2>&1 ||
        die "--full needs debootstrap: apt-get install debootstrap"
    FR="$WORK/full"
    # e2fsprogs: the agent formats a blank workspace with mke2fs, which
    # minbase leaves out.
    debootstrap --variant=minbase \
        --include=python3,ca-certificates,e2fsprogs \
        bookworm "$FR" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    rm -rf "$FR/var/cache/apt/archives"/*.deb "$FR/var/lib/apt/lists"/*
    install -m 755 "$AGENT" "$FR/init"
    mkdir -p "$FR/lib/modules" "$FR/workspace"
    cp "$ROOT"/lib/modules/*.ko "$ROOT/lib/modules/load.order" \
        "$FR/lib/modules/"
    cp "$ROOT/etc/udhcpc.script" "$FR/etc/udhcpc.script"
    # The agent runs udhcpc and mke2fs: busybox provides the former.
    install -m 755 "$WORK/busybox/bin/busybox" "$FR/bin/busybox"
    [ -e "$FR/sbin/udhcpc" ] || ln -s /bin/busybox "$FR/sbin/udhcpc"
    # udhcpc.script configures the interface with ip (no iproute2 here).
    [ -e "$FR/sbin/ip" ] || ln -s /bin/busybox "$FR/sbin/ip"
    pack "$FR" "$OUT/full-initrd.img"
    echo "full $(grep -c . "$FR/var/lib/dpkg/status") dpkg status lines" \
        >>"$OUT/versions.txt"
fi

echo "build.sh: kernel $kver; $(du -h "$OUT/initrd.img" | cut -f1) initrd in $OUT"
