//! Device state save/restore, for Blimp's migration and snapshots.
//!
//! Every stateful device saves itself into a plain, versioned serde struct
//! through [`Persist`] and is rebuilt from one by an explicit `restore`
//! constructor on the device type, which takes what the device needs besides
//! its state (guest memory, an interrupt, the RAM discarder, ...):
//!
//! | device | save | restore |
//! |---|---|---|
//! | [`Serial`](crate::legacy::Serial) | `Persist::save` → [`SerialState`](crate::legacy::serial::SerialState) | `Serial::restore(irq, out, &state)` |
//! | [`Balloon`](crate::virtio::balloon::Balloon) | `Persist::save` → [`BalloonState`](crate::virtio::balloon::BalloonState) | `Balloon::restore(&state, ram, discard)` |
//! | [`MmioTransport`](crate::virtio::mmio::MmioTransport) | `Persist::save` → [`MmioTransportState`](crate::virtio::mmio::MmioTransportState) | `MmioTransport::restore(device, mem, interrupt, &state)` |
//!
//! Save with the VM paused and the device event loop idle (the VMM holds
//! each device's lock). A virtio device is restored first (inactive), then
//! its transport around it; the transport re-activates the device with the
//! saved queues when it was active. Guest memory should be restored before
//! the transport (re-activation only checks ring addresses, but the kicks it
//! sends make the device read the rings as soon as its event loop runs).
//! The VMM then wires the restored devices as new ones: irqfds, the
//! transport's queue eventfds as ioeventfds, the balloon into the event
//! loop, its observer and hint sink.
//!
//! State structs carry a `version`; a restore refuses any version it does
//! not know. [`to_json`] and [`from_json`] move states in and out of the
//! `serde_json::Value` the VMM's `VmState` carries; `from_json` checks the
//! version before the shape, so a state from a newer Blimp is reported as
//! such rather than as a parse error.
//!
//! State is untrusted input (it may come from another host): restores
//! validate it and return [`PersistError`] instead of panicking.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::GpaRange;
use crate::virtio::ActivateError;

/// A device whose state can be saved. The matching restore is an
/// inherent `restore` constructor on each type (its arguments differ).
pub trait Persist {
    /// The saved state: plain data, serde-serializable, versioned.
    type State: Serialize + DeserializeOwned + Versioned;

    /// Capture the device's state. The device must be quiescent: its vCPUs
    /// paused and its event loop not running a handler (the VMM holds the
    /// device lock while saving).
    fn save(&self) -> Result<Self::State, PersistError>;
}

/// A versioned state struct.
pub trait Versioned {
    /// What the state belongs to, for error messages ("balloon", ...).
    const NAME: &'static str;
    /// The only version this build writes and reads.
    const VERSION: u32;
    /// The version recorded in this state.
    fn version(&self) -> u32;

    /// Refuse a state whose version this build does not know.
    fn check_version(&self) -> Result<(), PersistError> {
        check_version(Self::NAME, self.version(), Self::VERSION)
    }
}

/// `versioned!(Type, "name", N)`: [`Versioned`] for a state struct whose
/// `version` field records its version; `name` goes in error messages and
/// `N` is the version this build writes and reads.
macro_rules! versioned {
    ($state:ty, $name:literal, $version:literal) => {
        impl $crate::persist::Versioned for $state {
            const NAME: &'static str = $name;
            const VERSION: u32 = $version;
            fn version(&self) -> u32 {
                self.version
            }
        }
    };
}
pub(crate) use versioned;

pub(crate) fn check_version(
    what: &'static str,
    found: u32,
    supported: u32,
) -> Result<(), PersistError> {
    if found == supported {
        Ok(())
    } else {
        Err(PersistError::UnsupportedVersion {
            what,
            found,
            supported,
        })
    }
}

/// Errors saving or restoring device state; each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("unsupported {what} state version {found} (this Blimp reads version {supported})")]
    UnsupportedVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("{what} state has no numeric `version` field")]
    MissingVersion { what: &'static str },
    #[error("{what} state is not valid JSON of the expected shape: {source}")]
    Deserialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot serialize the {what} state: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid {what} state: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error(
        "the saved balloon covered guest RAM {}, this VM has {}: restore into a VM with the same memory layout",
        ranges(saved),
        ranges(now)
    )]
    LayoutMismatch {
        saved: Vec<GpaRange>,
        now: Vec<GpaRange>,
    },
    #[error("saved state is for virtio device type {saved}, the device given is type {given}")]
    DeviceTypeMismatch { saved: u32, given: u32 },
    #[error("saved queue {index} is not valid: {reason}")]
    BadQueue { index: usize, reason: String },
    #[error("the device cannot report its queue state, so an active transport cannot be saved")]
    QueueStateUnavailable,
    #[error("re-activating the restored device failed: {0}")]
    Activate(#[source] ActivateError),
    #[error("restoring the balloon: {0}")]
    Balloon(#[source] crate::virtio::balloon::Error),
    #[error("restoring the {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn ranges(r: &[GpaRange]) -> String {
    let v: Vec<String> = r.iter().map(ToString::to_string).collect();
    format!("[{}]", v.join(", "))
}

impl PersistError {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what,
            reason: reason.into(),
        }
    }
}

