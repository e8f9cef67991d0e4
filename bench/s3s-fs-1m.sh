#!/usr/bin/env bash
# Builds s3s-fs 0.14.1 with one change: its GET body reads the object file in 1 MiB chunks
# instead of 4 KiB (`ReaderStream::with_capacity(file, 4096)` in s3.rs). Stock s3s-fs hops to
# tokio's blocking pool for every 4 KiB and burns 4-5 s of CPU per GiB it serves, which on a
# 2-core machine bounds any S3 restore from it; this build shows where the restore stands when
# the server is not the bound. Both tools restore from the same server in a run, so the
# comparison with Litestream stays fair. Usage:
#   bench/run.sh --s3s-fs "$(bench/s3s-fs-1m.sh)" --only shapes --reps 3
set -euo pipefail
DEPS="${LITESTREAMD_DEPS:-$HOME/.cache/litestreamd-deps}"
ROOT="$DEPS/s3s-fs-1m"
if [ ! -x "$ROOT/bin/s3s-fs" ]; then
  SRC="$(mktemp -d)"
  trap 'rm -rf "$SRC"' EXIT
  echo "building s3s-fs 0.14.1 with 1 MiB GET reads into $ROOT (a few minutes, once)" >&2
  # The crate's published source, as cargo fetched it for the stock install.
  CRATE="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/s3s-fs-0.14.1 2>/dev/null | head -1)"
  if [ -z "$CRATE" ]; then
    # Not fetched yet: have cargo fetch it through a throwaway package.
    mkdir -p "$SRC/fetch/src" && touch "$SRC/fetch/src/lib.rs"
    printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ns3s-fs = "=0.14.1"\n' \
      > "$SRC/fetch/Cargo.toml"
    (cd "$SRC/fetch" && cargo fetch --quiet)
    CRATE="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/s3s-fs-0.14.1 | head -1)"
  fi
  cp -r "$CRATE" "$SRC/s3s-fs"
  chmod -R u+w "$SRC/s3s-fs"
  grep -q 'ReaderStream::with_capacity(file, 4096)' "$SRC/s3s-fs/src/s3.rs"
  sed -i 's/ReaderStream::with_capacity(file, 4096)/ReaderStream::with_capacity(file, 1 << 20)/' \
    "$SRC/s3s-fs/src/s3.rs"
  CARGO_TARGET_DIR="$SRC/target" cargo install --path "$SRC/s3s-fs" --features binary --locked \
    --root "$ROOT" --quiet
fi
echo "$ROOT/bin/s3s-fs"
