# Blimp guest agent: command dispatcher. Sourced by /init (busybox ash) from
# /usr/lib/blimp/agent.sh; also sourced by agent/test.sh on the build host.
# The protocol is documented in docs/linux-guest.md.
#
# Cost model on the PVM hosts Blimp's CI runs on: a fork+exec costs ~0.5 s
# and a syscall ~0.5 ms (the guest kernel is emulated), ring-3 code is native.
# So: shell builtins (read, printf, case, test, globs, redirections) wherever
# possible, at most one external process per command, none for the
# read-only commands.
#
# Paths can be redirected for testing on the host:
#   BLIMP_PROC (/proc) BLIMP_SYS (/sys) BLIMP_TMP (/tmp: tmpfs-* files)
#   BLIMP_RUN (/run: the agent's scratch file) BLIMP_HELPER (/bin/blimp-helper)

AGENT_VERSION=1
P=${BLIMP_PROC:-/proc}
S=${BLIMP_SYS:-/sys}
T=${BLIMP_TMP:-/tmp}
H=${BLIMP_HELPER:-/bin/blimp-helper}
O=${BLIMP_RUN:-/run}/blimp-agent.out

say() { printf '@@ %s\n' "$*"; }

# Print each line of the scratch file, prefixed with "@@ $1 ".
relay() {
  local l
  while IFS= read -r l || [ -n "$l" ]; do printf '@@ %s %s\n' "$1" "$l"; done <"$O"
}

# Run an external command ($2...) for agent command $1 with its output relayed.
run_relay() {
  local c=$1 rc
  shift
  "$@" >"$O" 2>&1
  rc=$?
  relay "$c"
  if [ $rc -gt 128 ]; then say "$c fail error=killed signal=$((rc - 128))"; fi
  return $rc
}

is_uint() { case $1 in '' | *[!0-9]*) return 1 ;; esac; }
# A seed for blimp-helper fill: decimal or 0x hex
is_seed() { case $1 in 0x?* | 0X?*) case ${1#0[xX]} in *[!0-9a-fA-F]*) return 1 ;; esac ;; *) is_uint "$1" ;; esac; }
# A file name under /tmp: no slash, no leading dot (those are the agent's)
is_name() { case $1 in '' | .* | *[!A-Za-z0-9._-]*) return 1 ;; esac; }

usage() { say "$1 fail error=usage usage=$2"; return 2; }
ret() { return "$1"; }

# Sets mem to "MemTotal=N MemFree=N MemAvailable=N" (KiB) from a meminfo file
# ($1). Those are its first three lines; the shell's read builtin costs a
# syscall per byte, so stop there. (Helpers set variables: a $(...) would fork.)
meminfo_fields() {
  local k v u MemTotal='?' MemFree='?' MemAvailable='?'
  while read -r k v u; do
    case $k in
      MemTotal:) MemTotal=$v ;;
      MemFree:) MemFree=$v ;;
      MemAvailable:) MemAvailable=$v; break ;;
    esac
  done <"$1"
  mem="MemTotal=$MemTotal MemFree=$MemFree MemAvailable=$MemAvailable"
}

# Sets names to the virtio-balloon feature bits set in a sysfs features
# string ($1: one '0'/'1' char per bit, bit 0 first), comma-separated.
balloon_feature_names() {
  local f=$1 out='' i name
  for i in 0 1 2 3 4 5 28 29 32 33; do
    [ "${f:$i:1}" = 1 ] || continue
    case $i in
      0) name=MUST_TELL_HOST ;; 1) name=STATS_VQ ;; 2) name=DEFLATE_ON_OOM ;;
      3) name=FREE_PAGE_HINT ;; 4) name=PAGE_POISON ;; 5) name=REPORTING ;;
      28) name=RING_INDIRECT_DESC ;; 29) name=RING_EVENT_IDX ;;
      32) name=VERSION_1 ;; 33) name=ACCESS_PLATFORM ;;
    esac
    out="$out,$name"
  done
  out=${out#,}
  names=${out:-none}
}

