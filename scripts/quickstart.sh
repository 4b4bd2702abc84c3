#!/usr/bin/env bash
# Quickstart: install what lazysnap needs, build it, and show a layer read lazily.
# Run from the repository as root on Debian bookworm:  scripts/quickstart.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Debian packages"
PKGS=(containerd runc docker-registry skopeo fuse3 protobuf-compiler busybox-static curl zstd ca-certificates gcc libc6-dev)
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
L=$ROOT/target/release/lazysnap

WORK=$(mktemp -d /tmp/lazysnap-quickstart.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

say "a busybox root filesystem as a layer tar"
mkdir -p "$WORK/rootfs/bin" "$WORK/rootfs/etc"
cp /bin/busybox "$WORK/rootfs/bin/busybox"
for a in sh ls cat echo; do ln -s busybox "$WORK/rootfs/bin/$a"; done
echo "hello from a lazily read layer" > "$WORK/rootfs/etc/motd"
tar --numeric-owner -C "$WORK/rootfs" -cf "$WORK/layer.tar" .
ls -l "$WORK/layer.tar"

say "convert to eStargz, with /bin/busybox prioritized"
printf '/bin/busybox\n' > "$WORK/prio"
"$L" layer convert "$WORK/layer.tar" "$WORK/layer.blob" --format estargz --prioritized "$WORK/prio" | tee "$WORK/out"
TOC=$(sed -n 's/^toc_digest: //p' "$WORK/out")

say "verify every chunk against the TOC digest"
"$L" layer verify "$WORK/layer.blob" --toc-digest "$TOC"

say "list and read through the TOC"
"$L" layer ls "$WORK/layer.blob" | head -n 8
"$L" layer cat "$WORK/layer.blob" /etc/motd
