#!/usr/bin/env bash
# Builds Blimp's real Linux guest: a minimal Linux 6.12 `vmlinux` (ELF, loaded
# with the 64-bit boot protocol) and an uncompressed newc initramfs holding
# busybox-static, the guest agent (/init) and its helper. See docs/linux-guest.md.
#
# Usually run through `resources/build.sh linux`. Progress goes to stderr; the
# last two lines on stdout are the absolute paths of vmlinux and the initramfs.
#
# Inputs (all under resources/linux/): minimal-6.12.config, patches/*.patch,
# agent/*, this script; plus the installed versions of linux-source-6.12,
# busybox-static and gcc. Outputs are cached under
# ${BLIMP_CACHE:-~/.cache/blimp}:
#   linux-kernel-<khash>/   unpacked, patched and built kernel tree
#                           (khash: config, patches, kernel source version, KERNEL_RECIPE)
#   linux-<hash>/vmlinux    the outputs (hash: khash + everything the initramfs
#   linux-<hash>/initramfs.cpio         is made of, this script included)
# A re-run with unchanged inputs only hashes them and prints the two paths;
# a change to the agent alone rebuilds only the initramfs (seconds).
#
# Needs: Debian 12 (bookworm) with root for apt-get, or the packages below
# already installed. linux-source-6.12 comes from bookworm-security (or
# bookworm-backports, enabled here if the configured sources lack it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${BLIMP_CACHE:-$HOME/.cache/blimp}"
config="$here/minimal-6.12.config"
agent="$here/agent"
# Bump when the kernel build steps below change in a way that changes vmlinux.
KERNEL_RECIPE=1
# How many unpacked kernel trees (about 1.7 GiB each once built) and output
# directories (8 MiB each) to keep.
KEEP_TREES=3
KEEP_OUTPUTS=10

log() { echo "linux: $*" >&2; }
# Phase timer: `phase NAME` ends the running phase (recording its seconds)
# and starts NAME; `phase` alone ends it. The summary line names each phase
# this run went through, and the load average at the start and the end.
phases=()
cur_phase=""
phase_start=$SECONDS
phase() {
  if [ -n "$cur_phase" ]; then phases+=("$cur_phase $((SECONDS - phase_start)) s"); fi
  cur_phase="${1:-}"
  phase_start=$SECONDS
}
load_avg() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?"; }
load_at_start="$(load_avg)"
phase_summary() {
  phase
  local list
  list="$(printf '%s, ' "${phases[@]}")"
  log "phases: ${list%, }; total $((SECONDS - t0)) s on $(nproc) CPUs (load average $load_at_start at the start, $(load_avg) at the end)"
}
die() { echo "linux: error: $*" >&2; exit 1; }

# --- dependencies ------------------------------------------------------------
pkgs=(linux-source-6.12 busybox-static build-essential bc bison flex libelf-dev
      libssl-dev cpio xz-utils python3)
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $*"; fi
}
installed() { # prints the given packages that are not installed
  local st
  st="$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "$@" 2>/dev/null || true)"
  local p
  for p in "$@"; do grep -q "^ii  *$p\$" <<<"$st" || echo "$p"; done
}
mapfile -t missing < <(installed "${pkgs[@]}")
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq >&2
  if ! apt-cache policy linux-source-6.12 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; then
    # (grep without -q reads all of apt-cache's output: with pipefail, an early
    # exit would SIGPIPE apt-cache and fail the test though a candidate exists.)
    # Not in the configured suites (it is in bookworm-security): Debian's own
    # bookworm-backports has it too.
    log "enabling bookworm-backports for linux-source-6.12"
    echo "deb http://deb.debian.org/debian bookworm-backports main" |
      as_root tee /etc/apt/sources.list.d/blimp-bookworm-backports.list >/dev/null
    as_root apt-get update -qq >&2
    apt-cache policy linux-source-6.12 | grep 'Candidate: [0-9]' >/dev/null ||
      die "no installable linux-source-6.12 (checked the configured suites and bookworm-backports)"
  fi
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  mapfile -t missing < <(installed "${pkgs[@]}")
  [ "${#missing[@]}" -eq 0 ] || die "could not install: ${missing[*]}"
fi
[ -f /usr/src/linux-source-6.12.tar.xz ] || die "/usr/src/linux-source-6.12.tar.xz missing (reinstall linux-source-6.12)"

