#!/usr/bin/env bash
# Host-side test of the Blimp guest agent (no VM needed): runs the agent's
# dispatcher under busybox ash, the guest's shell, against a fake /proc and
# /sys, with the helper compiled for the host, and checks its output lines.
#
#   resources/linux/agent/test.sh            # needs busybox (busybox-static) and gcc
#
# Prints "N passed, N failed" last; exits non-zero on any failure.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUSYBOX="${BUSYBOX:-$(command -v busybox || echo /bin/busybox)}"
[ -x "$BUSYBOX" ] || { echo "test.sh: busybox not found (apt-get install busybox-static)" >&2; exit 1; }

w="$(mktemp -d)"
trap '[ -n "${KEEP:-}" ] && echo "kept $w" >&2 || rm -rf "$w"' EXIT
gcc -static -O2 -Wall -Wextra -Werror -o "$w/blimp-helper" "$here/helper.c"

# ---- fake guest -------------------------------------------------------------
mkdir -p "$w/proc/sys/vm" "$w/tmp" "$w/run" "$w/bin"
cat >"$w/proc/meminfo" <<'EOF'
MemTotal:         243360 kB
MemFree:          221228 kB
MemAvailable:     215000 kB
Buffers:               0 kB
Shmem:              2620 kB
EOF
cat >"$w/proc/vmstat" <<'EOF'
nr_free_pages 55307
pgfault 1234
balloon_inflate 256
balloon_deflate 128
balloon_migrate 3
EOF
echo "12.34 10.00" >"$w/proc/uptime"
: >"$w/proc/sys/vm/compact_memory"
v="$w/sys/bus/virtio"
mkdir -p "$v/devices/virtio0" "$v/devices/virtio1" "$v/drivers/virtio_balloon" \
  "$w/sys/bus/platform/devices/virtio-mmio.0/driver" "$w/sys/bus/platform/devices/virtio-mmio.1" \
  "$w/sys/module/page_reporting/parameters"
echo 0x0005 >"$v/devices/virtio0/device"
echo 0x554d4551 >"$v/devices/virtio0/vendor"
echo 0x0000000f >"$v/devices/virtio0/status"
# bits 1 (STATS_VQ), 2 (DEFLATE_ON_OOM), 5 (REPORTING), 32 (VERSION_1)
echo 0110010000000000000000000000000010000000000000000000000000000000 >"$v/devices/virtio0/features"
ln -s ../../devices/virtio0 "$v/drivers/virtio_balloon/virtio0"
echo 0x0002 >"$v/devices/virtio1/device"
echo 0x554d4551 >"$v/devices/virtio1/vendor"
echo 0x00000003 >"$v/devices/virtio1/status"
echo 0000000000000000000000000000000010000000000000000000000000000000 >"$v/devices/virtio1/features"
echo 9 >"$w/sys/module/page_reporting/parameters/page_reporting_order"

# A busybox applet dir first in PATH, so free/rm/sleep are busybox's.
for a in free grep rm sleep; do ln -s "$BUSYBOX" "$w/bin/$a"; done

run_agent() { # $1: kernel cmdline, stdin: console input; stdout: console output
  echo "$1" >"$w/proc/cmdline"
  PATH="$w/bin:/usr/bin:/bin" BLIMP_PROC="$w/proc" BLIMP_SYS="$w/sys" BLIMP_TMP="$w/tmp" \
    BLIMP_RUN="$w/run" BLIMP_HELPER="$w/blimp-helper" \
    "$BUSYBOX" sh -c '. "$1"; agent_reboot() { echo "FAKE-REBOOT"; exit 0; }; agent_main' \
    agent "$here/agent.sh"
}

pass=0 fail=0
check() { # description, extended regex that must match a whole line of $out
  if grep -qxE -- "$2" <<<"$out"; then pass=$((pass + 1))
  else fail=$((fail + 1)); echo "FAIL: $1: no line matching: $2" >&2; fi
}
check_not() {
  if grep -qxE -- "$2" <<<"$out"; then fail=$((fail + 1)); echo "FAIL: $1: unexpected line: $2" >&2
  else pass=$((pass + 1)); fi
}

