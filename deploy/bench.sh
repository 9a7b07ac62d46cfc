#!/bin/sh
# Runs every benchmark and prints its figures (never pass/fail). Each one
# measures its baseline in the same run, so the ratios hold on a loaded
# machine even when the absolute figures do not.
#
#   deploy/bench.sh [--quick] [NAME...]
#
# NAME: frame guest agent placement fsm routing failover cluster tokens
# (default: all). --quick scales the long ones down (placement-cluster at
# 5%, fewer rounds); the figures in README.md come from full runs.
# Expects a built tree (ninja -C build) and a guest image
# (deploy/guest/build.sh); PADDOCK_BUILD and PADDOCK_GUEST_DIR override.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PADDOCK_BUILD=${PADDOCK_BUILD:-$ROOT/build}
export PADDOCK_GUEST_DIR=${PADDOCK_GUEST_DIR:-$ROOT/deploy/guest/out}
B=$PADDOCK_BUILD/tests/bench
QUICK=0
names=""
for a in "$@"; do
    case "$a" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) names="$names $a" ;;
    esac
done
[ -n "$names" ] || names="frame guest agent placement fsm routing failover cluster tokens"

run() {
    printf '\n==== %s\n' "$1"
    shift
    "$@" || echo "(benchmark exited with status $?)"
}

for n in $names; do
    case "$n" in
    frame) run "frame codec vs memcpy" "$B/proto/bench_frame" ;;
    guest) run "guest: boot, exec round trip, file throughput" \
        "$B/guest/bench_guest" ;;
    agent) run "node agent: create-to-ready, 8 concurrent, memory" \
        "$B/agent/bench_agent" ;;
    placement) run "placement decisions over 1,000 nodes" \
        "$B/scheduler/bench_placement" ;;
    fsm) run "FSM apply rate and memory" "$B/scheduler/bench_fsm" ;;
    routing)
        if [ "$QUICK" = 1 ]; then set -- --n 50; else set -- --n 200; fi
        run "routing overhead: follower vs agent" \
            /usr/bin/python3 tests/bench/scheduler/bench_routing.py "$@" ;;
    failover)
        if [ "$QUICK" = 1 ]; then set -- --rounds 5; else set -- --rounds 20; fi
        run "leader failover" "$B/scheduler/bench_failover" "$@" ;;
    cluster)
        if [ "$QUICK" = 1 ]; then
            run "placement throughput and node loss (5%)" \
                env PADDOCK_BENCH_SCALE=0.05 \
                "$B/scheduler/bench_placement_cluster"
        else
            run "placement throughput and node loss" \
                "$B/scheduler/bench_placement_cluster"
        fi ;;
    tokens)
        if [ "$QUICK" = 1 ]; then set -- --rounds 10 --n 100; else set --; fi
        run "revocation propagation and preview proxy" \
            "$B/tokens/bench_tokens" "$@" ;;
    *) echo "bench.sh: unknown benchmark: $n" >&2; exit 2 ;;
    esac
done
