//! Saving and restoring the virtio-mmio transport: its registers, the
//! rings of the queues the device serves, and a restore that checks the
//! whole saved state before it applies any of it.

use log::info;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::persist::{Persist, PersistError, QueueRingState, Versioned, versioned};

/// Saved registers of one queue, and where the device stood in its rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegsState {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc (descriptor table).
    pub desc: u64,
    /// QueueDriver (available ring).
    pub driver: u64,
    /// QueueDevice (used ring).
    pub device: u64,
    /// Ring indices; present exactly for the queues an activated device
    /// was serving.
    pub ring: Option<QueueRingState>,
}

/// Saved state of a virtio-mmio transport (the device's own state is
/// saved separately, by the device).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub version: u32,
    /// DeviceID of the wrapped device; a restore refuses another type.
    pub device_type: u32,
    /// Status as the transport holds it (may include NEEDS_RESET from a
    /// failed activation; the device's own NEEDS_RESET is the device's).
    pub status: u32,
    /// The device refused a reset and will not be driven again.
    pub failed: bool,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// DriverFeatures as the driver wrote it (both banks).
    pub driver_features: u64,
    /// Features the device acked (a cross-check against the restored device).
    pub acked_features: u64,
    pub queue_sel: u32,
    /// InterruptStatus bits not yet acknowledged by the driver.
    pub interrupt_status: u32,
    /// The device was activated (serving queues) when saved.
    pub device_activated: bool,
    /// Every possible queue (`max_queues` entries).
    pub queues: Vec<QueueRegsState>,
}

versioned!(MmioTransportState, "virtio-mmio transport", 1);

const TRANSPORT: &str = MmioTransportState::NAME;

impl Persist for MmioTransport {
    type State = MmioTransportState;

    /// Registers, interrupt status and, for an activated device, each
    /// queue's ring indices (asked of the device through
    /// [`VirtioDevice::queue_states`]).
    fn save(&self) -> Result<MmioTransportState, PersistError> {
        self.save_with(&*lock(&self.device))
    }
}

impl MmioTransport {
    /// [`Persist::save`] with the device already locked by the caller (a VMM
    /// that holds the device lock to keep it quiescent while it saves).
    pub fn save_with(&self, dev: &dyn VirtioDevice) -> Result<MmioTransportState, PersistError> {
        let device_activated = dev.is_activated();
        let mut queues: Vec<QueueRegsState> = self
            .queues
            .iter()
            .map(|r| QueueRegsState {
                size: r.size,
                ready: r.ready,
                desc: r.desc,
                driver: r.driver,
                device: r.device,
                ring: None,
            })
            .collect();
        if device_activated {
            let states = dev
                .queue_states()
                .ok_or(PersistError::QueueStateUnavailable)?;
            if states.len() != self.queue_max.len() || states.len() > queues.len() {
                return Err(PersistError::invalid(
                    TRANSPORT,
                    format!(
                        "the device serves {} queues, the transport set up {}",
                        states.len(),
                        self.queue_max.len()
                    ),
                ));
            }
            for (index, (st, regs)) in states.iter().zip(queues.iter_mut()).enumerate() {
                let same = st.ready == regs.ready
                    && (!st.ready
                        || (st.size == regs.size
                            && st.desc_table == regs.desc
                            && st.avail_ring == regs.driver
                            && st.used_ring == regs.device));
                if !same {
                    return Err(PersistError::BadQueue {
                        index,
                        reason: format!(
                            "the device's queue ({st:?}) differs from the transport's registers"
                        ),
                    });
                }
                regs.ring = Some(QueueRingState {
                    next_avail: st.next_avail,
                    next_used: st.next_used,
                    event_idx_enabled: st.event_idx_enabled,
                });
            }
        }
        Ok(MmioTransportState {
            version: MmioTransportState::VERSION,
            device_type: self.device_type,
            status: self.status,
            failed: self.failed,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            acked_features: dev.acked_features(),
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            device_activated,
            queues,
        })
    }
}

impl MmioTransport {
    /// Rebuild a transport from `state` around `device`, which must already
    /// be restored (same type, same acked features) and not activated.
    ///
    /// Like [`new`](Self::new) this creates fresh queue eventfds; the VMM
    /// registers them (and the interrupt's irqfd) exactly as for a new
    /// transport. If the device was activated when saved, the queues are
    /// rebuilt from the saved registers, validated against `mem` as a
    /// DRIVER_OK write validates them, given the saved ring indices and
    /// handed to [`VirtioDevice::activate`], with no guest register writes
    /// involved; each of those queues' eventfds is then signalled once so
    /// the device looks at buffers whose notification was in flight during
    /// the migration. Unacknowledged interrupt bits are raised again through
    /// `interrupt` (the guest may take one spurious interrupt).
    ///
    /// Invalid state (unknown version, another device type, a queue
    /// outside guest memory, ...) is refused with an error, never a panic;
    /// the device is left unactivated then.
    pub fn restore(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<dyn Interrupt>,
        state: &MmioTransportState,
    ) -> Result<Self, PersistError> {
        state.check_version()?;
        let mut t = Self::new(device, mem, interrupt).map_err(|source| PersistError::Io {
            what: "queue eventfds",
            source,
        })?;
        if state.device_type != t.device_type {
            return Err(PersistError::DeviceTypeMismatch {
                saved: state.device_type,
                given: t.device_type,
            });
        }
        if state.queues.len() != t.queues.len() {
            return Err(PersistError::invalid(
                TRANSPORT,
                format!(
                    "{} queues saved, the device can have {}",
                    state.queues.len(),
                    t.queues.len()
                ),
            ));
        }
        // Check everything, then apply: a refused state leaves the device
        // unactivated and the transport unused.
        state.check_against(&t)?;
        t.apply_registers(state);
        if state.device_activated {
            t.reactivate(state)?;
        }
        if state.interrupt_status != 0 {
            t.interrupt
                .trigger(state.interrupt_status)
                .map_err(|source| PersistError::Io {
                    what: "interrupt",
                    source,
                })?;
        }
        Ok(t)
    }
}

