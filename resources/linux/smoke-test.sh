#!/usr/bin/env bash
# Boots the real Linux guest under blimp and checks the agent's answers.
#
#   resources/linux/smoke-test.sh [BLIMP]     (default: target/release/blimp)
#
# Builds the guest if needed (resources/linux/build.sh, cached), boots it with
# 256 MiB and the command line Blimp's PVM mode needs, runs agent commands
# from blimp.run= and ends with `poweroff`, which the VMM sees as a reset.
# Takes ~10 s on the PVM hosts (most of it emulated guest kernel), well under
# a second of guest time on real KVM. Needs /dev/kvm.
# Environment: SMOKE_TIMEOUT (s, default 300), SMOKE_MEMORY (default 256M),
# SMOKE_CMDLINE_EXTRA (appended to the kernel command line),
# SMOKE_LOG (console log file, default: a temporary file).
# Prints "N passed, N failed" last; exits non-zero on any failure.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
blimp="${1:-$repo/target/release/blimp}"
[ -x "$blimp" ] || { echo "smoke-test: no blimp at $blimp (cargo build --release)" >&2; exit 1; }
[ -c /dev/kvm ] || { echo "smoke-test: no /dev/kvm" >&2; exit 1; }

mapfile -t paths < <("$here/build.sh" | tail -n 2)
vmlinux="${paths[0]}" initrd="${paths[1]}"

# What Blimp's PVM mode adds (docs/linux-guest.md); harmless on real KVM.
cmdline='console=ttyS0 reboot=k panic=1 noxsave clearcpuid=150,151,154,308,534,112,297,580'
cmdline+=' nofsgsbase init_on_alloc=0 mitigations=off nokaslr rodata=off retain_initrd'
# Kernel messages through the emulated UART cost ~10 s of a PVM boot.
cmdline+=' quiet'
cmdline+=' blimp.run="meminfo;features;balloon;alloc 4 100;tmpfs-write a 2 7;sha256 a;tmpfs-rm a;uptime;poweroff"'
cmdline+="${SMOKE_CMDLINE_EXTRA:+ $SMOKE_CMDLINE_EXTRA}"

log="${SMOKE_LOG:-$(mktemp)}"
echo "smoke-test: booting $vmlinux (console log: $log)" >&2
start=$SECONDS
rc=0
timeout "${SMOKE_TIMEOUT:-300}" "$blimp" run --kernel "$vmlinux" --initrd "$initrd" \
  --memory "${SMOKE_MEMORY:-256M}" --no-stdin --cmdline "$cmdline" >"$log" 2>&1 || rc=$?
tr -d '\r' <"$log" >"$log.clean" && mv "$log.clean" "$log"
echo "smoke-test: blimp exited $rc after $((SECONDS - start)) s" >&2

pass=0 fail=0
check() { # description, extended regex for a whole console line
  if grep -qxE -- "$2" "$log"; then pass=$((pass + 1))
  else fail=$((fail + 1)); echo "FAIL: $1: no line matching: $2" >&2; fi
}
[ "$rc" -eq 0 ] && pass=$((pass + 1)) || { fail=$((fail + 1)); echo "FAIL: blimp exit status $rc" >&2; }
check "agent ready" 'BLIMP-AGENT READY'
check "meminfo" '@@ meminfo MemTotal=[0-9]+ MemFree=[0-9]+ MemAvailable=[0-9]+'
check "features" '@@ features count=[0-9]+'
check "balloon" '@@ done balloon rc=[01]'
check "alloc" '@@ alloc ok mib=4 pages=1024 touch_ms=[0-9]+ hold_ms=100'
check "tmpfs-write" '@@ tmpfs-write ok mib=2 seed=0x0000000000000007 sha256=([0-9a-f]{64}) ms=[0-9]+'
# the file read back has the hash of what was written
w="$(sed -n 's/^@@ tmpfs-write ok .*sha256=\([0-9a-f]*\) .*/\1/p' "$log")"
check "sha256 read back" "@@ sha256 ok bytes=2097152 sha256=${w:-none}"
check "tmpfs-rm" '@@ done tmpfs-rm rc=0'
check "poweroff" '@@ done poweroff rc=0'
n="$(grep -c '^@@ done .* rc=0$' "$log" || true)"
[ "$n" -ge 8 ] && pass=$((pass + 1)) ||
  { fail=$((fail + 1)); echo "FAIL: only $n commands succeeded" >&2; }
if [ "$fail" -gt 0 ]; then
  echo "smoke-test: console tail:" >&2
  tail -n 40 "$log" >&2
fi
[ -n "${SMOKE_LOG:-}" ] || rm -f "$log"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
