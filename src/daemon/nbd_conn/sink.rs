//! The reply side of one NBD connection: requests registered as they go to the core, the
//! core's answers encoded (`nbd::encode_reply`) and sent without blocking, in completion
//! order; the writer task (`writer.rs`) takes over only when the socket is full.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use super::cork;
use super::sink_state::{Pending, SinkGuard, SinkState};
use crate::core::ConnId;
use crate::daemon::{lock, Shared};
use crate::nbd::{chunk_block_status, encode_reply, Command};

/// READ data at least this large is sent from its own buffer (vectored), not copied.
const ZERO_COPY_MIN: usize = 8 * 1024;
/// Replies held back while a batch runs are sent at once when they reach this size.
const CORK_MAX: usize = 256 * 1024;
/// Most slices gathered into one `sendmsg`.
const MAX_IOV: usize = 64;

/// The reply side of one connection (see the module comment).
pub(crate) struct ConnSink {
    pub(super) conn: ConnId,
    pub(super) fd: RawFd,
    /// Keeps the socket (and so `fd`) open for as long as anyone may send on it.
    pub(super) _stream: Arc<dyn Send + Sync>,
    pub(super) structured: bool,
    pub(super) state: Mutex<SinkState>,
    /// Wakes the writer task: the socket is full, or the connection may be finished.
    pub(super) wake: Notify,
}

/// Carries out the core's `Action::Reply` for NBD connection `conn`.
pub(crate) fn deliver(
    shared: &Arc<Shared>,
    conn: ConnId,
    idx: u64,
    result: Result<Option<Bytes>, u32>,
) {
    let sink = lock(&shared.conns).get(&conn).cloned();
    if let Some(sink) = sink {
        sink.reply(idx, result);
    }
}

impl ConnSink {
    pub(super) fn new(
        conn: ConnId,
        stream: Arc<dyn Send + Sync>,
        fd: RawFd,
        structured: bool,
    ) -> ConnSink {
        ConnSink {
            conn,
            fd,
            _stream: stream,
            structured,
            state: Mutex::new(SinkState {
                out: BytesMut::with_capacity(64 * 1024),
                ..SinkState::default()
            }),
            wake: Notify::new(),
        }
    }

    /// Nothing of this connection is in the core or waiting to be sent.
    pub(super) fn idle(&self) -> bool {
        let st = self.lock();
        st.pending.is_empty() && st.unsent() == 0
    }

    pub(super) fn lock(&self) -> SinkGuard<'_> {
        SinkGuard(lock(&self.state))
    }

    /// What this connection holds in memory (see `SinkState::held`).
    pub(super) fn held(&self) -> usize {
        self.lock().held()
    }

    pub(super) fn register(&self, idx: u64, p: Pending) {
        self.lock().insert_pending(idx, p);
    }

    /// Takes back a registration whose request never reached the core.
    pub(super) fn unregister(&self, idx: u64) {
        self.lock().remove_pending(idx);
    }

    /// Request `idx` will get no reply, whatever the core answers (see `Pending::abandoned`).
    pub(super) fn abandon(&self, idx: u64) {
        if let Some(p) = self.lock().pending.get_mut(&idx) {
            p.abandoned = true;
        }
    }

    pub(super) fn reader_finished(&self) {
        self.lock().reader_done = true;
        self.wake.notify_one();
    }

    /// An answer decided without the core (validation errors, no-ops).
    pub(super) fn direct(self: &Arc<Self>, cookie: u64, command: Command, error: u32) {
        let mut st = self.lock();
        encode_reply(
            &mut st.out,
            self.structured,
            cookie,
            command,
            0,
            error,
            None,
        );
        self.emit(st);
    }

    pub(super) fn block_status(
        self: &Arc<Self>,
        cookie: u64,
        context: u32,
        extents: &[(u32, u32)],
    ) {
        let mut st = self.lock();
        chunk_block_status(&mut st.out, cookie, context, extents, true);
        self.emit(st);
    }

    /// The core's answer for request `idx`.
    fn reply(self: &Arc<Self>, idx: u64, result: Result<Option<Bytes>, u32>) {
        let mut st = self.lock();
        let Some(p) = st.remove_pending(idx) else {
            tracing::error!("conn {}: reply for unknown request {idx}", self.conn);
            return;
        };
        if p.abandoned {
            tracing::debug!("conn {}: request {idx} abandoned; no reply", self.conn);
            if st.reader_done && st.pending.is_empty() {
                self.wake.notify_one();
            }
            return;
        }
        let structured = self.structured;
        match result {
            Ok(Some(data)) => {
                encode_reply(
                    &mut st.out,
                    structured,
                    p.cookie,
                    p.command,
                    p.offset,
                    0,
                    Some(data.len()),
                );
                if data.len() >= ZERO_COPY_MIN {
                    st.push_data(data);
                } else {
                    st.out.extend_from_slice(&data);
                }
            }
            Ok(None) | Err(_) => encode_reply(
                &mut st.out,
                structured,
                p.cookie,
                p.command,
                p.offset,
                result.err().unwrap_or(0),
                None,
            ),
        }
        if st.reader_done && st.pending.is_empty() {
            self.wake.notify_one();
        }
        self.emit(st);
    }

    /// Sends what was just encoded now, or at the end of this thread's batch.
    fn emit(self: &Arc<Self>, mut st: SinkGuard<'_>) {
        if st.writer_owns || st.broken {
            if st.broken {
                st.discard_output();
            }
            return;
        }
        if st.unsent() < CORK_MAX && cork::hold(self) {
            return;
        }
        self.send_now(&mut st);
    }

    /// Sends unsent output without blocking; if the socket fills up, the writer task takes over.
    pub(super) fn send_now(&self, st: &mut SinkState) {
        if st.writer_owns || st.broken || st.unsent() == 0 {
            return;
        }
        match self.push_out(st) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                st.writer_owns = true;
                self.wake.notify_one();
            }
            Err(e) => self.break_off(st, &e),
        }
    }

    pub(super) fn break_off(&self, st: &mut SinkState, e: &io::Error) {
        tracing::debug!("NBD conn {}: send failed: {e}", self.conn);
        st.broken = true;
        st.discard_output();
        self.wake.notify_one();
    }

    /// Sends unsent output until all of it is out (Ok) or the socket is full (WouldBlock).
    pub(super) fn push_out(&self, st: &mut SinkState) -> io::Result<()> {
        while st.unsent() > 0 {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOV];
            let mut n = 0;
            for chunk in st.queue.iter().take(MAX_IOV) {
                iov[n] = libc::iovec {
                    iov_base: chunk.as_ptr() as *mut libc::c_void,
                    iov_len: chunk.len(),
                };
                n += 1;
            }
            if n < MAX_IOV && !st.out.is_empty() {
                iov[n] = libc::iovec {
                    iov_base: st.out.as_ptr() as *mut libc::c_void,
                    iov_len: st.out.len(),
                };
                n += 1;
            }
            // SAFETY: a zeroed msghdr is valid; it points at `n` iovecs over buffers that the
            // state (locked by our caller) keeps alive and unchanged during the call.
            let sent = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = n as _;
                libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if sent < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            st.consume(sent as usize);
        }
        Ok(())
    }
}
