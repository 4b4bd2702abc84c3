# Sourced by bench scripts: sets LAZYSNAP (built here unless given) and VERSION (the
# commit, or the given binary's build time), for the figures' provenance line.
# Needs ROOT (the repository).
if [ -z "${LAZYSNAP:-}" ]; then
  (cd "$ROOT" && cargo build --release --quiet)
  LAZYSNAP=${CARGO_TARGET_DIR:-$ROOT/target}/release/lazysnap
  VERSION="lazysnap $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo "(no commit)")"
  if (cd "$ROOT" && git status --porcelain --untracked-files=no 2>/dev/null | grep -q .); then
    VERSION="$VERSION + local changes"
  fi
else
  VERSION="lazysnap binary $LAZYSNAP built $(date -u -r "$LAZYSNAP" '+%Y-%m-%d %H:%M UTC')"
fi
