#!/usr/bin/env bash
# Builds Blimp's guest artifacts. Artifacts are cached outside the repository,
# under ${BLIMP_CACHE:-~/.cache/blimp}; a re-run only rebuilds what changed.
#
#   resources/build.sh testguest   build the test guest; last line: the ELF's absolute path
#   resources/build.sh testguest-unit
#                                  run the test guest's host unit tests (cargo test --lib)
#   resources/build.sh linux       build the minimal Linux kernel + initramfs;
#                                  last two lines: the vmlinux path, then the initramfs path
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export BLIMP_CACHE="${BLIMP_CACHE:-$HOME/.cache/blimp}"
mkdir -p "$BLIMP_CACHE"

case "${1:-}" in
  testguest) exec "$here/testguest/build.sh" ;;
  testguest-unit) exec "$here/testguest/build.sh" --unit-tests ;;
  linux) exec "$here/linux/build.sh" ;;
  *)
    echo "usage: $0 testguest|testguest-unit|linux" >&2
    echo "  testguest  build the ring-3 test guest (prints the ELF path last)" >&2
    echo "  testguest-unit  run the test guest's host unit tests" >&2
    echo "  linux      build the minimal Linux 6.12 kernel and initramfs (prints both paths last)" >&2
    exit 2
    ;;
esac