# Sets dev_* for the virtio device directory $1.
virtio_dev() {
  local d=$1 x
  dev_name=${d##*/}
  dev_id='?' dev_vendor='?' dev_status='?' dev_features='?' dev_driver=none
  [ -r "$d/device" ] && read -r dev_id <"$d/device"
  [ -r "$d/vendor" ] && read -r dev_vendor <"$d/vendor"
  [ -r "$d/status" ] && read -r dev_status <"$d/status"
  [ -r "$d/features" ] && read -r dev_features <"$d/features"
  for x in "$S"/bus/virtio/drivers/*/"$dev_name"; do
    [ -e "$x" ] || continue
    x=${x%/*}
    dev_driver=${x##*/}
  done
}

# ---- commands: each prints "@@ <cmd> ..." lines and returns its rc ----------

cmd_meminfo() {
  meminfo_fields "$P/meminfo"
  say "meminfo $mem"
}

cmd_features() {
  local d n=0 x
  for d in "$S"/bus/virtio/devices/*; do
    [ -d "$d" ] || continue
    virtio_dev "$d"
    say "features $dev_name device=$dev_id vendor=$dev_vendor status=$dev_status driver=$dev_driver features=$dev_features"
    n=$((n + 1))
  done
  # The virtio-mmio transports from virtio_mmio.device=: one that failed to
  # probe (e.g. "Wrong magic value") has no virtio device above.
  for d in "$S"/bus/platform/devices/virtio-mmio*; do
    [ -e "$d" ] || continue
    x=no
    [ -e "$d/driver" ] && x=yes
    say "features transport ${d##*/} bound=$x"
  done
  say "features count=$n"
}

cmd_free() { run_relay free free -m; }

