//! Replies held back while a thread runs a batch (`disk_io::batch`), sent together when it
//! ends: one `sendmsg` per connection instead of one per reply.

use std::cell::RefCell;
use std::sync::Arc;

use super::sink::ConnSink;

thread_local! {
    /// Sinks with replies held back until this thread's batch ends; Some inside a batch.
    static CORK: RefCell<Option<Vec<Arc<ConnSink>>>> = const { RefCell::new(None) };
}

/// While alive (on this thread, never across an await), replies are held back and sent
/// together when the outermost `Cork` drops.
pub(crate) struct Cork {
    outer: bool,
}

impl Cork {
    pub(crate) fn new() -> Cork {
        let outer = CORK.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_some() {
                false
            } else {
                *c = Some(Vec::new());
                true
            }
        });
        Cork { outer }
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let sinks = CORK.with(|c| c.borrow_mut().take()).unwrap_or_default();
        for sink in sinks {
            let mut st = sink.lock();
            sink.send_now(&mut st);
        }
    }
}

/// Inside a batch: notes that `sink` has replies held back (sent when the batch ends) and
/// returns true. Outside one: false, the caller sends now.
pub(super) fn hold(sink: &Arc<ConnSink>) -> bool {
    CORK.with(|c| match c.borrow_mut().as_mut() {
        Some(list) => {
            if !list.iter().any(|s| Arc::ptr_eq(s, sink)) {
                list.push(sink.clone());
            }
            true
        }
        None => false,
    })
}
