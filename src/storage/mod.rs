//! Storage: the disk engine and on-disk metadata.
pub mod meta;
mod aligned;
mod blockdev;
pub mod engine;
mod job;
mod sync_io;
mod threads;
mod uring;
