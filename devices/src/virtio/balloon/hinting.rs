//! Free page hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT), device side.
//!
//! The host starts a round by writing a fresh command id (>= 2) into
//! `free_page_hint_cmd_id` and raising a config interrupt. The guest acks
//! with a 4-byte device-readable buffer holding that id on the free-page
//! queue, then sends device-writable buffers, each one free block (4 MiB on
//! x86), and finally a readable buffer holding STOP (0). The hinted blocks
//! stay allocated in the guest until the host writes DONE (1). Hints sent
//! under an id other than the current one are stale and ignored.
//!
//! Hinted ranges go to a [`HintSink`] (live migration skips sending them);
//! with no sink they are only counted, or discarded if `hint_discard` is
//! configured (and page poisoning does not forbid it).

use serde::{Deserialize, Serialize};

use super::*;
use crate::GpaRange;

/// Receives hinted free ranges (e.g. migration, to skip those pages).
pub trait HintSink: Send + Sync {
    /// `range` (4 KiB aligned, inside guest RAM) was hinted free during
    /// round `cmd_id`. Called under the balloon's lock on the event loop:
    /// must be quick and must not lock the balloon.
    fn hinted(&self, cmd_id: u32, range: GpaRange);

    /// The guest ended round `cmd_id` (it sent STOP while the round was
    /// requested or running): every hint of the round has been delivered.
    /// Called under the balloon's lock, like [`hinted`](Self::hinted).
    fn round_stopped(&self, _cmd_id: u32) {}
}

/// Where a hinting round stands. The one definition: the API serialises
/// it as is (`"Idle"`, ...); saved state keeps its own snake_case names
/// (see `persist.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HintingState {
    /// No round started since the device was created or reset.
    Idle,
    /// The host wrote a new id; the guest has not acked it yet.
    Requested,
    /// The guest acked the current id and is sending hints.
    Running,
    /// The guest (or the host) stopped the round; hinted pages are still
    /// held by the guest.
    Stopped,
    /// The host wrote DONE: the guest frees the hinted pages.
    Done,
}

/// Where hinting stands: the one definition, used by the device, its saved
/// state and the API (`GET /balloon/hinting/status`, the `HintingChanged`
/// event), which serialises it as is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintingStatus {
    /// The id in the config space (0 = STOP, 1 = DONE, >= 2 a round).
    pub host_cmd_id: u32,
    /// The last round id the guest acked (absent before its first ack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cmd_id: Option<u32>,
    pub state: HintingState,
    /// 4 KiB pages hinted during the current (or last) round.
    pub hinted_pages: u64,
}

/// What a guest command buffer did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestCmd {
    /// The guest acked the current round.
    Ack(u32),
    /// The guest ended the round.
    Stop,
    /// An id that is not the current one: ignored.
    Stale(u32),
}

/// The hinting protocol state (pure; the device wires it to queues).
#[derive(Clone, Debug)]
pub struct HintState {
    host_cmd_id: u32,
    guest_cmd_id: u32,
    state: HintingState,
    hinted_pages: u64,
    last_id: u32,
}

impl Default for HintState {
    fn default() -> Self {
        Self::new()
    }
}

impl HintState {
    pub fn new() -> Self {
        Self {
            host_cmd_id: FREE_PAGE_HINT_CMD_ID_STOP,
            guest_cmd_id: 0,
            state: HintingState::Idle,
            hinted_pages: 0,
            last_id: FREE_PAGE_HINT_CMD_ID_MIN - 1,
        }
    }

    /// Start a new round; returns its id (>= 2, never the previous one).
    pub fn start(&mut self) -> u32 {
        let id = match self.last_id.checked_add(1) {
            Some(id) if id >= FREE_PAGE_HINT_CMD_ID_MIN => id,
            _ => FREE_PAGE_HINT_CMD_ID_MIN,
        };
        self.last_id = id;
        self.host_cmd_id = id;
        self.state = HintingState::Requested;
        self.hinted_pages = 0;
        id
    }

    /// The host ends the round (STOP).
    pub fn stop(&mut self) {
        self.host_cmd_id = FREE_PAGE_HINT_CMD_ID_STOP;
        if self.state != HintingState::Idle {
            self.state = HintingState::Stopped;
        }
    }

    /// The host is done with the hints (DONE): the guest may reuse them.
    pub fn done(&mut self) {
        self.host_cmd_id = FREE_PAGE_HINT_CMD_ID_DONE;
        self.state = HintingState::Done;
    }

