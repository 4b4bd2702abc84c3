#!/usr/bin/env bash
# Restarts under a running container (issue 11): runs the end-to-end test
# tests/e2e_restart.rs N times and writes its figures (medians) as a section of
# BENCHMARKS.md. Each run: a container reading files of a lazily pulled image in a
# loop while the daemon is (a) stopped with SIGTERM and started again, (b) killed with
# SIGKILL and started again, (c) replaced with `serve --takeover`; the baseline is a
# window of the same loop without a restart, in the same run. Then a simulated reboot
# with the registry down.
#
#   bench/restart.sh            (N=3)
#
# Needs root, containerd, runc, docker-registry, ctr-remote (as the test does).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-3}
SECTION="## Restarts: mounts that survive the daemon (issue 11)"
OUTMD=${BENCHMARKS_MD:-$ROOT/BENCHMARKS.md}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

VERSION="lazysnap $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo "(no commit)")"
(cd "$ROOT" && git status --porcelain --untracked-files=no 2>/dev/null | grep -q .) && VERSION="$VERSION + local changes"
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
for i in $(seq "$N"); do
  echo "restart.sh: run $i of $N" >&2
  if ! (cd "$ROOT" && CI=true cargo test --release --quiet --test e2e_restart -- --nocapture) \
    >"$WORK/run$i.log" 2>&1; then
    grep -A20 panicked "$WORK/run$i.log" >&2 || tail -50 "$WORK/run$i.log" >&2
    exit 1
  fi
  grep '^restart-figure ' "$WORK/run$i.log" | sed 's/^restart-figure //' >>"$WORK/figures.jsonl"
done
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)

rows=$(python3 - "$WORK/figures.jsonl" <<'PYEOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
cases = []
for r in runs:
    if r["case"] not in cases:
        cases.append(r["case"])
med = lambda c, k: statistics.median(r[k] for r in runs if r["case"] == c and k in r)
every = lambda c, k: " ".join(f"{r[k]:.0f}" for r in runs if r["case"] == c and k in r)
base = med("no restart (baseline)", "longest_stall_ms")
for c in cases:
    if "reads" not in next(r for r in runs if r["case"] == c):
        continue
    stall = med(c, "longest_stall_ms")
    up = f"{med(c, 'daemon_up_ms'):.0f}" if c != "no restart (baseline)" else "—"
    fails = sum(r["failed"] for r in runs if r["case"] == c)
    print(f"| {c} | {med(c, 'window_s'):.2f} | {med(c, 'reads'):.0f} | {fails} | "
          f"{stall:.0f} ({every(c, 'longest_stall_ms')}) | {stall / base:.1f}× | {up} |")
print()
for c in cases:
    if "status_answered_ms" in next(r for r in runs if r["case"] == c):
        print(f"Simulated reboot, registry stopped: the daemon's socket accepted after "
              f"{med(c, 'daemon_up_ms'):.0f} ms and `lazysnap status` answered after "
              f"{med(c, 'status_answered_ms'):.0f} ms (medians; runs: {every(c, 'status_answered_ms')} ms), "
              f"with no layer mounted; once the registry was back, `ctr run` of the image "
              f"mounted its layer at first use and printed the file.")
PYEOF
)

cat >"$WORK/section.md" <<EOF
$SECTION

\`bench/restart.sh\` (N=$N runs of \`cargo test --release --test e2e_restart\`, medians;
$(date -u +%Y-%m-%d), $VERSION, kernel $(uname -r), $(nproc) cores; load average
(1 min) before/after: $LOAD_BEFORE / $LOAD_AFTER). A busybox eStargz image pulled
lazily (\`ctr-remote image rpull\`) from a loopback docker-registry; one container
runs a shell loop that execs \`cat\` of a small file and \`busybox dd\` of 4 KiB of a
24 MiB file at a new offset (an on-demand range request) per iteration and prints OK
or FAIL; the test stamps each line as it arrives. A window runs from the restart
until 50 lines after the new daemon accepts; "longest stall" is the longest gap
between two lines in it (all runs in brackets), against the longest gap of a window
without a restart in the same run. "daemon up" is until the new daemon's socket
accepts (for SIGTERM it includes the old daemon's shutdown).

| case | window s | reads | failed reads (all runs) | longest stall ms | stall vs baseline | daemon up ms |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
$rows

$(cat "$ROOT/bench/restart-notes.md" 2>/dev/null || true)
EOF
python3 "$ROOT/bench/replace-section.py" "$OUTMD" "$SECTION" "$WORK/section.md"
echo "wrote '$SECTION' in $OUTMD" >&2
