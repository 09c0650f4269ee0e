//! Ferry's checkpoint format.
//!
//! A checkpoint is a directory:
//!
//! | file | content |
//! |---|---|
//! | `state.ferry` | header (magic, format version, payload length, CRC-32) + the VM's state as JSON |
//! | `memory.bin`  | guest RAM, regions back to back in guest-physical order; zero pages are holes |
//!
//! The same state travels in the migration stream. The [`Persist`] trait is how each
//! component saves and restores its part of the tree.
//!
//! ## Compatibility rule
//!
//! The format version is bumped whenever a Ferry could not read what a newer one writes
//! without guessing. Within a version, the state evolves only by adding fields that have
//! defaults (`#[serde(default)]`), so a later Ferry reads every older checkpoint of the
//! same or an earlier version, and an older Ferry ignores fields it does not know. A
//! checkpoint whose version is newer than the reader's is refused with both versions named.
//! `tests/fixtures` holds a checkpoint written by format version 1; the test suite restores it.

pub mod format;
pub mod memory;

pub use format::{read_state_file, write_state_file, FORMAT_VERSION, MAGIC, STATE_FILE};
pub use memory::MEMORY_FILE;

/// Saving and restoring one component's state: the component produces a plain,
/// serialisable `State`; restoring builds the component from it and whatever the
/// rest of the VM must hand it (`Args`).
pub trait Persist: Sized {
    /// The saved state.
    type State;
    /// What restoring needs besides the state.
    type Args;
    /// Why restoring failed.
    type Error;

    /// Captures the component's state.
    fn save(&self) -> Self::State;
    /// Rebuilds the component from a saved state.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}