cmd_balloon() {
  local d found=0 k v acc='' order='?'
  for d in "$S"/bus/virtio/devices/*; do
    [ -d "$d" ] || continue
    virtio_dev "$d"
    [ "$dev_id" = 0x0005 ] || continue
    found=$((found + 1))
    balloon_feature_names "$dev_features"
    say "balloon device $dev_name driver=$dev_driver status=$dev_status negotiated=$names features=$dev_features"
  done
  [ $found -gt 0 ] || say "balloon device none"
  # /proc/vmstat is ~4 KB with balloon_* near its end: one grep (~0.5 s on
  # PVM) beats the read builtin's syscall per byte (~2 s).
  if [ -r "$P/vmstat" ]; then
    grep '^balloon_' "$P/vmstat" >"$O" 2>/dev/null
    while read -r k v; do acc="$acc $k=$v"; done <"$O"
  fi
  say "balloon vmstat${acc:- none}"
  meminfo_fields "$P/meminfo"
  say "balloon meminfo $mem"
  [ -r "$S/module/page_reporting/parameters/page_reporting_order" ] &&
    read -r order <"$S/module/page_reporting/parameters/page_reporting_order"
  say "balloon page_reporting_order=$order"
  [ $found -gt 0 ]
}

cmd_alloc() {
  is_uint "$1" && [ "$1" -gt 0 ] && { [ $# -lt 2 ] || is_uint "$2"; } ||
    { usage alloc "alloc MIB [HOLD_MS]"; return; }
  run_relay alloc "$H" alloc "$@"
}

cmd_tmpfs_write() {
  is_name "$1" && is_uint "$2" && { [ $# -lt 3 ] || is_seed "$3"; } ||
    { usage tmpfs-write "tmpfs-write NAME MIB [SEED]"; return; }
  run_relay tmpfs-write "$H" fill "$T/$1" "$2" ${3:+"$3"}
}

cmd_tmpfs_rm() {
  is_name "$1" || { usage tmpfs-rm "tmpfs-rm NAME"; return; }
  if [ ! -e "$T/$1" ]; then say "tmpfs-rm fail error=ENOENT"; return 1; fi
  run_relay tmpfs-rm rm -f -- "$T/$1" || return
  say "tmpfs-rm ok"
}

cmd_sha256() {
  is_name "$1" || { usage sha256 "sha256 NAME"; return; }
  run_relay sha256 "$H" sha256 "$T/$1"
}

cmd_sleep() {
  case $1 in '' | *[!0-9.]* | *.*.*) usage sleep "sleep SECONDS"; return ;; esac
  run_relay sleep sleep "$1" || return
  say "sleep ok"
}

cmd_uptime() {
  local up idle
  read -r up idle <"$P/uptime"
  say "uptime $up"
}

cmd_compact() {
  if ! [ -w "$P/sys/vm/compact_memory" ]; then say "compact fail error=ENOENT"; return 1; fi
  echo 1 >"$P/sys/vm/compact_memory" || { say "compact fail error=write"; return 1; }
  say "compact ok"
}

cmd_echo() { say "echo${*:+ $*}"; }

cmd_sh() {
  local rc
  [ $# -gt 0 ] || { usage sh "sh COMMAND..."; return; }
  # in a subshell (a fork, no exec), so it cannot end or change the agent
  (eval "$*") >"$O" 2>&1
  rc=$?
  relay sh
  return $rc
}

cmd_help() {
  say "help meminfo features free balloon alloc tmpfs-write tmpfs-rm sha256 sleep uptime compact echo sh help poweroff reboot"
}

# Ending the VM. Overridden by agent/test.sh.
agent_reboot() { reboot -f; }

# There is no ACPI, so a real power-off would only halt the CPU, which the VMM
# cannot see; both end the VM through a reboot (reboot=k: 0xfe to port 0x64).
cmd_reboot() {
  local rc
  say "$1 ok method=reboot"
  say "done $1 rc=0"
  agent_reboot
  rc=$?
  # reached only if the reboot failed
  say "agent reboot-failed rc=$rc"
  return $rc
}

# ---- dispatcher ---------------------------------------------------------------

# Runs one command line: "name arg...". Prints "@@ begin <line>", the command's
# lines and "@@ done <name> rc=N". Empty lines and lines starting with # are ignored.
agent_run_line() {
  local line=$1 cmd rc
  set -f
  # shellcheck disable=SC2086 # split into words on purpose
  set -- $line
  set +f
  [ $# -gt 0 ] || return 0
  cmd=$1
  case $cmd in \#*) return 0 ;; esac
  shift
  say "begin $cmd${*:+ $*}"
  case $cmd in
    meminfo) cmd_meminfo "$@" ;;
    features) cmd_features "$@" ;;
    free) cmd_free "$@" ;;
    balloon) cmd_balloon "$@" ;;
    alloc) cmd_alloc "$@" ;;
    tmpfs-write) cmd_tmpfs_write "$@" ;;
    tmpfs-rm) cmd_tmpfs_rm "$@" ;;
    sha256) cmd_sha256 "$@" ;;
    sleep) cmd_sleep "$@" ;;
    uptime) cmd_uptime "$@" ;;
    compact) cmd_compact "$@" ;;
    echo) cmd_echo "$@" ;;
    sh) cmd_sh "$@" ;;
    help) cmd_help "$@" ;;
    poweroff | reboot) cmd_reboot "$cmd"; return ;;
    *) say "$cmd fail error=unknown-command"; ret 127 ;;
  esac
  rc=$?
  say "done $cmd rc=$rc"
  return $rc
}

# Runs the ';'-separated commands of blimp.run= in a kernel command line ($1):
# blimp.run="cmd arg;cmd" (quoted: spaces allowed) or blimp.run=cmd (unquoted).
agent_run_cmdline() {
  local cl=" $1" run c
  case $cl in *" blimp.run="*) ;; *) return 0 ;; esac
  run=${cl#*" blimp.run="}
  case $run in
    \"*) run=${run#\"}; run=${run%%\"*} ;;
    *) run=${run%%[ 	]*} ;;
  esac
  while [ -n "$run" ]; do
    c=${run%%;*}
    if [ "$c" = "$run" ]; then run=; else run=${run#*;}; fi
    agent_run_line "$c"
  done
}

# Reads commands from stdin (the serial console), one per line, forever.
agent_serve() {
  local line
  while :; do
    if IFS= read -r line; then
      agent_run_line "$line"
    else
      # No console input (EOF or error): PID 1 must not exit.
      say "agent stdin-closed"
      return 1
    fi
  done
}

agent_main() {
  local cl up idle
  cl=
  [ -r "$P/cmdline" ] && read -r cl <"$P/cmdline"
  up='?'
  [ -r "$P/uptime" ] && read -r up idle <"$P/uptime"
  say "agent version=$AGENT_VERSION uptime=$up"
  echo "BLIMP-AGENT READY"
  agent_run_cmdline "$cl"
  agent_serve
}
