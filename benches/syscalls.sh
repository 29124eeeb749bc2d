#!/usr/bin/env bash
# System calls of one no-op `apply` on the converged 8-GPU fixture, counted
# with `strace -f -c` (release build): what each path lookup costs shows
# here first. Then the fsyncs of a fresh containerd edit (the process
# bench's: only containerd-runtime, restartMode none, Debian's default
# config from ../shared, no containerd binary), on the bare fixture and
# where gpuprov's directories already exist. Last, the same no-op `apply`
# on the CDI fixture (h100x8-cdi, `cdi.enabled`, NVML from the fake
# library), with its `openat2` calls apart. Prints nothing but a note when
# strace is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v strace >/dev/null; then
    echo "syscalls: strace is not installed; skipped"
    exit 0
fi
cargo build --locked --release --quiet
cargo build --locked --release --quiet -p fake-nvml
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

spec=$(mktemp)
trap 'rm -rf "$host" "$report" "$spec"' EXIT
printf '%s\n' 'driver: {enabled: false}' 'toolkit: {enabled: false}' \
    'containerd: {restartMode: none}' 'devicePlugin: {enabled: false}' \
    'dcgmExporter: {enabled: false}' 'gfd: {enabled: false}' 'validator: {enabled: false}' >"$spec"
fresh() {
    rm -rf "$host" && mkdir "$host"
    cp -a fixtures/hosts/a100-preinstalled/. "$host"
    rm "$host/usr/bin/containerd"
    cp ../shared/realworld/containerd/12-debian12-containerd-1.6-default-systemd-v2.toml \
        "$host/etc/containerd/config.toml"
}
fsyncs() {
    env -u KUBECONFIG -u KUBERNETES_SERVICE_HOST HOME=/nonexistent \
        strace -f -c -e trace=fsync -o "$report" \
        target/release/gpuprov apply --host-exec prefix --host-root "$host" --config "$spec" >/dev/null 2>&1
    awk '$NF == "fsync" {print $4}' "$report"
}
fresh
bare=$(fsyncs)
fresh
mkdir -p "$host/var/lib/gpuprov/backup/etc/containerd" "$host/run/gpuprov" \
    "$host/etc/kubernetes/node-feature-discovery/features.d"
present=$(fsyncs)
echo "fresh containerd edit: $bare fsyncs on the bare fixture, $present where gpuprov's directories exist (strace -f -c -e trace=fsync)"

rm -rf "$host" && mkdir "$host"
cp -a fixtures/hosts/h100x8-cdi/. "$host"
printf 'cdi:\n  enabled: true\n' >"$spec"
cdi() {
    env -u KUBECONFIG -u KUBERNETES_SERVICE_HOST HOME=/nonexistent \
        GPUPROV_FAKE_NVML="$PWD/fixtures/nvml/h100x8.yaml" "$@" \
        target/release/gpuprov apply --host-exec prefix --host-root "$host" --config "$spec" \
        --nvml-lib target/release/libfake_nvml.so >/dev/null 2>&1
}
cdi  # converge it once
cdi strace -f -c -o "$report"
calls=$(awk '$NF == "total" {print $4}' "$report")
opens=$(awk '$NF == "openat2" {print $4}' "$report")
echo "no-op apply, converged 8-GPU CDI host, cdi on: $calls system calls, $opens openat2 (strace -f -c)"
