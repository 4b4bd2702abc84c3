#!/usr/bin/env bash
# Layer conversion throughput: `lazysnap layer convert` of a Debian root filesystem
# tar (>= 100 MB, built once by scripts/rootfs.sh) against single-threaded gzip -9
# and zstd -3, N repetitions each, medians. Writes its section of BENCHMARKS.md.
#
#   bench/convert.sh                 (N=3; LAZYSNAP=path/to/binary to skip the build)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-3}
SECTION="## Format: layer conversion (issue 2)"
OUTMD=${BENCHMARKS_MD:-$ROOT/BENCHMARKS.md}

if [ -z "${LAZYSNAP:-}" ]; then
  (cd "$ROOT" && cargo build --release --quiet)
  LAZYSNAP=$ROOT/target/release/lazysnap
  VERSION="lazysnap $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo "(no commit)")"
  (cd "$ROOT" && git status --porcelain --untracked-files=no 2>/dev/null | grep -q .) && VERSION="$VERSION + local changes"
else
  VERSION="lazysnap binary $LAZYSNAP built $(date -u -r "$LAZYSNAP" '+%Y-%m-%d %H:%M UTC')"
fi
for t in gzip zstd pigz; do command -v "$t" >/dev/null || { echo "$t missing" >&2; exit 1; }; done

TAR=$("$ROOT/scripts/rootfs.sh")
WORK=$(mktemp -d "$(dirname "$TAR")/convert.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cp "$TAR" "$WORK/rootfs.tar" # so every command below reads the same local name
cd "$WORK"
IN_BYTES=$(stat -c %s rootfs.tar)
ENTRIES=$(tar -tf rootfs.tar | wc -l)
cat rootfs.tar >/dev/null # warm the page cache

# name | command (run with bash -c in $WORK) | baseline name (empty for baselines) | output file
CASES=(
  "gzip -9 (baseline)|gzip -9 -c rootfs.tar > /dev/null||"
  "pigz -9, 2 threads (reference)|pigz -9 -p 2 -c rootfs.tar > /dev/null|gzip -9 (baseline)|"
  "lazysnap estargz, level 9|$LAZYSNAP layer convert rootfs.tar out.blob --format estargz --level 9|gzip -9 (baseline)|out.blob"
  "lazysnap estargz, level 9, 1 thread|$LAZYSNAP layer convert rootfs.tar out.blob --format estargz --level 9 --threads 1|gzip -9 (baseline)|out.blob"
  "zstd -3 -T1 (baseline)|zstd -3 -T1 -q -c rootfs.tar > /dev/null||"
  "lazysnap zstd-chunked, default|$LAZYSNAP layer convert rootfs.tar out.blob --format zstd-chunked|zstd -3 -T1 (baseline)|out.blob"
  "lazysnap zstd-chunked, 1 thread|$LAZYSNAP layer convert rootfs.tar out.blob --format zstd-chunked --threads 1|zstd -3 -T1 (baseline)|out.blob"
  "lazysnap estargz-zstd, default|$LAZYSNAP layer convert rootfs.tar out.blob --format estargz-zstd|zstd -3 -T1 (baseline)|out.blob"
)

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
# Rounds interleave the cases, so that load from elsewhere hits all of them alike.
declare -A WALL CPU
for i in $(seq "$N"); do
  for c in "${CASES[@]}"; do
    IFS='|' read -r name cmd _ _ <<<"$c"
    rm -f out.blob
    TIMEFORMAT='%R %U %S'
    t=$({ time bash -c "$cmd" >/dev/null 2>"$WORK/err"; } 2>&1) \
      || { echo "failed: $cmd" >&2; cat "$WORK/err" >&2; exit 1; }
    read -r real user sys <<<"$t"
    WALL[$name]+="$real "
    CPU[$name]+="$(echo "$user + $sys" | bc) "
  done
done
declare -A MED SIZE
rows=()
for c in "${CASES[@]}"; do
  IFS='|' read -r name cmd base out <<<"$c"
  MED[$name]=$(printf '%s\n' ${WALL[$name]} | median)
  cpu=$(printf '%s\n' ${CPU[$name]} | median)
  rm -f out.blob
  if [ -n "$out" ]; then # one more run for the output size
    bash -c "$cmd" >/dev/null
    SIZE[$name]=$(stat -c %s "$out")
  else
    SIZE[$name]=$(bash -c "${cmd% > /dev/null} | wc -c")
  fi
  mbs=$(echo "scale=1; $IN_BYTES / 1000000 / ${MED[$name]}" | bc)
  ratio="—"
  [ -n "$base" ] && ratio=$(printf '%.2f' "$(echo "scale=4; ${MED[$name]} / ${MED[$base]}" | bc)")
  shown=${cmd//$LAZYSNAP/lazysnap}
  line="| $name | \`$shown\` | $(printf '%.2f' "${MED[$name]}") | $(printf '%.2f' "$cpu") | $mbs | $(echo "scale=1; ${SIZE[$name]} / 1000000" | bc) | $ratio |"
  echo "$line   (wall: ${WALL[$name]}; cpu: ${CPU[$name]})" >&2
  rows+=("$line")
done
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)

section=$(cat <<EOF
$SECTION

\`bench/convert.sh\` (N=$N, medians; $(date -u +%Y-%m-%d), $VERSION,
$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)).
Input: \`scripts/rootfs.sh\` — $(cat "$(dirname "$TAR")/rootfs.desc" 2>/dev/null || echo "Debian bookworm rootfs"),
\`tar --numeric-owner\`: $(echo "scale=1; $IN_BYTES / 1000000" | bc) MB, $ENTRIES entries, page cache warm.
MB = 10^6 bytes; MB/s is input bytes per wall-clock second; CPU s is user + system
time; "time vs baseline" is the median wall time divided by the baseline's (below 1 = faster). Baselines are single-threaded
and write to /dev/null; lazysnap writes the blob to disk and builds the TOC, with all
cores unless \`--threads 1\`. Load average (1 min) before/after the run: $LOAD_BEFORE / $LOAD_AFTER.

| case | command | median wall s | median CPU s | MB/s | output MB | time vs baseline |
| --- | --- | ---: | ---: | ---: | ---: | ---: |
$(printf '%s\n' "${rows[@]}")
EOF
)

# Replace our section (up to the next "## " heading) or append it.
printf '%s\n' "$section" >"$WORK/section.md"
touch "$OUTMD"
python3 "$ROOT/bench/replace-section.py" "$OUTMD" "$SECTION" "$WORK/section.md"
echo "wrote '$SECTION' in $OUTMD" >&2
