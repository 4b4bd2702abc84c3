#!/usr/bin/env bash
# Image conversion (#8): `lazysnap convert` against stargz-snapshotter's
# `ctr-remote image convert --estargz --oci` on the same image in the same run, and
# what `--optimize` saves: the bytes a lazy mount fetches before
# `python3 -c 'print(1)'` finishes, unoptimized vs optimized. Writes its section of
# BENCHMARKS.md.
#
#   bench/convert-image.sh           (N=3 rounds, medians; LAZYSNAP=binary skips the build)
#
# Input: the python image of scripts/python-image.sh (Debian minbase + python3 + app,
# 3 layers), each layer `gzip -n -6`, as an OCI layout. Conversions are local on both
# sides: ctr-remote converts from containerd's content store into it (the image pulled
# there first, not timed), lazysnap from the OCI layout into another one; both read the
# gzip layers, decompress, compress eStargz (gzip level 9, 4 MiB chunks by default on
# both) and write blobs, manifest and config. Needs root, docker-registry, containerd,
# skopeo, ctr-remote.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-3}
SECTION="## Image conversion (#8)"
OUTMD=${BENCHMARKS_MD:-$ROOT/BENCHMARKS.md}
CTR_REMOTE=${CTR_REMOTE:-/usr/bin/ctr-remote}

. "$ROOT/bench/lazysnap-bin.sh"
for t in docker-registry containerd ctr skopeo python3 curl "$CTR_REMOTE"; do
  command -v "$t" >/dev/null || { echo "$t missing" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "needs root (containerd, FUSE, --optimize)" >&2; exit 1; }

mapfile -t TARS < <("$ROOT/scripts/python-image.sh")
WORK=$(mktemp -d /var/tmp/lazysnap-convert-image.XXXXXX)
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  grep -F " $WORK/" /proc/self/mounts | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"

# ---------------------------------------------------------------- the source image
python3 - src py "${TARS[@]}" <<'EOF'
import hashlib, json, os, subprocess, sys
out, tag, tars = sys.argv[1], sys.argv[2], sys.argv[3:]
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(os.path.join(blobs, d), "wb").write(data)
    return {"digest": "sha256:" + d, "size": len(data)}
layers, diff_ids = [], []
for t in tars:
    diff_ids.append("sha256:" + hashlib.sha256(open(t, "rb").read()).hexdigest())
    gz = subprocess.run(["gzip", "-n", "-6", "-c", t], check=True, capture_output=True).stdout
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(gz)})
arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
config = json.dumps({"architecture": arch, "os": "linux",
    "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
               "Cmd": ["/usr/bin/python3", "-c", "print(1)"]},
    "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
    "layers": layers}).encode()
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    **put(manifest), "annotations": {"org.opencontainers.image.ref.name": tag}}]},
    open(os.path.join(out, "index.json"), "w"))
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
EOF
IN_BYTES=0
for t in "${TARS[@]}"; do IN_BYTES=$((IN_BYTES + $(stat -c %s "$t"))); done
GZ_BYTES=$(du -cb src/blobs/sha256 | tail -1 | cut -f1)

# ---------------------------------------------------------------- registry + containerd
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$PORT
cat >registry.yml <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $WORK/registry
http:
  addr: $REG
EOF
docker-registry serve registry.yml >registry.log 2>&1 &
PIDS+=($!)
CSOCK=$WORK/containerd/c.sock
mkdir -p containerd
cat >containerd.toml <<EOF
version = 2
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CSOCK"
[ttrpc]
  address = "$CSOCK.ttrpc"
EOF
containerd --config containerd.toml >containerd.log 2>&1 &
PIDS+=($!)
for _ in $(seq 150); do
  [ -S "$CSOCK" ] && curl -fsS "http://$REG/v2/" >/dev/null 2>&1 && break
  sleep 0.2
done
CTR=("$CTR_REMOTE" -a "$CSOCK" -n bench)
skopeo copy --quiet --insecure-policy --dest-tls-verify=false oci:src:py "docker://$REG/py:src" >/dev/null
"${CTR[@]}" image pull --plain-http "$REG/py:src" >/dev/null

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
TIMEFORMAT='%R %U %S'
timed() { # name command...: appends "wall cpu" to WALL/CPU[name]
  local name=$1 t real user sys
  shift
  t=$({ time "$@" >/dev/null 2>"$WORK/err"; } 2>&1) || { echo "failed: $*" >&2; cat "$WORK/err" >&2; exit 1; }
  read -r real user sys <<<"$t"
  WALL[$name]+="$real "
  CPU[$name]+="$(echo "$user + $sys" | bc) "
}

# ---------------------------------------------------------------- throughput
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
declare -A WALL CPU
for i in $(seq "$N"); do
  timed ctr "${CTR[@]}" image convert --estargz --oci "$REG/py:src" "$REG/py:ctr-$i"
  "${CTR[@]}" image rm --sync "$REG/py:ctr-$i" >/dev/null
  timed lz "$LAZYSNAP" convert oci:src:py "oci:out-$i:esgz"
  rm -rf "out-$i"
  timed lz1 "$LAZYSNAP" convert oci:src:py "oci:out-$i:esgz" --threads 1 --jobs 1
  rm -rf "out-$i"
  timed lzreg "$LAZYSNAP" convert "$REG/py:src" "$REG/py:lz-$i"
