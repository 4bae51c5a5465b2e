#!/usr/bin/env bash
# Builds the Blimp test guest (a freestanding x86_64 ELF) in release mode.
# Build output goes to ${BLIMP_CACHE:-~/.cache/blimp}/testguest-target, never
# into the repository. The last line printed is the ELF's absolute path.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${BLIMP_CACHE:-$HOME/.cache/blimp}"
target_dir="$cache/testguest-target"
mkdir -p "$target_dir"
target_dir="$(cd "$target_dir" && pwd)"
# Cargo finds .cargo/config.toml (rustflags) from the working directory.
cd "$here"
cargo build --release --locked --target-dir "$target_dir" >&2
elf="$target_dir/x86_64-unknown-linux-gnu/release/testguest"
test -f "$elf"
echo "$elf"
