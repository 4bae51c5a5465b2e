//! Queue plumbing every balloon queue handler shares: take the next chain
//! off a queue, copy its descriptors out (detecting a corrupt ring), and
//! the drain loop that serves each chain and returns it to the guest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::metrics::BalloonMetrics;
use crate::GuestMemory;

/// Most descriptors of one chain the device looks at (Linux uses one for
/// inflate/deflate/stats/hints and up to 32 for a free page report).
pub const MAX_CHAIN_DESCS: usize = 32;

/// A chain's descriptors, copied out of guest memory.
#[derive(Clone, Copy)]
pub(super) struct Descs {
    pub(super) d: [Descriptor; MAX_CHAIN_DESCS],
    pub(super) n: usize,
    /// The chain had more than MAX_CHAIN_DESCS descriptors.
    pub(super) too_many: bool,
}

impl Descs {
    pub(super) fn iter(&self) -> impl Iterator<Item = &Descriptor> {
        self.d[..self.n].iter()
    }
}

/// Why a chain cannot be walked: the queue itself is corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Malformed {
    /// No descriptor could be read at all (bad head index, ...).
    Empty,
    /// The chain ended on a descriptor that still had NEXT set: a loop, a
    /// chain longer than the queue, or a next index out of range.
    Truncated { descriptors: usize },
    /// Descriptor `index` of the ring's table refers to an indirect table,
    /// which the device never offers (VIRTIO_RING_F_INDIRECT_DESC): the
    /// spec forbids the flag without the feature.
    Indirect { index: u16 },
}

/// Copy a chain's descriptors out, detecting structural corruption.
/// Take the next available chain off `q` and collect its descriptors:
/// `Ok(None)` when the ring is empty, `Err(reason)` when the ring or the
/// chain is malformed (the caller marks the device as needing a reset).
pub(super) fn next_chain(q: &mut Queue, mem: &GuestMemory) -> Result<Option<(u16, Descs)>, String> {
    let chain = match q.iter(mem) {
        Ok(mut it) => it.next(),
        Err(e) => return Err(format!("bad available ring: {e}")),
    };
    let Some(chain) = chain else {
        return Ok(None);
    };
    let head = chain.head_index();
    if let Some(index) = indirect_in_chain(q, mem, head) {
        let m = Malformed::Indirect { index };
        return Err(format!("malformed chain at head {head}: {m:?}"));
    }
    collect_chain(chain)
        .map(|d| Some((head, d)))
        .map_err(|m| format!("malformed chain at head {head}: {m:?}"))
}

/// The index of the first descriptor of the chain at `head` (in the ring's
/// own table) with VIRTQ_DESC_F_INDIRECT set, if any. virtio-queue's chain
/// iterator follows indirect tables whatever was negotiated, and the
/// balloon never offers VIRTIO_RING_F_INDIRECT_DESC, so the table is read
/// here first: at most `q.size()` descriptors of 16 bytes, each read
/// bounds-checked. A descriptor that cannot be read, or a next index out of
/// range, ends the walk: [`collect_chain`] reports those. (The guest can
/// rewrite the table between this walk and the iterator's; it then gets
/// no more than a followed indirect table, whose walk virtio-queue bounds.)
fn indirect_in_chain(q: &Queue, mem: &GuestMemory, head: u16) -> Option<u16> {
    let table = q.desc_table();
    let mut index = head;
    for _ in 0..q.size() {
        let at = table.checked_add(16 * u64::from(index))?;
        let flags: u16 = mem.read_obj(GuestAddress(at.checked_add(12)?)).ok()?;
        if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
            return Some(index);
        }
        if flags & VRING_DESC_F_NEXT as u16 == 0 {
            return None;
        }
        index = mem.read_obj(GuestAddress(at.checked_add(14)?)).ok()?;
        if index >= q.size() {
            return None;
        }
    }
    None
}

pub(super) fn collect_chain(chain: DescriptorChain<&GuestMemory>) -> Result<Descs, Malformed> {
    let mut out = Descs {
        d: [Descriptor::default(); MAX_CHAIN_DESCS],
        n: 0,
        too_many: false,
    };
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        last_has_next = desc.has_next();
        if out.n < MAX_CHAIN_DESCS {
            out.d[out.n] = desc;
            out.n += 1;
        } else {
            out.too_many = true;
        }
    }
    match count {
        0 => Err(Malformed::Empty),
        _ if last_has_next => Err(Malformed::Truncated { descriptors: count }),
        _ => Ok(out),
    }
}

/// Outcome of draining one queue.
#[derive(Default)]
pub(super) struct Drain {
    pub(super) used: bool,
    pub(super) broken: Option<String>,
    /// The drain stopped at [`MAX_CHAINS_PER_DRAIN`] with chains possibly
    /// left: the caller must come back to the queue (notifications may
    /// still be off).
    pub(super) more: bool,
}

/// Most chains one drain serves before it gives the event loop back. A
/// driver that hands each buffer back as soon as it is used (or a hostile
/// one re-adding the same head forever) would otherwise keep the drain,
/// and the event loop with the API and signals behind it, to itself; and
/// what an inflate drain leaves to discard grows with every chain (a 64 KiB
/// PFN array of pages no two adjacent is 16384 ranges, 256 KiB: at most
/// 16 MiB here; [`MAX_DISCARDS_PER_TURN`] bounds the time they take).
/// Linux keeps one inflate or deflate buffer in flight, and a drain of
/// free page hints or reports seldom finds more than this.
pub(super) const MAX_CHAINS_PER_DRAIN: usize = 64;

