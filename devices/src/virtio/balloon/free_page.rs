//! The free page queue (VIRTIO_BALLOON_F_FREE_PAGE_HINT), device side:
//! the host's calls that drive a hinting round and the queue handler that
//! feeds the round's state machine ([`HintState`](super::hinting::HintState))
//! and hands each hinted range to the [`HintSink`] (or discards it).

use std::sync::Arc;

use log::{debug, info};
use vm_memory::Bytes;

use super::device::{Balloon, drain_active};
use super::discard::discard_free_range;
use super::hinting::{GuestCmd, HintSink, HintState, HintingState, HintingStatus};
use super::metrics::BalloonMetrics;
use super::queue::Drain;
use super::*;
use crate::{GpaRange, warn_limited};

impl Balloon {
    fn hinting_usable(&self) -> Result<(), Error> {
        if !self.cfg.free_page_hint {
            return Err(Error::HintingDisabled);
        }
        if self.active.is_none() || !self.has_acked(VIRTIO_BALLOON_F_FREE_PAGE_HINT) {
            return Err(Error::HintingNotNegotiated(self.acked_features));
        }
        Ok(())
    }

    fn publish_hint_cmd(&mut self) {
        self.config.free_page_hint_cmd_id = self.hint.host_cmd_id();
        self.config_generation = self.config_generation.wrapping_add(1);
        self.signal_config();
    }

    /// Start a free page hinting round: writes a new command id (>= 2)
    /// into the config space and raises a config interrupt. Returns the id.
    pub fn start_hinting(&mut self) -> Result<u32, Error> {
        self.start_hinting_with(false)
    }

    /// [`start_hinting`](Self::start_hinting); with `ack_on_stop` the
    /// device answers the guest's STOP of this round with DONE by itself
    /// (Firecracker's `acknowledge_on_stop`), so the guest gets its hinted
    /// pages back without a [`hinting_done`](Self::hinting_done) call.
    pub fn start_hinting_with(&mut self, ack_on_stop: bool) -> Result<u32, Error> {
        let id = self.host_hint_command(|hint| {
            let id = hint.start();
            info!("balloon: free page hinting round {id} started");
            id
        })?;
        self.hint_ack_on_stop = ack_on_stop;
        BalloonMetrics::inc(&self.metrics.hint_rounds);
        Ok(id)
    }

    /// Ask the guest to stop hinting (STOP). Hinted pages stay with the
    /// host's sink until [`hinting_done`](Self::hinting_done).
    pub fn stop_hinting(&mut self) -> Result<(), Error> {
        self.host_hint_command(|hint| {
            hint.stop();
            info!("balloon: free page hinting stopped by the host");
        })
    }

    /// Tell the guest the host is done with the hints (DONE): it frees the
    /// hinted pages for reuse.
    pub fn hinting_done(&mut self) -> Result<(), Error> {
        self.host_hint_command(|hint| {
            hint.done();
            info!("balloon: free page hinting done");
        })
    }

    /// A host command (start, stop, done) when hinting is usable: `apply`
    /// it to the hinting state, publish the new command id to the guest and
    /// report the change.
    fn host_hint_command<T>(
        &mut self,
        apply: impl FnOnce(&mut HintState) -> T,
    ) -> Result<T, Error> {
        self.hinting_usable()?;
        let before = self.hint.status();
        let out = apply(&mut self.hint);
        self.publish_hint_cmd();
        self.emit_hinting_change(before);
        Ok(out)
    }

    /// Host id, guest-acked id, state and pages hinted in this round.
    pub fn hinting_status(&self) -> HintingStatus {
        self.hint.status()
    }

    /// Register (or with `None` remove) the receiver of hinted ranges.
    pub fn set_hint_sink(&mut self, sink: Option<Arc<dyn HintSink>>) {
        self.hint_sink = sink;
    }

    /// Free-page queue: command buffers (readable, 4 bytes) and hint
    /// buffers (writable, one free block each).
    pub(super) fn drain_free_page_queue(&mut self, idx: usize) -> Drain {
        let poison = self.poison_active();
        let notify = self.notify_mode(QueueKind::FreePage);
        let metrics = &*self.metrics;
        let ack_on_stop = self.hint_ack_on_stop;
        let mut auto_done = false;
        let drain = drain_active(
            &mut self.active,
            idx,
            None,
            notify,
            None,
            |mem, head, descs| {
                let readable = descs.iter().filter(|d| !d.is_write_only()).count();
                let writable = descs.n - readable;
                if descs.too_many || (readable > 0 && writable > 0) {
                    BalloonMetrics::inc(&metrics.invalid_buffers);
                    BalloonMetrics::inc(&metrics.hints_ignored);
                    warn_limited!(
                        "balloon: free_page queue ({idx}): buffer {head} mixes directions or is too long"
                    );
                } else if readable > 0 {
                    // A command: exactly one le32.
                    let d = descs.d[0];
                    let mut id = [0u8; 4];
                    if readable != 1 || d.len() != 4 || mem.read_slice(&mut id, d.addr()).is_err() {
                        BalloonMetrics::inc(&metrics.invalid_buffers);
                        warn_limited!(
                            "balloon: free_page queue ({idx}): command buffer {head} of {} bytes at {:#x} is not one le32",
                            d.len(),
                            d.addr().0
                        );
                    } else {
                        match self.hint.on_guest_cmd(u32::from_le_bytes(id)) {
                            GuestCmd::Ack(id) => info!("balloon: guest started hinting round {id}"),
                            GuestCmd::Stop => {
                                let status = self.hint.status();
                                info!(
                                    "balloon: guest stopped hinting ({} pages hinted)",
                                    status.hinted_pages
                                );
                                if status.state == HintingState::Stopped
                                    && let Some(sink) = &self.hint_sink
                                {
                                    sink.round_stopped(status.guest_cmd_id.unwrap_or(0));
                                }
                                auto_done |= ack_on_stop && status.state == HintingState::Stopped;
                            }
                            GuestCmd::Stale(id) => {
                                BalloonMetrics::inc(&metrics.hints_ignored);
                                debug!("balloon: free_page queue ({idx}): stale command id {id}");
                            }
                        }
                    }
                } else if let Some(cmd_id) = self.hint.accepting() {
                    for d in descs.iter() {
                        let range = GpaRange::new(d.addr().0, u64::from(d.len()));
                        let Some(run) = self.layout.run_of_range(range) else {
                            BalloonMetrics::inc(&metrics.hints_ignored);
                            warn_limited!(
                                "balloon: free_page queue ({idx}): hint skipped: {}",
                                super::ranges::not_a_run(range)
                            );
                            continue;
                        };
                        self.hint.add_hinted(run.npages);
                        BalloonMetrics::add(&metrics.hinted_pages, run.npages);
                        if let Some(sink) = &self.hint_sink {
                            sink.hinted(cmd_id, range);
                        } else if self.cfg.hint_discard && !poison {
                            discard_free_range(&*self.discard, metrics, range, "free_page", idx);
                        }
                    }
                } else {
                    BalloonMetrics::inc(&metrics.hints_ignored);
                    debug!(
                        "balloon: free_page queue ({idx}): hint buffer {head} outside a running round ignored"
                    );
                }
                Some(head)
            },
        );
        if auto_done {
            self.hint_ack_on_stop = false;
            self.hint.done();
            info!("balloon: free page hinting done (acknowledged on the guest's stop)");
            self.publish_hint_cmd();
        }
        drain
    }
}
