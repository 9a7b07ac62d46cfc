#!/bin/sh
# The README's first command: installs what is missing, builds, builds the
# guest image, starts a local cluster (3 schedulers and 1 node agent, all
# on loopback) and shows a sandbox running commands.
#
#   deploy/demo.sh [--dir DIR]     (default DIR: /tmp/paddock-demo)
#
# The cluster keeps running afterwards; the last lines say how to use it
# and how to stop it (deploy/local-cluster down --dir DIR).
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=/tmp/paddock-demo
while [ $# -gt 0 ]; do
    case "$1" in
    --dir) DIR=$2; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

say() {
    printf '\n==> %s\n' "$*"
}

say "installing Debian packages (only what is missing)"
./deploy/install-deps.sh

say "building"
[ -f build/build.ninja ] || meson setup build >/dev/null
ninja -C build >/dev/null

say "building the guest image (kernel + initramfs with paddock-guest)"
./deploy/guest/build.sh

say "starting a local cluster in $DIR"
if [ -f "$DIR/cluster.env" ]; then
    ./deploy/local-cluster down --dir "$DIR" >/dev/null 2>&1 || true
fi
env_lines=$(./deploy/local-cluster up --schedulers 3 --agents 1 --dir "$DIR")
eval "$env_lines"
./deploy/local-cluster status --dir "$DIR"

P="$ROOT/build/cli/paddock"
say "paddock sandbox create demo --cpus 1 --memory 256 --disk 256"
"$P" sandbox create demo --cpus 1 --memory 256 --disk 256
"$P" sandbox get demo

say "paddock exec demo -- uname -a"
"$P" exec demo -- uname -a

say "paddock sh demo '...'"
"$P" sh demo 'echo "hello from $(hostname)"; nproc; grep MemTotal /proc/meminfo; df -h /workspace | tail -1'

say "paddock file put/get"
echo "a file from the host" | "$P" file put demo /workspace/hello.txt -
"$P" file get demo /workspace/hello.txt -

cat <<EOF

The cluster is still running. To use it from this shell:

$env_lines
export PATH="$ROOT/build/cli:\$PATH"

    paddock sandbox list
    paddock cluster status
    paddock node ls

Stop it with: deploy/local-cluster down --dir $DIR
EOF
