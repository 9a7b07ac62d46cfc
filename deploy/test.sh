#!/bin/sh
# Paddock's whole test suite: installs what is missing, builds twice (plain
# and with AddressSanitizer + UndefinedBehaviorSanitizer), runs the unit
# tests in both builds, runs each fuzzer for a bounded time, builds the guest
# image, runs the integration tests against real daemons and VMs, and ends
# with "N passed, N failed" on its last line.
#
#   deploy/test.sh              everything
#   PADDOCK_TEST_QUICK=1 ...    skip fuzzing and integration tests
#   PYTEST_ARGS="-k guest" ...  pass arguments to pytest
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RESULTS="$ROOT/build/test-results"
FUZZ_SECONDS=${FUZZ_SECONDS:-20}

./deploy/install-deps.sh || { echo "install-deps failed"; echo "0 passed, 1 failed"; exit 1; }

fail_setup() {
    echo "test.sh: $1" >&2
    echo "0 passed, 1 failed"
    exit 1
}

setup() {
    dir=$1
    shift
    if [ ! -f "$dir/build.ninja" ]; then
        meson setup "$dir" "$@" >/dev/null || return 1
    fi
    ninja -C "$dir" >"$dir.ninja.log" 2>&1 || { tail -50 "$dir.ninja.log"; return 1; }
}

setup build || fail_setup "plain build failed"
setup build-asan -Db_sanitize=address,undefined -Db_lundef=false \
    -Dbuildtype=debug || fail_setup "sanitizer build failed"
rm -rf "$RESULTS"
mkdir -p "$RESULTS"

# Unit tests, plain then sanitized. Sanitizer findings abort the test.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
meson test -C build --print-errorlogs --num-processes 2 >"$RESULTS/unit.log" 2>&1
cp build/meson-logs/testlog.json "$RESULTS/unit-plain.json" 2>/dev/null
meson test -C build-asan --print-errorlogs --num-processes 2 >"$RESULTS/unit-asan.log" 2>&1
cp build-asan/meson-logs/testlog.json "$RESULTS/unit-asan.json" 2>/dev/null
grep -E "^(Ok|Fail|Expected|Unexpected|Skipped|Timeout):" "$RESULTS/unit.log" "$RESULTS/unit-asan.log"

if [ -z "${PADDOCK_TEST_QUICK:-}" ]; then
    # Fuzzers: clang's libFuzzer with ASan+UBSan, each for FUZZ_SECONDS.
    targets=""
    for src in tests/fuzz/fuzz_*.c; do
        targets="$targets tests/fuzz/$(basename "$src" .c)"
    done
    if { [ -f build-fuzz/build.ninja ] || CC=clang meson setup build-fuzz \
            -Dfuzz=true -Dtests=disabled -Dbench=false \
            -Db_sanitize=address,undefined -Db_lundef=false >/dev/null; } &&
        ninja -C build-fuzz $targets >build-fuzz.ninja.log 2>&1; then
        for f in build-fuzz/tests/fuzz/fuzz_*; do
            # meson keeps objects in fuzz_*.p folders beside the binaries
            [ -f "$f" ] && [ -x "$f" ] || continue
            name=$(basename "$f")
            corpus="$ROOT/build-fuzz/corpus-$name"
            mkdir -p "$corpus"
            if "$f" -max_total_time="$FUZZ_SECONDS" -timeout=10 \
                -rss_limit_mb=1024 -artifact_prefix="$RESULTS/$name-" \
                "$corpus" "$ROOT/tests/fuzz/seeds/$name" \
                >"$RESULTS/$name.log" 2>&1; then
                echo "PASS fuzz $name" >>"$RESULTS/fuzz.txt"
            else
                echo "FAIL fuzz $name" >>"$RESULTS/fuzz.txt"
                tail -30 "$RESULTS/$name.log"
            fi
        done
    else
        echo "FAIL fuzz build" >>"$RESULTS/fuzz.txt"
    fi
    cat "$RESULTS/fuzz.txt" 2>/dev/null

    # Guest image, then integration tests against real daemons and VMs.
    if ./deploy/guest/build.sh >"$RESULTS/guest-build.log" 2>&1; then
        echo "PASS guest image build" >>"$RESULTS/fuzz.txt"
    else
        tail -30 "$RESULTS/guest-build.log"
        echo "FAIL guest image build" >>"$RESULTS/fuzz.txt"
    fi
    # Debian's pytest runs under Debian's python3, whatever else is on PATH.
    PADDOCK_BUILD="$ROOT/build" /usr/bin/python3 -m pytest -q \
        -p no:cacheprovider --junitxml="$RESULTS/integration.xml" \
        ${PYTEST_ARGS:-} tests/integration
fi

/usr/bin/python3 tests/count.py "$RESULTS"
