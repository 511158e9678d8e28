//! Fallback backend: a fixed pool of threads doing blocking pread/pwrite/fallocate.
//! Used when io_uring is unavailable (old kernel, seccomp, io_uring_disabled) or asked for.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle, ThreadId};

use super::job::{self, Done, FileCtx, Job};
use super::sync_io;

/// Worker threads of the fallback engine. Enough to keep a QD32 workload's I/O in flight on a
/// real disk with O_DIRECT; buffered I/O on a 2-core machine is CPU-bound long before that.
pub(crate) const WORKERS: usize = 16;
const STACK_SIZE: usize = 256 * 1024;

struct Queue {
    jobs: VecDeque<(Job, Done)>,
    closed: bool,
    /// Workers blocked on the condvar; a submit only pays for a wake-up when this is > 0.
    idle: usize,
}

struct Shared {
    ctx: Arc<FileCtx>,
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Cleared when pwritev2(RWF_DSYNC) is unsupported (FUA then uses write + fdatasync).
    rwf_dsync_ok: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A poisoned queue only means a worker panicked outside a callback; the data is intact.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(crate) struct ThreadsEngine {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    ids: Vec<ThreadId>,
}

impl ThreadsEngine {
    /// Starts `workers` threads named `{name}-{i}`.
    pub(crate) fn start(
        ctx: Arc<FileCtx>,
        workers: usize,
        name: &str,
    ) -> io::Result<ThreadsEngine> {
        debug_assert!(workers > 0);
        let shared = Arc::new(Shared {
            ctx,
            queue: Mutex::new(Queue {
                jobs: VecDeque::with_capacity(256),
                closed: false,
                idle: 0,
            }),
            ready: Condvar::new(),
            rwf_dsync_ok: AtomicBool::new(true),
        });
        let count = workers;
        let mut workers = Vec::with_capacity(count);
        for i in 0..count {
            let shared2 = Arc::clone(&shared);
            let spawned = thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(STACK_SIZE)
                .spawn(move || worker(&shared2));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(err) => {
                    shutdown_workers(&shared, &mut workers);
                    return Err(err);
                }
            }
        }
        let ids = workers.iter().map(|h| h.thread().id()).collect();
        Ok(ThreadsEngine {
            shared,
            workers: Mutex::new(workers),
            ids,
        })
    }

    pub(crate) fn submit(&self, job: Job, done: Done) {
        let mut queue = self.shared.lock();
        if queue.closed {
            drop(queue);
            job::complete(done, Err(job::shut_down()));
            return;
        }
        queue.jobs.push_back((job, done));
        let wake = queue.idle > 0;
        drop(queue);
        if wake {
            self.shared.ready.notify_one();
        }
    }

    /// Lets the workers finish everything queued, then joins them. Idempotent. When called from
    /// a worker (a callback dropped the last handle) it only closes the queue.
    pub(crate) fn shutdown(&self) {
        if self.ids.contains(&thread::current().id()) {
            self.shared.lock().closed = true;
            self.shared.ready.notify_all();
            return;
        }
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        shutdown_workers(&self.shared, &mut workers);
    }
}

fn shutdown_workers(shared: &Shared, workers: &mut Vec<JoinHandle<()>>) {
    shared.lock().closed = true;
    shared.ready.notify_all();
    for handle in workers.drain(..) {
        if handle.join().is_err() {
            tracing::error!("disk worker thread panicked");
        }
    }
}

fn worker(shared: &Shared) {
    loop {
        let mut queue = shared.lock();
        let (job, done) = loop {
            if let Some(item) = queue.jobs.pop_front() {
                break item;
            }
            if queue.closed {
                return;
            }
            queue.idle += 1;
            queue = shared
                .ready
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
            queue.idle -= 1;
        };
        // Chain wake-ups: if more work is queued and others sleep, wake one more.
        let more = !queue.jobs.is_empty() && queue.idle > 0;
        drop(queue);
        if more {
            shared.ready.notify_one();
        }
        let result = sync_io::execute(&shared.ctx, &shared.rwf_dsync_ok, job);
        job::complete(done, result);
    }
}
