#!/usr/bin/env bash
# Build (once) the three layer tars of a realistic python image, like the baseline
# image in ENVIRONMENT.md (Debian minbase + python3, 3 layers, one whiteout):
#
#   base.tar    the minbase root filesystem (scripts/rootfs.sh's tar)
#   python.tar  what `apt-get install --no-install-recommends python3` adds to it
#               (new and changed paths with their parent dirs; whiteouts for
#               anything it deleted; no apt lists or caches)
#   app.tar     /app/hello.py and one whiteout of a doc file of a lower layer
#
# All tarred with numeric owners. Cached; prints the three paths on stdout, one a
# line, in layer order (progress on stderr).
#
#   scripts/python-image.sh          -> /var/tmp/lazysnap-bench/python/{base,python,app}.tar
#   LAZYSNAP_BENCH_CACHE=DIR scripts/python-image.sh
#
# Needs root and what scripts/rootfs.sh needs (debootstrap, the apt mirror).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${LAZYSNAP_BENCH_CACHE:-/var/tmp/lazysnap-bench}
OUT=$CACHE/python
# The doc file app.tar hides: the first of these that the python3 layer has.
WHITEOUT_CANDIDATES="usr/share/doc/python3/README.Debian usr/share/doc/python3/copyright usr/share/doc/python3.11/copyright"

log() { echo "python-image.sh: $*" >&2; }
done_paths() { printf '%s\n' "$OUT/base.tar" "$OUT/python.tar" "$OUT/app.tar"; }

if [ -s "$OUT/base.tar" ] && [ -s "$OUT/python.tar" ] && [ -s "$OUT/app.tar" ]; then
  done_paths
  exit 0
fi
[ "$(id -u)" = 0 ] || { log "needs root"; exit 1; }

BASE=$("$ROOT/scripts/rootfs.sh")
if tar -tf "$BASE" ./usr/bin/python3 >/dev/null 2>&1; then
  log "$BASE already has python3 (rootfs.sh adds it when minbase is under 100 MB); a python layer needs a plain minbase"
  exit 1
fi

mkdir -p "$OUT"
TREE=$OUT/tree
STAGE=$OUT/app.stage
cleanup() { rm -rf "$TREE" "$STAGE" "$OUT"/*.tmp "$OUT"/*.list; }
trap cleanup EXIT
cleanup

log "extracting $BASE"
mkdir -p "$TREE"
tar --numeric-owner -xpf "$BASE" -C "$TREE"
(cd "$TREE" && find . -mindepth 1 | sort) >"$OUT/before.list"
touch "$OUT/marker.tmp"
sleep 1

added_resolv=
if [ ! -e "$TREE/etc/resolv.conf" ] && [ ! -L "$TREE/etc/resolv.conf" ]; then
  cp -L /etc/resolv.conf "$TREE/etc/resolv.conf"
  added_resolv=1
fi
log "chroot apt-get install -y --no-install-recommends python3 (log: $OUT/apt.log)"
chroot "$TREE" apt-get update >"$OUT/apt.log" 2>&1 \
  && DEBIAN_FRONTEND=noninteractive chroot "$TREE" apt-get install -y --no-install-recommends python3 \
    >>"$OUT/apt.log" 2>&1 \
  || { tail -n 30 "$OUT/apt.log" >&2; exit 1; }
# Like published images (and rootfs.sh): no package lists, no downloaded .debs.
rm -rf "$TREE"/var/lib/apt/lists/* "$TREE"/var/cache/apt/archives/*.deb "$TREE"/var/cache/apt/*.bin
[ -n "$added_resolv" ] && rm -f "$TREE/etc/resolv.conf"
[ -x "$TREE/usr/bin/python3" ] || { log "no usr/bin/python3 after apt-get install"; exit 1; }

# Paths that apt removed become whiteouts in the python layer (parents first wins).
(cd "$TREE" && find . -mindepth 1 | sort) >"$OUT/after.list"
comm -23 "$OUT/before.list" "$OUT/after.list" >"$OUT/deleted.list"
: >"$OUT/whiteouts.list"
while IFS= read -r p; do
  parent=${p%/*}
  [ -d "$TREE/$parent" ] || continue # a whole deleted directory: its own whiteout covers it
  wh="$parent/.wh.${p##*/}"
  : >"$TREE/$wh"
  echo "$wh" >>"$OUT/whiteouts.list"
done <"$OUT/deleted.list"

# New or changed paths (dpkg keeps package mtimes, but ctimes are new), their parent
# directories, and the whiteouts.
{
  (cd "$TREE" && find . -mindepth 1 -cnewer "$OUT/marker.tmp")
  cat "$OUT/whiteouts.list"
} | awk '{
    n = split($0, part, "/"); p = part[1]
    for (i = 2; i < n; i++) { p = p "/" part[i]; print p }
    print $0
  }' | grep -vx '\.' | sort -u >"$OUT/python.list"
log "python layer: $(wc -l <"$OUT/python.list") entries, $(wc -l <"$OUT/whiteouts.list") whiteouts"
tar --numeric-owner --no-recursion -C "$TREE" -cf "$OUT/python.tar.tmp" -T "$OUT/python.list"

# app layer: /app/hello.py and a whiteout of $WHITEOUT, parent dirs as in the lower tree.
WHITEOUT=
for w in $WHITEOUT_CANDIDATES; do
  if [ -f "$TREE/$w" ] && [ ! -L "$TREE/$w" ] && grep -qx "./$w" "$OUT/python.list"; then WHITEOUT=$w; break; fi
done
[ -n "$WHITEOUT" ] || { log "none of $WHITEOUT_CANDIDATES is a file of the python layer"; exit 1; }
mkdir -p "$STAGE/app"
printf 'print("hello")\n' >"$STAGE/app/hello.py"
chmod 755 "$STAGE/app"
chmod 644 "$STAGE/app/hello.py"
wdir=${WHITEOUT%/*}
mkdir -p "$STAGE/$wdir"
: >"$STAGE/$wdir/.wh.${WHITEOUT##*/}"
list=(./app ./app/hello.py)
p=.
IFS=/ read -ra parts <<<"$wdir"
for part in "${parts[@]}"; do
  p=$p/$part
  chown --reference="$TREE/$p" "$STAGE/$p"
  chmod --reference="$TREE/$p" "$STAGE/$p"
  list+=("$p")
done
list+=("./$wdir/.wh.${WHITEOUT##*/}")
touch -d @1700000000 "$STAGE/app/hello.py" "$STAGE/app" "$STAGE/$wdir/.wh.${WHITEOUT##*/}"
p=.
for part in "${parts[@]}"; do
  p=$p/$part
  touch -r "$TREE/$p" "$STAGE/$p"
done
tar --numeric-owner --no-recursion -C "$STAGE" -cf "$OUT/app.tar.tmp" "${list[@]}"

ln -f "$BASE" "$OUT/base.tar.tmp" 2>/dev/null || cp "$BASE" "$OUT/base.tar.tmp"
mv "$OUT/python.tar.tmp" "$OUT/python.tar"
mv "$OUT/app.tar.tmp" "$OUT/app.tar"
mv "$OUT/base.tar.tmp" "$OUT/base.tar"
for t in base python app; do
  log "$OUT/$t.tar: $(stat -c %s "$OUT/$t.tar") bytes, $(tar -tf "$OUT/$t.tar" | wc -l) entries"
done
done_paths