    /// A command buffer from the guest.
    pub fn on_guest_cmd(&mut self, id: u32) -> GuestCmd {
        if id == FREE_PAGE_HINT_CMD_ID_STOP {
            if matches!(self.state, HintingState::Running | HintingState::Requested) {
                self.state = HintingState::Stopped;
            }
            return GuestCmd::Stop;
        }
        if id >= FREE_PAGE_HINT_CMD_ID_MIN
            && id == self.host_cmd_id
            && self.state == HintingState::Requested
        {
            self.guest_cmd_id = id;
            self.state = HintingState::Running;
            return GuestCmd::Ack(id);
        }
        GuestCmd::Stale(id)
    }

    /// The id hints are accepted under right now, if any.
    pub fn accepting(&self) -> Option<u32> {
        (self.state == HintingState::Running && self.guest_cmd_id == self.host_cmd_id)
            .then_some(self.guest_cmd_id)
    }

    pub fn add_hinted(&mut self, pages: u64) {
        // Saturating: a restored state may start it anywhere.
        self.hinted_pages = self.hinted_pages.saturating_add(pages);
    }

    /// The id to show in the config space.
    pub fn host_cmd_id(&self) -> u32 {
        self.host_cmd_id
    }

    pub fn status(&self) -> HintingStatus {
        HintingStatus {
            host_cmd_id: self.host_cmd_id,
            guest_cmd_id: (self.guest_cmd_id != 0).then_some(self.guest_cmd_id),
            state: self.state,
            hinted_pages: self.hinted_pages,
        }
    }

    /// The last round id handed out (the next round uses the one after).
    pub(crate) fn last_id(&self) -> u32 {
        self.last_id
    }

    /// Rebuild from saved values (see `balloon::persist`).
    pub(crate) fn from_parts(status: HintingStatus, last_id: u32) -> Self {
        Self {
            host_cmd_id: status.host_cmd_id,
            guest_cmd_id: status.guest_cmd_id.unwrap_or(0),
            state: status.state,
            hinted_pages: status.hinted_pages,
            last_id,
        }
    }

    /// Device reset: forget the round (ids keep increasing).
    pub fn reset(&mut self) {
        let last = self.last_id;
        *self = Self::new();
        self.last_id = last;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_two_and_increase() {
        let mut h = HintState::new();
        assert_eq!(h.status().state, HintingState::Idle);
        assert_eq!(h.host_cmd_id(), 0);
        assert_eq!(h.start(), 2);
        assert_eq!(h.start(), 3);
        h.last_id = u32::MAX;
        assert_eq!(h.start(), 2, "wraps past u32::MAX to 2, never 0 or 1");
    }

    #[test]
    fn ack_then_hints_then_stop() {
        let mut h = HintState::new();
        let id = h.start();
        assert_eq!(h.accepting(), None, "no hints before the guest acks");
        assert_eq!(h.on_guest_cmd(id), GuestCmd::Ack(id));
        assert_eq!(h.accepting(), Some(id));
        h.add_hinted(1024);
        assert_eq!(h.on_guest_cmd(0), GuestCmd::Stop);
        assert_eq!(h.accepting(), None);
        let s = h.status();
        assert_eq!(s.state, HintingState::Stopped);
        assert_eq!(s.hinted_pages, 1024);
        assert_eq!(s.guest_cmd_id, Some(id));
        h.done();
        assert_eq!(h.host_cmd_id(), FREE_PAGE_HINT_CMD_ID_DONE);
        assert_eq!(h.status().state, HintingState::Done);
    }

    #[test]
    fn stale_ids_are_ignored() {
        let mut h = HintState::new();
        let old = h.start();
        assert_eq!(h.on_guest_cmd(old), GuestCmd::Ack(old));
        let new = h.start();
        // Hints under the old id stop being accepted at once.
        assert_eq!(h.accepting(), None);
        assert_eq!(h.on_guest_cmd(old), GuestCmd::Stale(old));
        assert_eq!(h.on_guest_cmd(1), GuestCmd::Stale(1));
        assert_eq!(h.on_guest_cmd(new + 5), GuestCmd::Stale(new + 5));
        assert_eq!(h.on_guest_cmd(new), GuestCmd::Ack(new));
        // A second ack of the same id is stale too.
        assert_eq!(h.on_guest_cmd(new), GuestCmd::Stale(new));
        assert_eq!(h.status().hinted_pages, 0, "a new round restarts the count");
    }

    #[test]
    fn host_stop_ends_acceptance() {
        let mut h = HintState::new();
        let id = h.start();
        h.on_guest_cmd(id);
        h.stop();
        assert_eq!(h.accepting(), None);
        assert_eq!(h.host_cmd_id(), 0);
        assert_eq!(h.on_guest_cmd(id), GuestCmd::Stale(id));
        h.reset();
        assert_eq!(h.status().state, HintingState::Idle);
        assert_eq!(h.start(), id + 1, "ids keep increasing across resets");
    }
}
