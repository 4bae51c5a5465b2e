//! Device state in a migration stream: which devices the VM had and each
//! one's versioned state, as one JSON document in the stream's state section.

use std::sync::{Arc, Mutex};

use devices::virtio::balloon::Balloon;
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

/// Rebuild the devices of `m` from `value`; returns the balloon if any.
pub(crate) fn restore(
    m: &mut Machine,
    value: &serde_json::Value,
) -> Result<Option<Arc<Mutex<Balloon>>>, Error> {
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
    if st.balloon.is_some() {
        return Err(
            RestoreError::Devices("restoring a balloon is not supported yet".into()).into(),
        );
    }
    Ok(None)
}
