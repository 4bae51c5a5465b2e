//! Device state in a migration stream: which devices the VM had and each
//! one's versioned state, as one JSON document in the stream's state section.

use std::sync::{Arc, Mutex};

use crate::console::StdoutWriter;
use devices::legacy::Serial;
use devices::legacy::serial::SerialState;
use devices::persist::{Persist, PersistError, from_json_str, to_json};
use devices::virtio::balloon::Balloon;
use devices::virtio::balloon::persist::BalloonState;
use devices::virtio::mmio::{MmioTransport, MmioTransportState};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, RestoreError};
use crate::machine::Machine;
use crate::migration::checked::required;
use crate::policy::PolicyPersist;

/// Version of [`DevicesState`].
pub const DEVICES_STATE_VERSION: u32 = 1;

/// The devices of a VM. Every field must be present; `balloon` is `null`
/// for a VM without one. Each device's own state stays raw JSON text here
/// and is typed by the device's state struct.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct DevicesState {
    pub version: u32,
    pub debug_exit: bool,
    pub serial: Box<RawValue>,
    #[serde(deserialize_with = "required")]
    pub balloon: Option<BalloonSlot>,
}

/// The balloon and its virtio-mmio transport.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct BalloonSlot {
    pub device: Box<RawValue>,
    pub transport: Box<RawValue>,
    /// The balloon policy (issue #18), when it was on or configured; a
    /// stream without it (older, or a VM that never used the policy)
    /// restores with the policy off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySlot>,
}

/// The balloon policy's state in the stream.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySlot {
    pub enabled: bool,
    /// Why a manual target paused it, if it did.
    pub paused: Option<String>,
    pub config: api_types::policy::PolicySettings,
}

fn persist_err(e: PersistError) -> String {
    e.to_string()
}

fn raw(v: serde_json::Value) -> Result<Box<RawValue>, String> {
    serde_json::value::to_raw_value(&v).map_err(|e| e.to_string())
}

/// Capture the state of every device. Called with the vCPUs paused and the
/// balloon locked by the caller (passed in as `balloon`), so no device
/// writes guest memory meanwhile. Taking the transport lock after the
/// device's is safe here: the only other holders are vCPU threads, paused.
/// `policy` is the balloon policy's saved copy (`None`: never used).
pub fn capture(
    debug_exit: bool,
    serial: &Mutex<Serial>,
    balloon: Option<(&Balloon, &Mutex<MmioTransport>)>,
    policy: Option<PolicyPersist>,
) -> Result<serde_json::Value, String> {
    let serial_state = serial
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .save()
        .map_err(persist_err)?;
    let balloon = match balloon {
        None => None,
        Some((dev, transport)) => {
            let t = transport.lock().unwrap_or_else(|p| p.into_inner());
            Some(BalloonSlot {
                device: raw(to_json(&dev.save().map_err(persist_err)?).map_err(persist_err)?)?,
                transport: raw(
                    to_json(&t.save_with(dev).map_err(persist_err)?).map_err(persist_err)?
                )?,
                policy: policy.map(|p| PolicySlot {
                    enabled: p.enabled,
                    paused: p.paused,
                    config: p.settings,
                }),
            })
        }
    };
    serde_json::to_value(DevicesState {
        version: DEVICES_STATE_VERSION,
        debug_exit,
        serial: raw(to_json(&serial_state).map_err(persist_err)?)?,
        balloon,
    })
    .map_err(|e| e.to_string())
}

/// Device state read from a stream and typed, not applied yet.
#[derive(Debug)]
pub(crate) struct SavedDevices {
    debug_exit: bool,
    serial: SerialState,
    balloon: Option<(BalloonState, MmioTransportState)>,
    policy: Option<PolicyPersist>,
}

impl SavedDevices {
    /// The balloon policy's saved state, if the stream has one.
    pub(crate) fn policy(&self) -> Option<&PolicyPersist> {
        self.policy.as_ref()
    }

    /// Check the policy's settings against the restored guest's size.
    pub(crate) fn check_policy(&self, guest_bytes: u64) -> Result<(), RestoreError> {
        match &self.policy {
            Some(p) => p
                .settings
                .check(guest_bytes)
                .map_err(|e| RestoreError::Devices(format!("balloon policy: {e}"))),
            None => Ok(()),
        }
    }
}

fn bad(what: &str, e: PersistError) -> RestoreError {
    RestoreError::Devices(format!("{what}: {e}"))
}

/// Type the device document `raw` (refusing unknown versions, missing or
/// malformed devices, naming them). Nothing is applied.
pub(crate) fn parse(raw: &RawValue) -> Result<SavedDevices, RestoreError> {
    let st: DevicesState = serde_json::from_str(raw.get())
        .map_err(|e| RestoreError::Devices(format!("not a device state document: {e}")))?;
    if st.version != DEVICES_STATE_VERSION {
        return Err(RestoreError::Devices(format!(
            "device state version {} (this Blimp reads version {DEVICES_STATE_VERSION})",
            st.version
        )));
    }
    let serial: SerialState = from_json_str(st.serial.get()).map_err(|e| bad("serial", e))?;
    let balloon = match &st.balloon {
        None => None,
        Some(slot) => Some((
            from_json_str(slot.device.get()).map_err(|e| bad("balloon", e))?,
            from_json_str(slot.transport.get()).map_err(|e| bad("balloon transport", e))?,
        )),
    };
    let policy = st
        .balloon
        .as_ref()
        .and_then(|slot| slot.policy.clone())
        .map(|p| PolicyPersist {
            enabled: p.enabled,
            paused: p.paused,
            settings: p.config,
        });
    Ok(SavedDevices {
        debug_exit: st.debug_exit,
        serial,
        balloon,
        policy,
    })
}

