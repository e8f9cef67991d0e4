#!/usr/bin/env bash
# Builds the Debian package of litestreamd:
#   1. the release binary (cargo build --release --locked),
#   2. its man page and shell completions (`litestreamd generate-docs`) into
#      $TARGET_DIR/release/packaging-assets/, where the `target/release/packaging-assets/...`
#      assets of [package.metadata.deb] in Cargo.toml point (cargo-deb maps the magic prefix
#      `target/release/` to the real target directory, CARGO_TARGET_DIR included),
#   3. the .deb, with cargo-deb 3.8.0 (installed into $LITESTREAMD_DEPS/cargo-deb when missing).
# Prints the path of the .deb as the only line on stdout; progress goes to stderr.
#
# Usage: packaging/build-deb.sh   (from anywhere; works from a fresh clone)
# Environment: CARGO_TARGET_DIR (cargo's target directory), LITESTREAMD_DEPS (tool cache,
# default ~/.cache/litestreamd-deps), CARGO (the cargo binary, default cargo).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
DEPS="${LITESTREAMD_DEPS:-$HOME/.cache/litestreamd-deps}"
CARGO_DEB_VERSION=3.8.0
CARGO_DEB="$DEPS/cargo-deb/bin/cargo-deb"

log() { echo "build-deb: $*" >&2; }
die() {
    echo "build-deb: error: $*" >&2
    exit 1
}

# cargo-deb, pinned: the asset and maintainer-script handling in Cargo.toml was checked
# against this version.
if ! [ -x "$CARGO_DEB" ] || [ "$("$CARGO_DEB" --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    log "installing cargo-deb $CARGO_DEB_VERSION into $DEPS/cargo-deb (about a minute, once)"
    mkdir -p "$DEPS"
    CARGO_TARGET_DIR="$DEPS/cargo-deb-build" "$CARGO" install "cargo-deb@$CARGO_DEB_VERSION" \
        --locked --force --root "$DEPS/cargo-deb" >&2
fi
[ "$("$CARGO_DEB" --version)" = "cargo-deb $CARGO_DEB_VERSION" ] ||
    die "$CARGO_DEB is not cargo-deb $CARGO_DEB_VERSION"

# The target directory as cargo resolves it (CARGO_TARGET_DIR, .cargo/config.toml, ./target).
TARGET_DIR=$("$CARGO" metadata --format-version 1 --no-deps --locked |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$TARGET_DIR" ] || die "cannot find cargo's target directory"
export CARGO_TARGET_DIR="$TARGET_DIR"

log "building the release binary (target directory $TARGET_DIR)"
"$CARGO" build --release --locked --bin litestreamd >&2
BIN="$TARGET_DIR/release/litestreamd"
[ -x "$BIN" ] || die "$BIN was not built"

# Must match the target/release/packaging-assets/ assets in Cargo.toml.
ASSETS="$TARGET_DIR/release/packaging-assets"
log "generating the man page and shell completions into $ASSETS"
rm -rf "$ASSETS"
"$BIN" generate-docs "$ASSETS" >&2
for f in litestreamd.1 litestreamd.bash _litestreamd litestreamd.fish; do
    [ -s "$ASSETS/$f" ] || die "generate-docs did not write $ASSETS/$f"
done
# Debian wants man pages gzipped; cargo-deb compresses only sources outside target/release/.
# -n: no name or time stamp in the header, so the same page gives the same bytes.
gzip -9n --keep "$ASSETS/litestreamd.1"

OUT_DIR="$TARGET_DIR/debian"
mkdir -p "$OUT_DIR"
log "running cargo-deb"
# --no-build: the binary above is the one packaged. cargo-deb strips it and moves the debug
# symbols into litestreamd-dbgsym_*.ddeb beside the .deb (dbgsym = true in Cargo.toml).
out=$("$CARGO_DEB" --no-build --output "$OUT_DIR" </dev/null) || die "cargo-deb failed"
deb=$(printf '%s\n' "$out" | grep '\.deb$' | tail -n 1)
[ -n "$deb" ] && [ -f "$deb" ] || die "cargo-deb did not report a .deb (output: $out)"
printf '%s\n' "$out" | grep -v '\.deb$' | sed 's/^/build-deb: also built /' >&2 || true
log "built $deb"
echo "$deb"