# ---- 1: commands from the kernel command line, then the console ---------------
out="$(run_agent 'console=ttyS0 reboot=k blimp.run="meminfo;features;uptime" panic=1' <<'EOF'
balloon
free
tmpfs-write a 3 0x1234
sha256 a
tmpfs-write b 1
alloc 8 10
alloc 0
tmpfs-write ../x 1
tmpfs-write .hidden 1
tmpfs-rm a
tmpfs-rm a
sleep 0.1
compact
echo hello world
sh echo one; echo two >&2; exit 3
frobnicate 1 2

# comment
help
poweroff
meminfo
EOF
)"
echo "$out" >"$w/out1.txt"
check "version line first" '@@ agent version=1 uptime=12.34'
check ready 'BLIMP-AGENT READY'
[ "$(sed -n 2p <<<"$out")" = "BLIMP-AGENT READY" ] && pass=$((pass + 1)) ||
  { fail=$((fail + 1)); echo "FAIL: READY is not the second line" >&2; }
check "cmdline begin" '@@ begin meminfo'
check meminfo '@@ meminfo MemTotal=243360 MemFree=221228 MemAvailable=215000'
check "meminfo done" '@@ done meminfo rc=0'
check "features balloon" '@@ features virtio0 device=0x0005 vendor=0x554d4551 status=0x0000000f driver=virtio_balloon features=0110010000000000000000000000000010000000000000000000000000000000'
check "features other" '@@ features virtio1 device=0x0002 vendor=0x554d4551 status=0x00000003 driver=none features=0{32}10{31}'
check "features transport bound" '@@ features transport virtio-mmio.0 bound=yes'
check "features transport unbound" '@@ features transport virtio-mmio.1 bound=no'
check "features count" '@@ features count=2'
check uptime '@@ uptime 12.34'
check "balloon device" '@@ balloon device virtio0 driver=virtio_balloon status=0x0000000f negotiated=STATS_VQ,DEFLATE_ON_OOM,REPORTING,VERSION_1 features=0110010[01]*'
check "balloon vmstat" '@@ balloon vmstat balloon_inflate=256 balloon_deflate=128 balloon_migrate=3'
check "balloon meminfo" '@@ balloon meminfo MemTotal=243360 MemFree=221228 MemAvailable=215000'
check "balloon reporting order" '@@ balloon page_reporting_order=9'
check "balloon done" '@@ done balloon rc=0'
check "free header" '@@ free +total +used +free.*'
check "free mem" '@@ free Mem: +[0-9]+ .*'
check "free done" '@@ done free rc=0'
check "tmpfs-write seeded" '@@ tmpfs-write ok mib=3 seed=0x0000000000001234 sha256=4f711cd7770df07b1510c903f38a2f9b7c99db23f7988e8aa2b670b60dddb2ff ms=[0-9]+'
check "sha256 reads back" '@@ sha256 ok bytes=3145728 sha256=4f711cd7770df07b1510c903f38a2f9b7c99db23f7988e8aa2b670b60dddb2ff'
check "tmpfs-write random" '@@ tmpfs-write ok mib=1 seed=0x[0-9a-f]{16} sha256=[0-9a-f]{64} ms=[0-9]+'
check "alloc" '@@ alloc ok mib=8 pages=2048 touch_ms=[0-9]+ hold_ms=10'
check "alloc done" '@@ done alloc rc=0'
check "alloc 0 usage" '@@ alloc fail error=usage usage=alloc MIB \[HOLD_MS\]'
check "alloc 0 rc" '@@ done alloc rc=2'
check "bad name" '@@ tmpfs-write fail error=usage usage=tmpfs-write NAME MIB \[SEED\]'
check "tmpfs-rm ok" '@@ tmpfs-rm ok'
check "tmpfs-rm done" '@@ done tmpfs-rm rc=0'
check "tmpfs-rm again" '@@ tmpfs-rm fail error=ENOENT'
check "tmpfs-rm again rc" '@@ done tmpfs-rm rc=1'
check "sleep" '@@ sleep ok'
check "compact" '@@ compact ok'
check "echo" '@@ echo hello world'
check "sh out" '@@ sh one'
check "sh err" '@@ sh two'
check "sh rc" '@@ done sh rc=3'
check "unknown" '@@ frobnicate fail error=unknown-command'
check "unknown rc" '@@ done frobnicate rc=127'
check_not "comment ignored" '@@ begin #.*'
check "help" '@@ help .*tmpfs-write.*'
check "poweroff" '@@ poweroff ok method=reboot'
check "poweroff done" '@@ done poweroff rc=0'
check "reboot called" 'FAKE-REBOOT'
[ "$(tail -n 1 <<<"$out")" = "FAKE-REBOOT" ] && pass=$((pass + 1)) ||
  { fail=$((fail + 1)); echo "FAIL: commands ran after poweroff" >&2; }
