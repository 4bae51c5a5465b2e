//! The virtio-mmio transport (virtio spec 1.x, section 4.2, version 2 layout).
