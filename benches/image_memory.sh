#!/usr/bin/env bash
# Peak resident memory of `gpuprov plan` on the 8-GPU fixture, for the
# release binary (target/release) and the image's (target/image/build,
# linked with packed relocations by scripts/image), alternating, and their
# relocation sections. Needs both built: `cargo build --release` and
# scripts/image.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-9}
host=fixtures/hosts/h100x8-nvswitch-preinstalled
declare -A binaries=([release]=target/release/gpuprov [image]=target/image/build/release/gpuprov)
for name in release image; do
    [ -x "${binaries[$name]}" ] || { echo "image_memory: ${binaries[$name]} is not built" >&2; exit 2; }
done
declare -A peaks
for _ in $(seq "$runs"); do
    for name in release image; do
        kib=$(/usr/bin/time -f %M "${binaries[$name]}" plan --host-exec prefix --host-root "$host" 2>&1 >/dev/null | tail -1)
        peaks[$name]+="$kib "
    done
done
for name in release image; do
    median=$(tr ' ' '\n' <<<"${peaks[$name]}" | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    sections=$(readelf -SW "${binaries[$name]}" | sed -n 's/^ *\[ *[0-9]*\] *//p' |
        while read -r section _ _ _ size _; do
            case $section in .rela.dyn|.relr.dyn) printf '%s %d KiB; ' "$section" $(( 0x$size / 1024 )) ;; esac
        done)
    printf '`gpuprov plan` peak RSS, %-7s binary: median %.1f MiB over %d runs (%s)\n' "$name" "$(bc -l <<<"$median / 1024")" "$runs" "${sections%; }"
done