# --- hashes ------------------------------------------------------------------
pkgver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }
ksrc_ver="$(pkgver linux-source-6.12)"
bb_ver="$(pkgver busybox-static)"
gcc_ver="$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)"
patches=()
for p in "$here"/patches/*.patch; do [ -e "$p" ] && patches+=("$p"); done
agent_files=("$agent"/init "$agent"/agent.sh "$agent"/fstab "$agent"/helper.c)
for f in "$config" "${agent_files[@]}"; do [ -f "$f" ] || die "missing input $f"; done

hash_inputs() { # label=value pairs and files -> short sha256
  local a
  for a in "$@"; do
    if [ -f "$a" ]; then printf 'file %s\n' "${a#"$here"/}"; sha256sum <"$a"
    else printf 'arg %s\n' "$a"; fi
  done | sha256sum | cut -c1-16
}
khash="$(hash_inputs "recipe=$KERNEL_RECIPE" "linux-source-6.12=$ksrc_ver" "gcc=$gcc_ver" \
  "$config" "${patches[@]}")"
hash="$(hash_inputs "kernel=$khash" "busybox-static=$bb_ver" "gcc=$gcc_ver" \
  "${agent_files[@]}" "$here/build.sh")"

ktree="$cache/linux-kernel-$khash"
out="$cache/linux-$hash"
if [ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio" ]; then
  log "up to date ($out)"
  echo "$out/vmlinux"
  echo "$out/initramfs.cpio"
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/linux.lock"
if ! flock -n 9; then
  log "waiting for another linux build (lock $cache/linux.lock)"
  flock 9
fi
t0=$SECONDS

# --- kernel --------------------------------------------------------------------
# Options Blimp relies on: "y" must be set, "n" must be unset.
required_y=(
  CONFIG_64BIT CONFIG_X86_64 CONFIG_KVM_GUEST CONFIG_PARAVIRT
  CONFIG_BLK_DEV_INITRD CONFIG_BINFMT_ELF CONFIG_BINFMT_SCRIPT CONFIG_PRINTK
  CONFIG_TTY CONFIG_SERIAL_8250 CONFIG_SERIAL_8250_CONSOLE
  CONFIG_DEVTMPFS CONFIG_PROC_FS CONFIG_PROC_SYSCTL CONFIG_SYSFS CONFIG_TMPFS CONFIG_SHMEM
  CONFIG_VIRTIO CONFIG_VIRTIO_MMIO CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES
  CONFIG_VIRTIO_BALLOON CONFIG_MEMORY_BALLOON CONFIG_BALLOON_COMPACTION
  CONFIG_COMPACTION CONFIG_MIGRATION CONFIG_PAGE_REPORTING
  CONFIG_PAGE_POISONING CONFIG_VM_EVENT_COUNTERS
)
required_n=(CONFIG_MODULES CONFIG_RELOCATABLE CONFIG_BLOCK CONFIG_NET CONFIG_PCI)
max_cpus=2

check_config() { # $1: .config
  local c bad=() n
  for c in "${required_y[@]}"; do grep -qx "$c=y" "$1" || bad+=("$c (want y)"); done
  for c in "${required_n[@]}"; do grep -qx "# $c is not set" "$1" || bad+=("$c (want unset)"); done
  n="$(sed -n 's/^CONFIG_NR_CPUS=//p' "$1")"
  [ -n "$n" ] && [ "$n" -le "$max_cpus" ] || bad+=("CONFIG_NR_CPUS=${n:-?} (want <= $max_cpus)")
  if [ "${#bad[@]}" -gt 0 ]; then
    printf 'linux: error: kernel config %s lacks required options:\n' "$1" >&2
    printf 'linux:   %s\n' "${bad[@]}" >&2
    return 1
  fi
}

if [ ! -f "$ktree/.blimp-built" ]; then
  if [ ! -f "$ktree/.blimp-unpacked" ]; then
    rm -rf "$ktree"
    mkdir -p "$ktree"
    phase unpack
    log "unpacking linux-source-6.12 $ksrc_ver into $ktree"
    tar -xJf /usr/src/linux-source-6.12.tar.xz -C "$ktree" --strip-components=1
    phase patch
    for p in "${patches[@]}"; do
      log "applying $(basename "$p")"
      patch -d "$ktree" -p1 --forward --batch --quiet <"$p" >&2 || die "patch $p does not apply"
    done
    touch "$ktree/.blimp-unpacked"
  fi
  export KBUILD_BUILD_TIMESTAMP="2026-01-01" KBUILD_BUILD_USER=blimp KBUILD_BUILD_HOST=blimp
  phase configure
  log "configuring (tinyconfig + $(basename "$config"))"
  make -C "$ktree" -s tinyconfig >&2
  "$ktree/scripts/kconfig/merge_config.sh" -m -O "$ktree" "$ktree/.config" "$config" \
    >"$ktree/.blimp-merge.log" 2>&1 || { tail -20 "$ktree/.blimp-merge.log" >&2; die "merge_config failed"; }
  make -C "$ktree" -s olddefconfig >&2
  check_config "$ktree/.config" || die "fix $config"
  # Everything the fragment sets should survive; report what Kconfig overrode.
  python3 - "$config" "$ktree/.config" >&2 <<'EOF'
import re, sys
def opts(path):
    d = {}
    for line in open(path):
        m = re.match(r'^(CONFIG_\w+)=(.*)$', line) or re.match(r'^# (CONFIG_\w+) is not set$', line)
        if m:
            d[m.group(1)] = m.group(2) if m.lastindex == 2 else 'n'
    return d
want, got = opts(sys.argv[1]), opts(sys.argv[2])
# toolchain-probe symbols differ between build hosts and do not matter
probe = re.compile(r'CONFIG_(CC|AS|LD|RUSTC|PAHOLE|CLANG|LLD|GCC)_|CONFIG_TOOLS_|CONFIG_.*_VERSION')
diff = [(k, v, got.get(k, 'n')) for k, v in want.items()
        if got.get(k, 'n') != v and not probe.match(k)]
for k, v, g in diff:
    print(f'linux: note: {k}: config asks {v}, Kconfig gave {g}')
EOF
  # Only the vmlinux target: no modules (CONFIG_MODULES is off), no
  # bzImage (Blimp loads the ELF), no headers or tools beyond what it needs.
  # One job per CPU this process may use.
  nproc="$(nproc)"
  phase compile
  log "building vmlinux with -j$nproc (log: $ktree/.blimp-make.log); takes minutes"
  tk=$SECONDS
  if ! make -C "$ktree" -j"$nproc" vmlinux >"$ktree/.blimp-make.log" 2>&1; then
    tail -40 "$ktree/.blimp-make.log" >&2
    die "kernel build failed (full log: $ktree/.blimp-make.log)"
  fi
  log "vmlinux built in $((SECONDS - tk)) s"
  # The PVM workaround must be in: without it init dies at its first syscall here.
  grep -aq 'pvm-sc: nr=' "$ktree/vmlinux" || die "vmlinux lacks the pvm-user-syscall patch"
  touch "$ktree/.blimp-built"
  # Prune the least recently built trees.
  ls -1dt "$cache"/linux-kernel-*/ 2>/dev/null | tail -n +$((KEEP_TREES + 1)) | while read -r old; do
    log "pruning old kernel tree $old"
    rm -rf "$old"
  done
