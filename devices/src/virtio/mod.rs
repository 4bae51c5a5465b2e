//! Virtio devices and the seam between a device and its transport.
//!
//! The transport (`mmio`) drives any [`VirtioDevice`] through this trait and
//! knows nothing of the balloon; devices signal the guest through
//! [`Interrupt`] and are woken by queue eventfds (KVM ioeventfds) without
//! knowing KVM.

pub mod balloon;
pub mod mmio;
pub mod ratelimit;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;

/// InterruptStatus bit: the device used a buffer (virtio-mmio, spec 4.2.2).
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// InterruptStatus bit: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// Device feature bit common to every modern device (spec 6).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// How a device tells the guest something happened.
pub trait Interrupt: Send + Sync {
    /// Set `status` bits (VIRTIO_MMIO_INT_*) in InterruptStatus and signal the guest.
    fn trigger(&self, status: u32) -> io::Result<()>;
    /// Current InterruptStatus (read by the driver through the transport).
    fn status(&self) -> u32;
    /// Clear `bits` (the driver's InterruptACK write).
    fn ack(&self, bits: u32);
}

/// An [`Interrupt`] delivered through an eventfd that the VMM registers as a
/// KVM irqfd for the device's GSI.
pub struct IrqfdInterrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqfdInterrupt {
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }
    /// The eventfd to register with `KVM_IRQFD`.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl Interrupt for IrqfdInterrupt {
    fn trigger(&self, status: u32) -> io::Result<()> {
        self.status.fetch_or(status, Ordering::SeqCst);
        self.evt.write(1)
    }
    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Errors a device may return when the driver sets DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expects {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {index} is not valid: {reason}")]
    BadQueue { index: usize, reason: String },
    #[error("activating the device failed: {0}")]
    Other(String),
}

/// A virtio device, as the transport sees it.
pub trait VirtioDevice: Send {
    /// Virtio device ID (balloon = 5).
    fn device_type(&self) -> u32;
    /// Features the device offers (all 64 bits).
    fn avail_features(&self) -> u64;
    /// Features the driver accepted so far.
    fn acked_features(&self) -> u64;
    /// The driver wrote DriverFeatures; the transport passes the full
    /// 64-bit value it has assembled, already masked to what was offered.
    fn set_acked_features(&mut self, features: u64);
    /// Maximum size of each queue that exists under the negotiated features,
    /// in queue-index order (Linux numbers only the queues that exist).
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Read device-specific configuration space at `offset` (relative to 0x100).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device-specific configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving `queues`, each woken by the
    /// eventfd at the same index in `queue_evts`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device (status 0). Return false if the device
    /// cannot be reset (the transport then marks it failed).
    fn reset(&mut self) -> bool;
    fn is_activated(&self) -> bool;

    /// The most queues the device can ever have, whatever features get
    /// negotiated. The transport creates one notification eventfd per
    /// possible queue up front (before features are known), so the VMM can
    /// register them all as ioeventfds at boot.
    fn max_queues(&self) -> usize {
        self.queue_max_sizes().len()
    }

    /// True once the device met an error it cannot recover from without a
    /// reset (a malformed queue, say); the transport then shows
    /// DEVICE_NEEDS_RESET in Status. The device itself raises the
    /// configuration-change interrupt when it sets this.
    fn needs_reset(&self) -> bool {
        false
    }

    /// Configuration-space generation (ConfigGeneration register): devices
    /// whose config fields can change bump it on every change.
    fn config_generation(&self) -> u32 {
        0
    }

    /// For saving an activated device (see [`crate::persist`]): the state
    /// of every queue it is serving, in queue-index order, as
    /// `Queue::state()` reports it (`Some(vec![])` when not activated).
    /// `None`, the default, means the device cannot report it, and an
    /// activated transport around it cannot be saved.
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        None
    }
}