[ "$(cat "$w/proc/sys/vm/compact_memory")" = 1 ] && pass=$((pass + 1)) ||
  { fail=$((fail + 1)); echo "FAIL: compact did not write 1" >&2; }
[ ! -e "$w/tmp/a" ] && [ -f "$w/tmp/b" ] && [ ! -e "$w/x" ] && [ ! -e "$w/tmp/.hidden" ] &&
  pass=$((pass + 1)) || { fail=$((fail + 1)); echo "FAIL: tmpfs files not as expected" >&2; }
# Every non-ignored console line got exactly one begin and one done.
nb="$(grep -c '^@@ begin ' <<<"$out")"
nd="$(grep -c '^@@ done ' <<<"$out")"
[ "$nb" = 21 ] && [ "$nd" = 21 ] && pass=$((pass + 1)) ||
  { fail=$((fail + 1)); echo "FAIL: begin/done count $nb/$nd, want 21/21" >&2; }
# Nothing but protocol lines on the console.
if grep -vqE '^(@@ .*|BLIMP-AGENT READY|FAKE-REBOOT)$' <<<"$out"; then
  fail=$((fail + 1)); echo "FAIL: non-protocol lines on the console:" >&2
  grep -vE '^(@@ .*|BLIMP-AGENT READY|FAKE-REBOOT)$' <<<"$out" >&2
else pass=$((pass + 1)); fi

# ---- 2: unquoted blimp.run, no balloon, stdin EOF ---------------------------------
rm -rf "$v/devices/virtio0" "$v/drivers/virtio_balloon/virtio0" "$w/proc/vmstat"
out="$(run_agent 'blimp.run=balloon;echo;uptime quiet' </dev/null || true)"
echo "$out" >"$w/out2.txt"
check "unquoted: balloon none" '@@ balloon device none'
check "unquoted: vmstat none" '@@ balloon vmstat none'
check "unquoted: balloon rc" '@@ done balloon rc=1'
check "unquoted: echo" '@@ echo'
check "unquoted: uptime" '@@ done uptime rc=0'
check_not "unquoted: stops at space" '@@ begin quiet'
check "stdin closed" '@@ agent stdin-closed'

# ---- 3: no blimp.run ---------------------------------------------------------------
out="$(run_agent 'console=ttyS0 blimp.runx=1 xblimp.run=meminfo' <<<'uptime' || true)"
check_not "no cmdline commands" '@@ begin meminfo'
check "console command" '@@ done uptime rc=0'

# ---- 4: a helper killed by a signal (the OOM killer) --------------------------------
printf '#!/bin/sh\necho "ok mib=$2 partial"\nkill -9 $$\n' >"$w/killed-helper"
chmod +x "$w/killed-helper"
echo "" >"$w/proc/cmdline"
out="$(PATH="$w/bin:/usr/bin:/bin" BLIMP_PROC="$w/proc" BLIMP_SYS="$w/sys" BLIMP_TMP="$w/tmp" \
  BLIMP_RUN="$w/run" BLIMP_HELPER="$w/killed-helper" \
  "$BUSYBOX" sh -c '. "$1"; agent_run_line "alloc 64"' agent "$here/agent.sh" || true)"
check "killed: output relayed" '@@ alloc ok mib=64 partial'
check "killed: signal" '@@ alloc fail error=killed signal=9'
check "killed: rc" '@@ done alloc rc=137'

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
