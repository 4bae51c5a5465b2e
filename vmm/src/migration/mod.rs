//! Building blocks of Blimp's live migration and migrate-to-file: dirty-page
//! tracking, the stream format, zero-page detection, KVM state capture and
//! restore, the pre-copy convergence decision, and replacing a destination
//! file atomically ([`file_dest`]).
//!
//! The integrator drives them:
//! 1. [`dirty::start_dirty_logging`], then round 1 sends every page
//!    ([`dirty::AtomicPageBitmap::set_all`]), zero pages as markers only
//!    ([`stream::StreamWriter::send_bitmap`]).
//! 2. Each further round: [`dirty::sync`] into a fresh to-send bitmap (hints
//!    clear ranges in it with [`dirty::AtomicPageBitmap::clear_range`] while
//!    the sender walks it with [`stream::StreamWriter::send_bitmap`]); [`convergence::Convergence::decide`]
//!    says whether to go on or stop and copy.
//! 3. Stop and copy: pause the vCPUs, last sync and send, capture
//!    [`state::VmState`] and write it with [`stream::StreamWriter::state`],
//!    then [`stream::StreamWriter::finish`].
//! 4. Destination: [`stream::StreamReader::restore`] applies the pages and
//!    hands back the state blob once the trailer verifies;
//!    [`state::VmState::from_bytes`] then [`state::restore_vm`] /
//!    [`state::restore_vcpu`].

pub mod checked;
pub mod convergence;
pub mod dirty;
pub mod file_dest;
pub mod handshake;
pub mod hints;
#[cfg(test)]
mod kvm_tests;
pub mod limits;
pub mod link;
pub mod source;
pub mod state;
pub mod stream;
pub mod zero;

pub use dirty::{AtomicPageBitmap, GpaRun, SyncStats};
