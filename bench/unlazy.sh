#!/usr/bin/env bash
# Unlazy extraction throughput (issue 6): the layers of a realistic image extracted
# into plain directories by containerd 1.6's overlayfs unpack (`ctr image pull` with
# the blobs already in its content store), `tar -xzf`, lazysnap's apply_stream (gzip
# layers) and apply_layer (eStargz layers from a loopback registry, cold and warm),
# in the same run, N rounds interleaved, medians (benches/unlazy.rs). Two images:
# the debootstrap python image of scripts/python-image.sh (3 layers) and one
# generated layer of small files (SMALL=20000). Writes its section of BENCHMARKS.md.
#
#   bench/unlazy.sh          (N=3; needs root, containerd, ctr, docker-registry, tar)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-3}
SMALL=${SMALL:-20000}
SECTION="## Unlazy: layer extraction (#6)"
OUTMD=${BENCHMARKS_MD:-$ROOT/BENCHMARKS.md}
VERSION="lazysnap $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo "(no commit)")"
(cd "$ROOT" && git status --porcelain --untracked-files=no 2>/dev/null | grep -q .) && VERSION="$VERSION + local changes"

mapfile -t PY < <("$ROOT/scripts/python-image.sh")
IMAGES=("python image (debootstrap minbase + python3)|BENCH_LAYERS=$(IFS=:; echo "${PY[*]}")"
  "one layer of $SMALL small files (200 B to 2 KiB, 100 a directory)|BENCH_SMALL_FILES=$SMALL")

# Each image runs on a fresh ext4 of its own (a loop device over a sparse file on
# the same disk), thrown away whole afterwards: deleting millions of extracted files
# one by one would take longer than the benchmark, and other work's deletions on the
# shared filesystem would slow file creation (ext4 skips recently freed inodes).
WORK=$(mktemp -d /var/tmp/lazysnap-unlazy-bench.XXXXXX)
cleanup() {
  mountpoint -q "$WORK/fs" && umount "$WORK/fs"
  rm -rf "$WORK"
}
trap cleanup EXIT
(cd "$ROOT" && cargo bench --bench unlazy --no-run --quiet)
tables=()
for img in "${IMAGES[@]}"; do
  IFS='|' read -r label input <<<"$img"
  echo "== $label" >&2
  truncate -s "${SCRATCH_GB:-16}G" "$WORK/fs.img"
  mkfs.ext4 -q -F "$WORK/fs.img"
  mkdir -p "$WORK/fs"
  mount -o loop "$WORK/fs.img" "$WORK/fs"
  (cd "$ROOT" && env BENCH_ROUNDS="$N" BENCH_LABEL="$label" BENCH_WORK="$WORK/fs" BENCH_KEEP=1 \
    "$input" cargo bench --bench unlazy --quiet) >"$WORK/out.md"
  umount "$WORK/fs"
  rm -f "$WORK/fs.img"
  cat "$WORK/out.md" >&2
  tables+=("$(cat "$WORK/out.md")")
done

section=$(cat <<EOF
$SECTION

\`bench/unlazy.sh\` (N=$N rounds, cases interleaved, medians; $(date -u +%Y-%m-%d), $VERSION,
$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), ext4).
Every case extracts the same layers into fresh directories of one scratch ext4
(a loop device on the machine's disk; containerd's root is there too), page cache
warm, nothing deleted until the run ends (ext4 skips recently freed inodes, which
slows whatever creates files next). MB/s is uncompressed layer bytes per
wall-clock second; "speed vs containerd" is containerd's median time divided by the
case's (above 1 = faster). The baseline is \`ctr image pull --snapshotter overlayfs\`
of the gzip image with its blobs already fetched (\`ctr content fetch\` first, in a
fresh namespace per round), so it measures resolve + unpack + commit: containerd 1.6
decompresses with \`unpigz\` and checks each layer's diff id; "already unpacked" is
the same command once the snapshots exist (ctr start + resolve, for scale).
\`tar -xzf\` is GNU tar (\`--numeric-owner --xattrs -p\`) with gzip, one layer after
the other. apply_stream reads each gzip layer file (decompression on its own
thread, small files finished on another) and hashes nothing (containerd computes
each diff id, a sha256 of the uncompressed tar; a caller that wants the blob's
digest wraps the reader); "all layers at once" runs one per layer concurrently. apply_layer takes the eStargz conversion of the same layers from a
docker-registry on 127.0.0.1: cold opens each layer (footer, TOC) and fetches every
chunk in parallel range requests; warm finds every chunk in the chunk cache.

$(printf '%s\n\n' "${tables[@]}")
EOF
)
printf '%s\n' "$section" >"$WORK/section.md"
touch "$OUTMD"
python3 "$ROOT/bench/replace-section.py" "$OUTMD" "$SECTION" "$WORK/section.md"
echo "wrote '$SECTION' in $OUTMD" >&2
