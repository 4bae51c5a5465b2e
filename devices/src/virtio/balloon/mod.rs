//! The virtio balloon device (virtio spec 5.5, as Linux and QEMU drive it).
