//! Virtio drivers: the virtio-mmio transport (the split-virtqueue logic is
//! in the library, `testguest::virtq`).

pub mod mmio;
