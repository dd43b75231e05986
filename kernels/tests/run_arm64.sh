#!/usr/bin/env bash
# Cross-compiles the kernel library (kernels/src/*.c) and kernels/tests/test_kernels.c for
# aarch64 and runs the test under qemu-aarch64 (static binaries, no arm64 sysroot needed at run
# time). Two builds: baseline armv8-a (the smull path, what setup.py builds on arm64) and
# armv8.2-a+dotprod (the sdot path; NEON ISA only, SPFQ_TEST_QUICK shapes). Each prints
# "N passed, M failed".
#
#   kernels/tests/run_arm64.sh [BUILD_DIR]          # default build/arm64
#   kernels/tests/run_arm64.sh --host [BUILD_DIR]   # native build + run (default build/host)
#
# Exit status: 0 all passed, 1 a test failed, 2 a tool is missing (one line names the Debian
# packages), 3 the build failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mode=arm64
if [ "${1:-}" = "--host" ]; then mode=host; shift; fi
out=${1:-$root/build/$mode}
mkdir -p "$out"

srcs=("$root"/kernels/src/*.c "$root"/kernels/tests/test_kernels.c)
flags=(-O2 -std=c11 -pthread -Wall -Wextra -I"$root/kernels/include" -I"$root/kernels/src")

if [ "$mode" = host ]; then
    cc=${CC:-cc}
    command -v "$cc" >/dev/null || { echo "run_arm64.sh: no C compiler ($cc) found: apt-get install -y --no-install-recommends gcc libc6-dev" >&2; exit 2; }
    echo "== $(uname -m) native build ($cc) =="
    "$cc" "${flags[@]}" "${srcs[@]}" -o "$out/test_kernels" -lm || exit 3
    "$out/test_kernels"
    exit $?
fi

cc=${CROSS_CC:-aarch64-linux-gnu-gcc}
missing=()
if ! command -v "$cc" >/dev/null; then
    missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
elif ! echo '#include <stdio.h>' | "$cc" -E -x c - >/dev/null 2>&1 ||
     [ ! -e "$("$cc" -print-file-name=libc.a)" ]; then
    missing+=(libc6-dev-arm64-cross)
fi
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
    echo "run_arm64.sh: missing Debian package(s): ${missing[*]} (apt-get install -y --no-install-recommends ${missing[*]})"
    exit 2
fi

# qemu-aarch64 7.2 aborts (cpu_exec: assertion cpu == current_cpu) when a child forked from a
# process with a live second thread creates a thread (a 10-line program without this library
# does the same): under qemu the fork test's child stays single-threaded.
export SPFQ_TEST_FORK_THREADS=0
status=0
echo "== aarch64 armv8-a (baseline NEON) under qemu-aarch64 =="
"$cc" "${flags[@]}" -static "${srcs[@]}" -o "$out/test_kernels" -lm || exit 3
qemu-aarch64 "$out/test_kernels" || status=1

echo "== aarch64 armv8.2-a+dotprod (sdot path; neon only, quick shapes) under qemu-aarch64 -cpu max =="
"$cc" "${flags[@]}" -march=armv8.2-a+dotprod -static "${srcs[@]}" -o "$out/test_kernels_dotprod" -lm || exit 3
SPFQ_TEST_ISAS=neon SPFQ_TEST_QUICK=1 qemu-aarch64 -cpu max "$out/test_kernels_dotprod" || status=1
exit $status