/// Most discard calls the inflate queue leaves for one turn of the event
/// loop before it gives the loop back (it finishes the chain it is on, so
/// one 64 KiB PFN array of scattered pages, 16384 calls, still goes whole).
/// Each is a syscall of about a microsecond or more: 64 such arrays in one
/// drain held the API and signals for seconds, at no cost to the guest.
/// Linux's 256-PFN buffers of mostly adjacent pages come nowhere near it.
pub(crate) const MAX_DISCARDS_PER_TURN: usize = 4096;

/// How a drain treats guest notifications (see [`drain_chains`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Notify {
    /// Leave them on: the driver may kick for every buffer.
    Always,
    /// Off (VRING_USED_F_NO_NOTIFY) while the drain runs; before it ends
    /// they are turned on again and the ring checked once more, so no
    /// buffer added meanwhile is missed.
    WhileBusy,
    /// As `WhileBusy`, and when the ring runs dry keep polling it, still
    /// without notifications, for up to this long before turning them on:
    /// a driver that streams buffers (free page hinting) is served without
    /// a kick per buffer. Polling stops once the drain has run for
    /// [`MAX_POLLED_DRAIN`], so a driver that trickles buffers cannot keep
    /// the event loop (and the API behind it) to itself.
    Poll(Duration),
}

/// Longest a drain keeps polling for more buffers (see [`Notify::Poll`]).
pub(super) const MAX_POLLED_DRAIN: Duration = Duration::from_millis(10);

/// How often [`poll_avail`] looks at the ring. It sleeps in between rather
/// than spin: on a host with fewer cores than busy threads a spinning
/// event loop takes the CPU the guest needs to add the next buffer.
const POLL_STEP: Duration = Duration::from_micros(20);

/// Wait up to `window` for the driver to add a buffer to `q`; true if it
/// did. Reads only the available index (guest memory, bounds-checked).
fn poll_avail(q: &Queue, mem: &GuestMemory, window: Duration) -> bool {
    let until = Instant::now() + window;
    loop {
        match q.avail_idx(mem, Ordering::Acquire) {
            Ok(i) if i.0 != q.next_avail() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(POLL_STEP);
    }
}

/// Serve every chain pending on `q`, up to [`MAX_CHAINS_PER_DRAIN`] or
/// until `full()` says the work this drain left is enough for one turn of
/// the event loop ([`Drain::more`] then says so): `serve(head, descs)` handles one and
/// says which buffer to hand back now (its own head, an older one it held,
/// or none when it keeps the buffer). Stops at a corrupt ring or a failed
/// hand-back, reported in [`Drain::broken`]. With `timer`, the time from
/// popping each chain to handing it back is added to that counter (ns).
/// `notify` says whether the driver's notifications are suppressed
/// meanwhile; every drain ends with them on, but one stopped at the
/// budget, whose caller comes back to the queue.
pub(super) fn drain_chains(
    q: &mut Queue,
    mem: &GuestMemory,
    timer: Option<&AtomicU64>,
    notify: Notify,
    full: Option<&dyn Fn() -> bool>,
    mut serve: impl FnMut(u16, Descs) -> Option<u16>,
) -> Drain {
    let mut drain = Drain::default();
    let began = Instant::now();
    let suppress = notify != Notify::Always;
    if suppress && let Err(e) = q.disable_notification(mem) {
        drain.broken = Some(format!("suppressing notifications: {e}"));
        return drain;
    }
    let mut chains = 0usize;
    loop {
        if chains == MAX_CHAINS_PER_DRAIN || full.is_some_and(|full| full()) {
            drain.more = true;
            break;
        }
        let started = timer.map(|_| Instant::now());
        let (head, descs) = match next_chain(q, mem) {
            Ok(Some(c)) => c,
            Ok(None) if !suppress => break,
            Ok(None) => {
                if let Notify::Poll(window) = notify
                    && began.elapsed() < MAX_POLLED_DRAIN
                    && poll_avail(q, mem, window)
                {
                    continue;
                }
                // Notifications back on; a buffer added before they were
                // is served now (and they go off again meanwhile).
                match q.enable_notification(mem) {
                    Ok(false) => break,
                    Ok(true) => match q.disable_notification(mem) {
                        Ok(()) => continue,
                        Err(e) => {
                            drain.broken = Some(format!("suppressing notifications: {e}"));
                            break;
                        }
                    },
                    Err(e) => {
                        drain.broken = Some(format!("enabling notifications: {e}"));
                        break;
                    }
                }
            }
            Err(why) => {
                drain.broken = Some(why);
                break;
            }
        };
        chains += 1;
        let Some(done) = serve(head, descs) else {
            continue;
        };
        if let Err(e) = q.add_used(mem, done, 0) {
            drain.broken = Some(format!("returning buffer {done}: {e}"));
            break;
        }
        if let (Some(counter), Some(t)) = (timer, started) {
            BalloonMetrics::add(counter, t.elapsed().as_nanos() as u64);
        }
        drain.used = true;
    }
    drain
}
