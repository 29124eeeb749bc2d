#!/usr/bin/env bash
# System calls of one no-op `apply` on the converged 8-GPU fixture, counted
# with `strace -f -c` (release build): what each path lookup costs shows
# here first. Prints nothing but a note when strace is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v strace >/dev/null; then
    echo "syscalls: strace is not installed; skipped"
    exit 0
fi
cargo build --locked --release --quiet
host=$(mktemp -d)
report=$(mktemp)
trap 'rm -rf "$host" "$report"' EXIT
cp -a fixtures/hosts/h100x8-nvswitch-preinstalled/. "$host"
run() {
    env -u KUBECONFIG -u KUBERNETES_SERVICE_HOST HOME=/nonexistent "$@" \
        target/release/gpuprov apply --host-exec prefix --host-root "$host" >/dev/null 2>&1
}
run  # converge it once
run strace -f -c -o "$report"
calls=$(awk '$NF == "total" {print $4}' "$report")
echo "no-op apply, converged 8-GPU host: $calls system calls (strace -f -c)"
