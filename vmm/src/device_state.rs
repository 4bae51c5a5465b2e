//! Device state in a migration stream: which devices the VM had and each
//! one's versioned state, as one JSON document in the stream's state section.

use std::sync::{Arc, Mutex};

use devices::legacy::Serial;
use devices::legacy::serial::{SerialState, StdoutWriter};
use devices::persist::{Persist, PersistError, from_json, to_json};
use devices::virtio::balloon::Balloon;
use devices::virtio::balloon::persist::BalloonState;
use devices::virtio::mmio::{MmioTransport, MmioTransportState};
use serde::{Deserialize, Serialize};

use crate::restore::RestoreError;
use crate::vmm::{Error, Machine};

/// Version of [`DevicesState`].
pub const DEVICES_STATE_VERSION: u32 = 1;

/// The devices of a VM.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct DevicesState {
    pub version: u32,
    pub debug_exit: bool,
    pub serial: Option<serde_json::Value>,
    pub balloon: Option<BalloonSlot>,
}

/// The balloon and its virtio-mmio transport.
#[derive(Serialize, Deserialize, Debug)]
pub struct BalloonSlot {
    pub device: serde_json::Value,
    pub transport: serde_json::Value,
}

fn persist_err(e: PersistError) -> String {
    e.to_string()
}

/// Capture the state of every device. Called with the vCPUs paused and the
/// balloon locked by the caller (passed in as `balloon`), so no device
/// writes guest memory meanwhile. Taking the transport lock after the
/// device's is safe here: the only other holders are vCPU threads, paused.
pub fn capture(
    debug_exit: bool,
    serial: &Mutex<Serial>,
    balloon: Option<(&Balloon, &Mutex<MmioTransport>)>,
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
                device: to_json(&dev.save().map_err(persist_err)?).map_err(persist_err)?,
                transport: to_json(&t.save_with(dev).map_err(persist_err)?).map_err(persist_err)?,
            })
        }
    };
    serde_json::to_value(DevicesState {
        version: DEVICES_STATE_VERSION,
        debug_exit,
        serial: Some(to_json(&serial_state).map_err(persist_err)?),
        balloon,
    })
    .map_err(|e| e.to_string())
}

/// Rebuild the devices of `m` from `value`; returns the balloon if any.
pub(crate) fn restore(
    m: &mut Machine,
    value: &serde_json::Value,
) -> Result<Option<Arc<Mutex<Balloon>>>, Error> {
    let bad = |what: &str, e: PersistError| RestoreError::Devices(format!("{what}: {e}"));
    let st: DevicesState = serde_json::from_value(value.clone())
        .map_err(|e| RestoreError::Devices(format!("not a device state document: {e}")))?;
    if st.version != DEVICES_STATE_VERSION {
        return Err(RestoreError::Devices(format!(
            "device state version {} (this Blimp reads version {DEVICES_STATE_VERSION})",
            st.version
        ))
        .into());
    }
    if st.debug_exit {
        m.add_debug_exit()?;
    }
    if let Some(v) = &st.serial {
        let state: SerialState = from_json(v).map_err(|e| bad("serial", e))?;
        let mut serial = m.serial.lock().unwrap_or_else(|p| p.into_inner());
        let irq = serial
            .irq_evt()
            .try_clone()
            .map_err(|e| RestoreError::Devices(format!("serial irqfd: {e}")))?;
        *serial =
            Serial::restore(irq, Box::new(StdoutWriter), &state).map_err(|e| bad("serial", e))?;
    }
    let Some(slot) = &st.balloon else {
        return Ok(None);
    };
    let dev_state: BalloonState = from_json(&slot.device).map_err(|e| bad("balloon", e))?;
    let tr_state: MmioTransportState =
        from_json(&slot.transport).map_err(|e| bad("balloon transport", e))?;
    let discard: Arc<dyn devices::RamDiscard> = m.ram.clone();
    let balloon = Arc::new(Mutex::new(
        Balloon::restore(&dev_state, m.ram.ranges(), discard).map_err(|e| bad("balloon", e))?,
    ));
    m.virtio.add_restored_virtio(
        &m.vm,
        &mut m.mmio,
        m.ram.memory(),
        balloon.clone(),
        &tr_state,
    )?;
    Ok(Some(balloon))
}
