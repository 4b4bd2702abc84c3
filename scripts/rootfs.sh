#!/usr/bin/env bash
# Build (once) a realistic root filesystem tar for benchmarks: Debian bookworm
# minbase from debootstrap without apt lists and caches, plus python3 if the tree
# is under 100 MB, tarred with numeric owners. Cached; prints the tar's path on stdout (progress on stderr).
#
#   scripts/rootfs.sh                    -> /var/tmp/lazysnap-bench/rootfs.tar
#   LAZYSNAP_BENCH_CACHE=DIR scripts/rootfs.sh
#   MIRROR=http://deb.debian.org/debian scripts/rootfs.sh
#
# Needs root and debootstrap. The mirror defaults to the one apt already uses.
set -euo pipefail

CACHE=${LAZYSNAP_BENCH_CACHE:-/var/tmp/lazysnap-bench}
TAR=$CACHE/rootfs.tar
MIN_BYTES=$((100 * 1000 * 1000))

log() { echo "rootfs.sh: $*" >&2; }

if [ -s "$TAR" ] && [ "$(stat -c %s "$TAR")" -ge "$MIN_BYTES" ]; then
  echo "$TAR"
  exit 0
fi

# The mirror apt uses for the bookworm suite (deb822 .sources, or one-line .list).
find_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '
      function flush() { if (uri != "" && suites ~ /(^| )bookworm( |$)/ && !done) { print uri; done = 1 } uri = ""; suites = "" }
      /^[ \t]*$/ { flush(); next }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
      END { flush() }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    sed -E 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && $3 == "bookworm" { print $2 }'
  done
}

MIRROR=${MIRROR:-$(find_mirror | head -n1)}
[ -n "$MIRROR" ] || { log "no bookworm mirror in /etc/apt sources; set MIRROR="; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap missing (apt-get install debootstrap)"; exit 1; }
[ "$(id -u)" = 0 ] || { log "needs root"; exit 1; }

mkdir -p "$CACHE"
DIR=$CACHE/rootfs.tree
rm -rf "$DIR"
log "debootstrap --variant=minbase bookworm $DIR $MIRROR"
debootstrap --variant=minbase bookworm "$DIR" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
  || { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }

# Like published base images: no apt package lists, no downloaded .debs.
clean() { rm -rf "$DIR"/var/lib/apt/lists/* "$DIR"/var/cache/apt/archives/*.deb "$DIR"/var/cache/apt/*.bin; }
clean
bytes=$(du -sb "$DIR" | cut -f1)
desc="Debian bookworm minbase (debootstrap, no apt lists/caches)"
if [ "$bytes" -lt "$MIN_BYTES" ]; then
  log "tree is $bytes bytes; adding python3"
  cp /etc/resolv.conf "$DIR/etc/resolv.conf" 2>/dev/null || true
  chroot "$DIR" apt-get update >"$CACHE/apt.log" 2>&1 \
    && DEBIAN_FRONTEND=noninteractive chroot "$DIR" apt-get install -y --no-install-recommends python3 \
      >>"$CACHE/apt.log" 2>&1 \
    || { tail -n 30 "$CACHE/apt.log" >&2; exit 1; }
  clean
  desc="$desc + python3"
fi

tar --numeric-owner -C "$DIR" -cf "$TAR.tmp" .
echo "$desc" >"$CACHE/rootfs.desc"
mv "$TAR.tmp" "$TAR"
rm -rf "$DIR"
size=$(stat -c %s "$TAR")
[ "$size" -ge "$MIN_BYTES" ] || { log "$TAR is only $size bytes"; exit 1; }
log "$TAR: $size bytes, $(tar -tf "$TAR" | wc -l) entries"
echo "$TAR"