impl MmioTransportState {
    /// Everything [`MmioTransport::restore`] refuses, checked against the
    /// fresh transport `t` before any of the state is applied.
    fn check_against(&self, t: &MmioTransport) -> Result<(), PersistError> {
        let state = self;
        {
            let dev = lock(&t.device);
            if dev.is_activated() {
                return Err(PersistError::invalid(
                    TRANSPORT,
                    "the device to restore around is already activated",
                ));
            }
            if dev.acked_features() != state.acked_features {
                return Err(PersistError::invalid(
                    TRANSPORT,
                    format!(
                        "the restored device acked features {:#x}, the transport was saved with {:#x}",
                        dev.acked_features(),
                        state.acked_features
                    ),
                ));
            }
        }
        let known = STATUS_SEQUENCE.iter().fold(
            VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET,
            |a, b| a | b,
        );
        if state.status & !known != 0 {
            return Err(PersistError::invalid(
                TRANSPORT,
                format!("unknown status bits {:#x}", state.status & !known),
            ));
        }
        for (i, &bit) in STATUS_SEQUENCE.iter().enumerate() {
            let prereq = STATUS_SEQUENCE[..i].iter().fold(0, |a, b| a | b);
            if state.status & bit != 0 && state.status & prereq != prereq {
                return Err(PersistError::invalid(
                    TRANSPORT,
                    format!("status {:#x} has bit {bit:#x} out of order", state.status),
                ));
            }
        }
        if state.device_activated && state.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            return Err(PersistError::invalid(
                TRANSPORT,
                format!(
                    "device activated but status {:#x} lacks DRIVER_OK",
                    state.status
                ),
            ));
        }
        let irq_bits = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
        if state.interrupt_status & !irq_bits != 0 {
            return Err(PersistError::invalid(
                TRANSPORT,
                format!(
                    "unknown interrupt status bits {:#x}",
                    state.interrupt_status
                ),
            ));
        }
        let serving = if state.device_activated {
            t.queue_max.len()
        } else {
            0
        };
        for (index, q) in state.queues.iter().enumerate() {
            if q.ring.is_some() != (index < serving) {
                return Err(PersistError::BadQueue {
                    index,
                    reason: if q.ring.is_some() {
                        "ring indices saved for a queue the device was not serving".into()
                    } else {
                        "no ring indices saved for a queue the device was serving".into()
                    },
                });
            }
        }

        Ok(())
    }
}

impl MmioTransport {
    /// The saved registers (checked by
    /// [`MmioTransportState::check_against`]).
    fn apply_registers(&mut self, state: &MmioTransportState) {
        let t = self;
        t.status = state.status;
        t.failed = state.failed;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        for (regs, q) in t.queues.iter_mut().zip(&state.queues) {
            *regs = QueueRegs {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
            };
        }
    }

    /// Rebuild the device's queues from the applied registers and the saved
    /// ring indices, activate the device with them and kick each queue once.
    fn reactivate(&mut self, state: &MmioTransportState) -> Result<(), PersistError> {
        let t = self;
        let mut queues = t.build_queues().map_err(|e| match e {
            ActivateError::BadQueue { index, reason } => PersistError::BadQueue { index, reason },
            other => PersistError::Activate(other),
        })?;
        for (q, saved) in queues.iter_mut().zip(&state.queues) {
            if let Some(r) = saved.ring {
                q.set_next_avail(r.next_avail);
                q.set_next_used(r.next_used);
                q.set_event_idx(r.event_idx_enabled);
            }
        }
        let n = queues.len();
        let evts = t.queue_evts[..n]
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|source| PersistError::Io {
                what: "queue eventfds",
                source,
            })?;
        lock(&t.device)
            .activate(t.mem.clone(), t.interrupt.clone(), queues, evts)
            .map_err(PersistError::Activate)?;
        for evt in &t.queue_evts[..n] {
            evt.write(1).map_err(|source| PersistError::Io {
                what: "queue eventfds",
                source,
            })?;
        }
        info!(
            "virtio-mmio(type {}): device re-activated from saved state",
            t.device_type
        );
        Ok(())
    }
}
