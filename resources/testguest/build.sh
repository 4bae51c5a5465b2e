#!/usr/bin/env bash
# Builds the Blimp test guest (a freestanding x86_64 ELF) in release mode.
# Build output goes under ${BLIMP_CACHE:-~/.cache/blimp}/testguest-target,
# never into the repository: one target directory per checkout (named after
# a hash of this directory's path), because checkouts sharing one target
# directory overwrite each other's final binary. The last line printed is
# the ELF's absolute path. With --unit-tests it runs the host unit tests of
# the guest's pure logic instead (cargo test --lib).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${BLIMP_CACHE:-$HOME/.cache/blimp}"
checkout_id="$(printf '%s' "$here" | sha256sum | cut -c1-16)"
target_dir="$cache/testguest-target/$checkout_id"
mkdir -p "$target_dir"
target_dir="$(cd "$target_dir" && pwd)"
# Cargo finds .cargo/config.toml (rustflags) from the working directory.
cd "$here"
if [ "${1:-}" = "--unit-tests" ]; then
  # The pure logic (lib.rs) as ordinary host tests.
  exec cargo test --lib --locked --target-dir "$target_dir"
fi
cargo build --release --locked --target-dir "$target_dir" >&2
elf="$target_dir/x86_64-unknown-linux-gnu/release/testguest"
test -f "$elf"
echo "$elf"