/// Rebuild the devices of `m` from `saved`; returns the balloon if any.
/// The devices are built (and their state checked) before any is wired
/// into the machine.
pub(crate) fn restore(
    m: &mut Machine,
    saved: &SavedDevices,
) -> Result<Option<Arc<Mutex<Balloon>>>, Error> {
    let irq = m
        .serial
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .irq_evt()
        .try_clone()
        .map_err(|e| RestoreError::Devices(format!("serial irqfd: {e}")))?;
    let serial = Serial::restore(irq, Box::new(StdoutWriter::default()), &saved.serial)
        .map_err(|e| bad("serial", e))?;
    let balloon = match &saved.balloon {
        None => None,
        Some((dev_state, tr_state)) => {
            let discard: Arc<dyn devices::RamDiscard> = m.ram.clone();
            let b = Balloon::restore(dev_state, m.ram.ranges(), discard)
                .map_err(|e| bad("balloon", e))?;
            Some((Arc::new(Mutex::new(b)), tr_state))
        }
    };

    // Apply.
    if saved.debug_exit {
        m.add_debug_exit()?;
    }
    *m.serial.lock().unwrap_or_else(|p| p.into_inner()) = serial;
    let Some((balloon, tr_state)) = balloon else {
        return Ok(None);
    };
    m.virtio.add_restored_virtio(
        &m.vm,
        &mut m.mmio,
        m.ram.memory(),
        balloon.clone(),
        tr_state,
    )?;
    Ok(Some(balloon))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn serial_state() -> Value {
        to_json(&sample_serial()).unwrap()
    }

    fn sample_serial() -> SerialState {
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Serial::new(irq, Box::new(StdoutWriter::default()))
            .save()
            .unwrap()
    }

    fn doc(mutate: impl FnOnce(&mut Value)) -> Result<SavedDevices, RestoreError> {
        let mut v = json!({
            "version": DEVICES_STATE_VERSION,
            "debug_exit": true,
            "serial": serial_state(),
            "balloon": null,
        });
        mutate(&mut v);
        let raw = serde_json::value::to_raw_value(&v).unwrap();
        parse(&raw)
    }

    /// A balloon slot without `policy` (an older stream) restores with
    /// the policy off; one with it carries enabled, paused and the config.
    #[test]
    fn the_policy_rides_in_the_balloon_slot() {
        let slot = BalloonSlot {
            device: raw(json!({})).unwrap(),
            transport: raw(json!({})).unwrap(),
            policy: None,
        };
        let v = serde_json::to_value(&slot).unwrap();
        assert!(v.get("policy").is_none(), "{v}");
        let old: BalloonSlot =
            serde_json::from_value(json!({"device": {}, "transport": {}})).unwrap();
        assert!(old.policy.is_none());
        let p = PolicySlot {
            enabled: true,
            paused: Some("manual".into()),
            config: api_types::policy::PolicySettings {
                floor_mib: 300,
                ..Default::default()
            },
        };
        let v = json!({"device": {}, "transport": {}, "policy": p});
        let back: BalloonSlot = serde_json::from_value(v).unwrap();
        assert_eq!(back.policy, Some(p));
        let bad = json!({"device": {}, "transport": {}, "policy": {"enabled": true}});
        assert!(serde_json::from_value::<BalloonSlot>(bad).is_err());
    }

    #[test]
    fn a_document_without_balloon_parses() {
        let d = doc(|_| {}).unwrap();
        assert!(d.debug_exit);
        assert!(d.balloon.is_none());
    }

    /// (case, the field the error must name, the mutation)
    type Mutation = (&'static str, &'static str, fn(&mut Value));

    #[test]
    fn missing_or_malformed_devices_are_refused_by_name() {
        let table: &[Mutation] = &[
            ("missing balloon", "balloon", |v| {
                v.as_object_mut().unwrap().remove("balloon");
            }),
            ("missing serial", "serial", |v| {
                v.as_object_mut().unwrap().remove("serial");
            }),
            ("null serial", "serial", |v| v["serial"] = Value::Null),
            ("serial of another shape", "serial", |v| {
                v["serial"]["line_control"] = json!("x")
            }),
            ("serial version", "serial", |v| {
                v["serial"]["version"] = json!(9)
            }),
            ("balloon without transport", "transport", |v| {
                v["balloon"] = json!({"device": {"version": 1}})
            }),
            (
                "balloon of another shape",
                "balloon",
                |v| v["balloon"] = json!({"device": {"version": 1}, "transport": {"version": 1}}),
            ),
            ("unknown device", "gpu", |v| v["gpu"] = json!({})),
            ("other version", "version 2", |v| v["version"] = json!(2)),
        ];
        for (what, field, mutate) in table {
            let e = doc(mutate)
                .err()
                .unwrap_or_else(|| panic!("{what}: accepted"))
                .to_string();
            assert!(e.contains(field), "{what}: {e}");
        }
    }
}
