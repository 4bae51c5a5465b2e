#!/usr/bin/env bash
# Builds the Blimp test guest (a freestanding x86_64 ELF) in release mode.
# Build output goes to ${BLIMP_CACHE:-~/.cache/blimp}/testguest-target/<key>,
# never into the repository; the key is a hash of this source tree's path, so
# two checkouts never overwrite each other's guest (cargo only rebuilds what
# changed inside one). The last line printed is the ELF's absolute path.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${BLIMP_CACHE:-$HOME/.cache/blimp}"
key="$(printf '%s' "$here" | sha256sum | cut -c1-16)"
target_dir="$cache/testguest-target/$key"
mkdir -p "$target_dir"
target_dir="$(cd "$target_dir" && pwd)"
# Cargo finds .cargo/config.toml (rustflags) from the working directory.
cd "$here"
cargo build --release --locked --target-dir "$target_dir" >&2
elf="$target_dir/x86_64-unknown-linux-gnu/release/testguest"
test -f "$elf"
echo "$elf"
