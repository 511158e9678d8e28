//! Storage: the disk engine and on-disk metadata.
mod aligned;
mod blockdev;
pub mod engine;
mod job;
pub mod meta;
mod sync_io;
mod threads;
mod uring;
