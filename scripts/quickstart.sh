#!/usr/bin/env bash
# Quickstart: install what lazysnap needs, build it, and start a container lazily.
# Run from the repository, as root, on Debian bookworm:   scripts/quickstart.sh
#
# It starts private instances (everything under one temporary directory, loopback
# only, all stopped again at the end): a docker-registry with a sample eStargz image
# converted by lazysnap, `lazysnap serve`, and containerd with lazysnap as its proxy
# snapshotter. Then it pulls the image lazily (ctr-remote rpull) and runs it, and
# does the same with containerd's overlayfs snapshotter for comparison.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
now() { date +%s.%N; }
secs() { printf '%.2f' "$(echo "$2 - $1" | bc)"; }

say "Debian packages"
PKGS=(containerd runc docker-registry fuse3 busybox-static curl ca-certificates bc stargz-snapshotter protobuf-compiler gcc libc6-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

say "build"
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
L=${CARGO_TARGET_DIR:-$ROOT/target}/release/lazysnap

W=$(mktemp -d /tmp/lazysnap-quickstart.XXXXXX)
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  # the shims of our containerd, found by name first: `pkill -f` reads every
  # process's command line, which blocks behind any process stuck in a page fault
  for d in /proc/[0-9]*; do
    case "$(cat "$d/comm" 2>/dev/null)" in containerd-shim*) ;; *) continue ;; esac
    tr '\0' ' ' < "$d/cmdline" 2>/dev/null | grep -qF "$W/" && kill "${d#/proc/}" 2>/dev/null
  done
  sleep 1
  grep -o " $W[^ ]*" /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$W"
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$PORT

say "a local registry on $REG"
cat > "$W/registry.yml" <<YML
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $W/registry}}
http: {addr: $REG}
YML
docker-registry serve "$W/registry.yml" > "$W/registry.log" 2>&1 & PIDS+=($!)
for _ in $(seq 50); do curl -sf "http://$REG/v2/" > /dev/null && break; sleep 0.2; done

say "a busybox image, converted to eStargz by lazysnap and pushed"
mkdir -p "$W/rootfs/bin" "$W/rootfs/etc" "$W/rootfs/data" "$W/rootfs/proc" "$W/rootfs/sys" "$W/rootfs/dev"
cp /bin/busybox "$W/rootfs/bin/busybox"
for a in sh ls cat echo; do ln -s busybox "$W/rootfs/bin/$a"; done
echo "hello from a lazily pulled image" > "$W/rootfs/etc/motd"
head -c 64M /dev/urandom > "$W/rootfs/data/big.bin"   # never read by the container
tar --numeric-owner -C "$W/rootfs" -cf "$W/layer.tar" .
printf '/bin/busybox\n/etc/motd\n' > "$W/prio"
"$L" layer convert "$W/layer.tar" "$W/layer.blob" --prioritized "$W/prio" --json > "$W/convert.json"
field() { python3 -c "import json,sys; d=json.load(open('$W/convert.json')); print(eval(sys.argv[1]))" "$1"; }
push_blob() { # file -> digest
  local d="sha256:$(sha256sum "$1" | cut -d' ' -f1)" loc
  loc=$(curl -sfi -X POST "http://$REG/v2/demo/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
  case "$loc" in http*) ;; *) loc="http://$REG$loc";; esac
  curl -sf -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$1" "$loc&digest=$d" > /dev/null
  echo "$d"
}
LAYER=$(push_blob "$W/layer.blob")
printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
  "$(field 'd["diff_id"]')" > "$W/config.json"
CONFIG=$(push_blob "$W/config.json")
cat > "$W/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
 "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$CONFIG","size":$(stat -c %s "$W/config.json")},
 "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"$LAYER","size":$(stat -c %s "$W/layer.blob"),
   "annotations":{"containerd.io/snapshot/stargz/toc.digest":"$(field 'd["toc_digest"]')",
                  "io.containers.estargz.uncompressed-size":"$(field 'd["uncompressed_size"]')"}}]}
JSON
curl -sf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
  --data-binary "@$W/manifest.json" "http://$REG/v2/demo/manifests/esgz" > /dev/null
IMAGE=$REG/demo:esgz
echo "$IMAGE: layer $(stat -c %s "$W/layer.blob") bytes"

say "lazysnap serve, then containerd with lazysnap as a proxy snapshotter"
cat > "$W/lazysnap.toml" <<TOML
socket = "$W/lazysnap.sock"
root = "$W/lazysnap"
TOML
"$L" serve --config "$W/lazysnap.toml" > "$W/lazysnap.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do [ -S "$W/lazysnap.sock" ] && break; sleep 0.1; done
cat > "$W/containerd.toml" <<TOML
version = 2
root = "$W/containerd/root"
state = "$W/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$W/containerd/c.sock"
[proxy_plugins.lazysnap]
  type = "snapshot"
  address = "$W/lazysnap.sock"
TOML
mkdir -p "$W/containerd"
containerd --config "$W/containerd.toml" > "$W/containerd/log" 2>&1 & PIDS+=($!)
CTR=(ctr --address "$W/containerd/c.sock")
for _ in $(seq 100); do "${CTR[@]}" version > /dev/null 2>&1 && break; sleep 0.2; done

say "lazy: ctr-remote image rpull + ctr run (snapshotter lazysnap)"
t0=$(now)
ctr-remote --address "$W/containerd/c.sock" image rpull --plain-http --snapshotter lazysnap "$IMAGE" > /dev/null
"${CTR[@]}" run --rm --snapshotter lazysnap --net-host "$IMAGE" lazy /bin/cat /etc/motd
t1=$(now)
say "what lazysnap fetched"
"$L" status --config "$W/lazysnap.toml"

say "full pull: ctr image pull + ctr run (snapshotter overlayfs)"
"${CTR[@]}" image rm "$IMAGE" > /dev/null
t2=$(now)
"${CTR[@]}" image pull --plain-http --snapshotter overlayfs "$IMAGE" > /dev/null
"${CTR[@]}" run --rm --snapshotter overlayfs --net-host "$IMAGE" full /bin/cat /etc/motd
t3=$(now)

echo
echo "cold start, lazy (lazysnap):      $(secs "$t0" "$t1") s"
echo "cold start, full pull (overlayfs): $(secs "$t2" "$t3") s"