done
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)
declare -A MED MCPU
for k in ctr lz lz1 lzreg; do
  MED[$k]=$(printf '%s\n' ${WALL[$k]} | median)
  MCPU[$k]=$(printf '%s\n' ${CPU[$k]} | median)
  echo "$k: wall ${WALL[$k]}; cpu ${CPU[$k]}" >&2
done
mbs() { echo "scale=1; $IN_BYTES / 1000000 / $1" | bc; }
speed() { printf '%.2f' "$(echo "scale=4; ${MED[ctr]} / $1" | bc)"; }
cpu_speed() { printf '%.2f' "$(echo "scale=4; ${MCPU[ctr]} / $1" | bc)"; }
# sizes of one conversion each (the last round's)
"${CTR[@]}" image convert --estargz --oci "$REG/py:src" "$REG/py:ctr-size" >/dev/null
CTR_SIZE=$("${CTR[@]}" image ls | awk -v r="$REG/py:ctr-size" '$1 == r { print $4 " " $5 }')
LZ_SIZE=$("$LAZYSNAP" convert oci:src:py oci:out-size:esgz --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["size_after"])')

# ---------------------------------------------------------------- --optimize
"$LAZYSNAP" convert "$REG/py:src" "$REG/py:esgz" >/dev/null
"$LAZYSNAP" convert "$REG/py:src" "$REG/py:opt" --optimize --json \
  -- /usr/bin/python3 -c 'print(1)' >opt.json
OPENED=$(python3 -c 'import json; print(len(json.load(open("opt.json"))["optimize"]["files"]))')
# One lazy mount per sample; `chroot DIR /usr/bin/python3 -c 'print(1)'` as soon as it
# is there. Without background fetch the registry's access log splits what was fetched
# at mount (footers, TOCs, prefetch) from what python3 waited for; with it (the
# default) the mount is stopped as soon as python3 is done and its counters say what
# was fetched by then.
now() { date +%s.%N; }
measure() { # tag [--no-background-fetch] -> "at_mount while_running in_all requests mount_s run_s"
  local dir=$WORK/mnt-$1 stats=$WORK/stats-$1.json pid t0 t1 t2 t3 mark
  mkdir -p "$dir"
  t0=$(now)
  "$LAZYSNAP" mount "$REG/py:$1" "$dir" --stats ${2:-} >"$stats" 2>/dev/null &
  pid=$!
  for _ in $(seq 3000); do grep -qF " $dir " /proc/self/mounts && break; sleep 0.01; done
  t1=$(now)
  [ -n "${2:-}" ] && sleep 0.5 # the prefetch request is logged once it has ended
  mark=$(stat -c %s registry.log)
  t2=$(now)
  chroot "$dir" /usr/bin/python3 -c 'print(1)' >/dev/null
  t3=$(now)
  kill -TERM "$pid"
  wait "$pid"
  python3 - "$stats" registry.log "$mark" <<'PY'
import json, re, sys
stats, log, mark = json.load(open(sys.argv[1])), open(sys.argv[2], "rb").read(), int(sys.argv[3])
sent = lambda text: sum(int(m.group(1)) for m in re.finditer(rb'"GET /v2/[^"]*/blobs/sha256:[0-9a-f]+ HTTP/1.1" 20[06] (\d+)', text))
total = sum(l["fetched_bytes"] for l in stats)
during = sent(log[mark:])
print(total - during, during, total, sum(l["fetch_requests"] for l in stats), end=" ")
PY
  echo "$(echo "$t1 - $t0" | bc) $(echo "$t3 - $t2" | bc)"
}
declare -A M
for i in $(seq "$N"); do
  for img in esgz opt; do
    for mode in lazy bg; do
      flag=--no-background-fetch
      [ "$mode" = bg ] && flag=
      read -r a b c d e f <<<"$(measure "$img" $flag)"
      M[$img-$mode-mount]+="$a "
      M[$img-$mode-run]+="$b "
      M[$img-$mode-all]+="$c "
      M[$img-$mode-req]+="$d "
      M[$img-$mode-ms]+="$e "
      M[$img-$mode-rs]+="$f "
    done
  done
done
for k in "${!M[@]}"; do echo "$k: ${M[$k]}" >&2; done
med() { printf '%s\n' ${M[$1]} | median; }
MB() { echo "scale=2; $1 / 1000000" | bc; }
ratio() { printf '%.2f' "$(echo "scale=4; $1 / $2" | bc)"; }
row() { # label img mode (the split at mount / while running only without background fetch)
  local split="$(MB "$(med "$2-$3-mount")") | $(MB "$(med "$2-$3-run")")"
  [ "$3" = bg ] && split="— | —"
  echo "| $1 | $split | $(MB "$(med "$2-$3-all")") | $(med "$2-$3-req") | $(printf '%.2f' "$(med "$2-$3-ms")") | $(printf '%.2f' "$(med "$2-$3-rs")") |"
}

