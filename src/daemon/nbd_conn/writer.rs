//! A connection's writer task: it sends only what the socket could not take at once.

use std::io;
use std::sync::Arc;

use tokio::io::Interest;

use super::sink::ConnSink;
use crate::daemon::socket::NbdStream;

/// Sends what the socket could not take at once, then ends the connection's output when the
/// reader is gone and every request is answered.
pub(super) async fn write_loop<S: NbdStream>(stream: Arc<S>, sink: Arc<ConnSink>) {
    loop {
        let notified = sink.wake.notified();
        let owns = {
            let st = sink.lock();
            if st.finished() {
                break;
            }
            st.writer_owns && !st.broken
        };
        if !owns {
            notified.await;
            continue;
        }
        if let Err(e) = stream.wait_writable().await {
            sink.break_off(&mut sink.lock(), &e);
            continue;
        }
        let mut st = sink.lock();
        match stream.io_op(Interest::WRITABLE, || sink.push_out(&mut st)) {
            Ok(()) => st.writer_owns = false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => sink.break_off(&mut st, &e),
        }
    }
    let st = sink.lock();
    if !st.broken && !st.keep_open {
        drop(st);
        // SAFETY: plain syscall on the socket, which `sink` keeps open.
        unsafe { libc::shutdown(sink.fd, libc::SHUT_WR) };
    }
}