else
  log "kernel tree up to date ($ktree)"
fi
check_config "$ktree/.config" || die "kernel tree $ktree has a bad .config; delete it"

# --- initramfs ---------------------------------------------------------------
work="$(mktemp -d "$cache/.linux-work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
phase initramfs
log "building initramfs"
gcc -O2 -Wall -Werror -o "$work/gen_init_cpio" "$ktree/usr/gen_init_cpio.c"
# The agent's helper: static, no dynamic loader in the initramfs.
gcc -static -O2 -Wall -Wextra -Werror -s -o "$work/blimp-helper" "$agent/helper.c"

# busybox applets the agent and a person at the console use; with busybox's
# standalone shell they run without these links too, once /proc is mounted.
applets=(sh mount umount mkdir stty cat ls rm sleep free grep sha256sum dmesg uname ps
         reboot poweroff halt head tail dd sync)
{
  echo "dir /dev 0755 0 0"
  echo "nod /dev/console 0600 0 0 c 5 1"
  echo "nod /dev/null 0666 0 0 c 1 3"
  for d in /proc /sys /tmp /run /bin /etc /usr /usr/lib /usr/lib/blimp; do
    if [ "$d" = /tmp ]; then echo "dir $d 1777 0 0"; else echo "dir $d 0755 0 0"; fi
  done
  echo "file /bin/busybox /bin/busybox 0755 0 0"
  for a in "${applets[@]}"; do echo "slink /bin/$a busybox 0777 0 0"; done
  echo "file /bin/blimp-helper $work/blimp-helper 0755 0 0"
  echo "file /usr/lib/blimp/agent.sh $agent/agent.sh 0644 0 0"
  echo "file /etc/fstab $agent/fstab 0644 0 0"
  echo "file /init $agent/init 0755 0 0"
} >"$work/initramfs.list"
# -t: fixed mtime, so the same inputs give the same bytes
"$work/gen_init_cpio" -t 1767225600 "$work/initramfs.list" >"$work/initramfs.cpio"

mkdir -p "$work/out"
cp "$ktree/vmlinux" "$work/out/vmlinux"
mv "$work/initramfs.cpio" "$work/out/initramfs.cpio"
cp "$ktree/.config" "$work/out/config"
printf 'linux-source-6.12 %s\nbusybox-static %s\ngcc %s\nkernel tree %s\n' \
  "$ksrc_ver" "$bb_ver" "$gcc_ver" "$ktree" >"$work/out/versions"
rm -rf "$out"
mv "$work/out" "$out"
# Prune the least recently built outputs (linux-<16 hex digits>).
ls -1dt "$cache"/linux-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]/ 2>/dev/null |
  tail -n +$((KEEP_OUTPUTS + 1)) | while read -r old; do rm -rf "$old"; done
log "done in $((SECONDS - t0)) s: vmlinux $(du -h "$out/vmlinux" | cut -f1), initramfs $(du -h "$out/initramfs.cpio" | cut -f1)"
phase_summary
echo "$out/vmlinux"
echo "$out/initramfs.cpio"
