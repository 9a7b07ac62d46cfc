#!/bin/sh
# Installs every Debian package Paddock needs to build, test and run.
# Idempotent: when everything is present it only runs dpkg -s and exits.
set -eu

PKGS="
build-essential meson ninja-build pkg-config clang libclang-rt-14-dev
libraft-dev libuv1-dev libsqlite3-dev sqlite3 libssl-dev openssl
libjwt-dev libjansson-dev libmsgpack-dev libhttp-parser-dev
libcurl4-openssl-dev libcmocka-dev
qemu-system-x86 qemu-utils e2fsprogs cpio gzip xz-utils zstd kmod
python3 python3-pytest python3-websocket curl iproute2
"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    exit 0
fi

echo "install-deps: installing:$missing" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