section=$(cat <<EOF
$SECTION

\`bench/convert-image.sh\` (N=$N rounds, interleaved, medians; $(date -u +%Y-%m-%d), $VERSION,
$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average
(1 min) before/after: $LOAD_BEFORE / $LOAD_AFTER). Image: \`scripts/python-image.sh\` (Debian
minbase + python3 + app, 3 layers, $(MB "$IN_BYTES") MB of tar, $(MB "$GZ_BYTES") MB as
\`gzip -n -6\` layers). Both converters write eStargz with gzip level 9 and 4 MiB chunks
(their defaults) and read and write locally: ctr-remote (Debian's stargz-snapshotter
0.12) from containerd's content store into it, lazysnap from an OCI layout into a new
one. MB/s is uncompressed layer bytes per wall-clock second; "speed vs ctr-remote" is
ctr-remote's median wall time over the case's (goal ≥ 2× on 2 cores), "CPU vs
ctr-remote" the same for CPU time (user + system, children included), which other load
on the machine disturbs less (ctr-remote's excludes what containerd spends storing its blobs).

| case | command | median wall s | median CPU s | MB/s | speed vs ctr-remote | CPU vs ctr-remote |
| --- | --- | ---: | ---: | ---: | ---: | ---: |
| ctr-remote (baseline) | \`ctr-remote image convert --estargz --oci SRC DST\` | ${MED[ctr]} | ${MCPU[ctr]} | $(mbs "${MED[ctr]}") | 1.00× | 1.00× |
| lazysnap | \`lazysnap convert oci:src:py oci:out:esgz\` | ${MED[lz]} | ${MCPU[lz]} | $(mbs "${MED[lz]}") | $(speed "${MED[lz]}")× | $(cpu_speed "${MCPU[lz]}")× |
| lazysnap, 1 thread, 1 layer at a time | \`… --threads 1 --jobs 1\` | ${MED[lz1]} | ${MCPU[lz1]} | $(mbs "${MED[lz1]}") | $(speed "${MED[lz1]}")× | $(cpu_speed "${MCPU[lz1]}")× |
| lazysnap, registry to registry (pull + push over loopback) | \`lazysnap convert REG/py:src REG/py:esgz\` | ${MED[lzreg]} | ${MCPU[lzreg]} | $(mbs "${MED[lzreg]}") | $(speed "${MED[lzreg]}")× | $(cpu_speed "${MCPU[lzreg]}")× |

Output: ctr-remote's image $CTR_SIZE, lazysnap's layers $(MB "$LZ_SIZE") MB.

**\`--optimize\`**: \`lazysnap convert REG/py:src REG/py:opt --optimize -- /usr/bin/python3 -c 'print(1)'\`
ran the command in the image's lazily mounted root filesystem ($OPENED files opened) and
put those files first in each layer, before \`.prefetch.landmark\`; \`REG/py:esgz\` is the
same conversion without it. Each sample mounts one of them with \`lazysnap mount REF DIR\`
from the loopback registry (a fresh mount and memory cache each time) and runs
\`chroot DIR /usr/bin/python3 -c 'print(1)'\` as soon as DIR appears. Fetched bytes
are every byte read from the registry (footers, TOCs, prefetch, chunks): "at mount" until
DIR appears (the prefetch of the files before the landmark happens there, one request per
layer), "while python3 ran" until it exited (from the registry's access log), "in all"
from the mount's \`--stats\` when stopped right after python3. "mount s" is until DIR
appears, "python3 s" the command alone.

| image, mount options | at mount MB | while python3 ran MB | in all MB | range requests | mount s | python3 s |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
$(row "unoptimized, \`--no-background-fetch\`" esgz lazy)
$(row "\`--optimize\`, \`--no-background-fetch\`" opt lazy)
$(row "unoptimized, background fetch on (the default)" esgz bg)
$(row "\`--optimize\`, background fetch on (the default)" opt bg)

Without background fetch both images fetch the same bytes in all — the files python3
reads, whole, and the TOCs: optimized / unoptimized $(ratio "$(med opt-lazy-all)" "$(med esgz-lazy-all)")×
in all, but $(MB "$(med opt-lazy-run)") MB instead of $(MB "$(med esgz-lazy-run)") MB fetched while
python3 ran, and $(ratio "$(med opt-lazy-req)" "$(med esgz-lazy-req)")× the requests: the optimized
image's files arrive with the mount, the unoptimized image's in on-demand requests that
python3 waits for. With background fetch on, the rest of each layer streams in while
the command runs, so a command that waits longer has more fetched by its end (the
split at mount / while running is not shown for these rows: background requests
straddle it): when python3 finished, the optimized image had
$(ratio "$(med opt-bg-all)" "$(med esgz-bg-all)")× the unoptimized image's bytes fetched, and python3 took
$(ratio "$(med opt-bg-rs)" "$(med esgz-bg-rs)")× the time.
EOF
)
printf '%s\n' "$section" >section.md
touch "$OUTMD"
python3 "$ROOT/bench/replace-section.py" "$OUTMD" "$SECTION" section.md
echo "wrote '$SECTION' in $OUTMD" >&2
