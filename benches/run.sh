#!/usr/bin/env bash
# Prints every figure BENCHMARKS.md quotes, from one run on this machine:
# each a median over repeated runs (release build), with the machine noted
# first and the targets' verdicts last.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp)
trap 'rm -f "$out"' EXIT
{
    echo "== machine"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores"
    echo "memory: $(free -h | awk '/^Mem:/ {print $2}')"
    echo "kernel: $(uname -r); $(rustc --version)"
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)"
    for bench in spine containerd runtimes process memory fleet cri mig telemetry cdi hostile dra remediation; do
        echo
        echo "== cargo bench --bench $bench"
        cargo bench --locked --bench "$bench" 2>/dev/null | grep -v '^$'
    done
    echo
    echo "== benches/syscalls.sh"
    benches/syscalls.sh
    echo
    echo "== benches/image_memory.sh"
    cargo build --locked --release --quiet && scripts/image >/dev/null && benches/image_memory.sh
} | tee "$out"
echo
echo "== targets"
grep -E '(target|under 16 MiB)' "$out" | sed 's/^ *→ */  /'