/// Serialize a state for the VMM's `VmState.devices`.
pub fn to_json<S: Serialize + Versioned>(state: &S) -> Result<serde_json::Value, PersistError> {
    serde_json::to_value(state).map_err(|source| PersistError::Serialize {
        what: S::NAME,
        source,
    })
}

/// Deserialize a state from the VMM's `VmState.devices`, checking its
/// `version` before its shape.
pub fn from_json<S: DeserializeOwned + Versioned>(
    value: &serde_json::Value,
) -> Result<S, PersistError> {
    check_stored_version::<S>(value.get("version").and_then(serde_json::Value::as_u64))?;
    S::deserialize(value).map_err(|source| PersistError::Deserialize {
        what: S::NAME,
        source,
    })
}

/// The `version` field of a stored `S` (as JSON read it, if present) must
/// be the one this build supports; one too large for `u32` is reported as
/// `u32::MAX`.
fn check_stored_version<S: Versioned>(found: Option<u64>) -> Result<(), PersistError> {
    let found = found.ok_or(PersistError::MissingVersion { what: S::NAME })?;
    let found = u32::try_from(found).unwrap_or(u32::MAX);
    check_version(S::NAME, found, S::VERSION)
}

#[derive(Deserialize)]
struct VersionProbe {
    #[serde(default)]
    version: Option<u64>,
}

/// Deserialize a state from JSON text (a sub-document of the VMM's state
/// section, kept raw until now), checking its `version` before its shape.
/// The text is typed directly: no intermediate JSON tree.
pub fn from_json_str<S: DeserializeOwned + Versioned>(text: &str) -> Result<S, PersistError> {
    let probe: VersionProbe =
        serde_json::from_str(text).map_err(|source| PersistError::Deserialize {
            what: S::NAME,
            source,
        })?;
    check_stored_version::<S>(probe.version)?;
    serde_json::from_str(text).map_err(|source| PersistError::Deserialize {
        what: S::NAME,
        source,
    })
}

/// The ring state of one virtio queue (mirrors `virtio_queue::QueueState`,
/// which is not serde): where the device stands in the available and used
/// rings. The queue's addresses and size are the transport's registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRingState {
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write (the used index).
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX is in use on this queue.
    pub event_idx_enabled: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        version: u32,
        x: u8,
    }

    versioned!(S, "test", 3);

    #[test]
    fn json_round_trip_and_version_first() {
        let s = S { version: 3, x: 7 };
        let v = to_json(&s).unwrap();
        assert_eq!(from_json::<S>(&v).unwrap(), s);
        // A newer state whose shape changed: reported as a version problem.
        let v = serde_json::json!({"version": 4, "y": "new"});
        let e = from_json::<S>(&v).unwrap_err();
        assert!(
            matches!(
                e,
                PersistError::UnsupportedVersion {
                    found: 4,
                    supported: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("test state version 4"), "{e}");
        let v = serde_json::json!({"x": 1});
        assert!(matches!(
            from_json::<S>(&v),
            Err(PersistError::MissingVersion { .. })
        ));
        let v = serde_json::json!({"version": 1u64 << 40, "x": 1});
        assert!(matches!(
            from_json::<S>(&v),
            Err(PersistError::UnsupportedVersion { .. })
        ));
        let v = serde_json::json!({"version": 3, "x": "nope"});
        assert!(matches!(
            from_json::<S>(&v),
            Err(PersistError::Deserialize { .. })
        ));
        assert!(S { version: 2, x: 0 }.check_version().is_err());
    }

    #[test]
    fn layout_mismatch_names_both_layouts() {
        let e = PersistError::LayoutMismatch {
            saved: vec![GpaRange::new(0, 0x1000)],
            now: vec![GpaRange::new(0, 0x2000)],
        };
        let s = e.to_string();
        assert!(
            s.contains("[0x0, +0x1000)") && s.contains("[0x0, +0x2000)"),
            "{s}"
        );
    }
}
