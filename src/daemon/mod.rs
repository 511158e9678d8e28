//! The tokio edge: NBD listener, peer link, control socket, metadata writer,
//! signals. It feeds the node core events and carries out its actions; it
//! makes no replication decision of its own.

mod adjust;
mod backpressure;
mod control;
mod disk_io;
mod exclusive;
pub mod handover;
mod meta_writer;
pub mod metrics;
mod nbd_conn;
pub mod notify;
mod peer_link;
mod peer_spin;
mod peer_tls;
pub mod setup;
mod socket;
mod splice;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, oneshot, Notify};

use crate::config::Settings;
use crate::core::{Action, AdminCmd, ConnId, DiskOp, Event, Node};
use crate::storage::engine::Disk;
use meta_writer::MetaWriter;
use nbd_conn::ConnSink;

/// Largest NBD request payload we accept (and advertise as the maximum block size).
pub const MAX_IO: u32 = 32 << 20;

/// State shared by every task of the daemon.
pub struct Shared {
    /// The settings mirrord started with; `live` holds what `mirrorctl adjust` changed since.
    pub settings: Settings,
    live: Mutex<Settings>,
    core: Mutex<Node>,
    pub disk: Disk,
    meta: Mutex<Option<MetaWriter>>,
    conns: Mutex<HashMap<ConnId, Arc<ConnSink>>>,
    peer: Mutex<peer_link::PeerCtl>,
    peer_wake: Notify,
    admin: Mutex<HashMap<u64, oneshot::Sender<Result<String, String>>>>,
    next_admin: AtomicU64,
    next_conn: AtomicU64,
    pub events: broadcast::Sender<String>,
    started: Instant,
    stopping: AtomicBool,
    stop_tx: tokio::sync::watch::Sender<bool>,
    /// NBD request loops still running (`ReaderRunning`). Once the stop signal is sent each
    /// ends soon: at once between two requests, or after reading the rest of the request
    /// it has begun (bounded by its grace) and handing it to the core. Until then the core
    /// may not know that request (a buffered payload is not one until it is complete), so
    /// a stop waits for this to reach 0 as well as for the core's requests.
    readers: AtomicUsize,
    /// Test instrumentation: with `MIRRORD_DISK_TRACE=FILE`, every completed
    /// flush and write is appended to FILE as it completes (proof of what reached the disk).
    disk_trace: Option<Mutex<std::fs::File>>,
    pub stop_rx: tokio::sync::watch::Receiver<bool>,
    /// A planned restart is under way: readers stop at a request boundary and park their
    /// sockets in `handed` (handover.rs).
    handing_over: AtomicBool,
    /// Connections ready for the next process, with their duplicated sockets.
    handed: Mutex<Vec<(handover::Client, OwnedFd)>>,
    /// Taken by the first `mirrorctl restart`: the binary to run next.
    restart_tx: Mutex<Option<oneshot::Sender<PathBuf>>>,
    /// The binary this process was started from (the default for a restart).
    exe: Option<PathBuf>,
    /// Prometheus counters, fed from the events and actions passing through here. Always
    /// counting (measured within noise: 7.4 vs 7.5 µs per request), so an endpoint that
    /// `mirrorctl adjust` turns on serves the counts since start.
    metrics: metrics::Metrics,
    /// The metrics endpoint's task while one serves (`[metrics] listen`; adjust moves it).
    metrics_server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge the daemon: take the data as it is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn core(&self) -> MutexGuard<'_, Node> {
        lock(&self.core)
    }

    /// The handlers as now configured (`mirrorctl adjust` may change them).
    pub fn handlers(&self) -> crate::config::Handlers {
        lock(&self.live).handlers.clone()
    }

    /// The net settings as now configured (`mirrorctl adjust` may change them).
    pub fn net(&self) -> crate::config::NetSettings {
        lock(&self.live).net.clone()
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Feeds one event to the core and carries out what it asks.
    pub fn handle(self: &Arc<Self>, ev: Event) {
        self.handle_many(std::iter::once(ev));
    }

    /// Feeds several events under one lock.
    pub fn handle_many(self: &Arc<Self>, evs: impl IntoIterator<Item = Event>) {
        let mut actions = Vec::new();
        {
            let mut core = self.core();
            for ev in evs {
                self.metrics.event(&ev);
                core.handle(ev);
            }
            core.drain_actions(&mut actions);
            // Peer messages and metadata writes keep the core's order: queue them under the lock.
            self.dispatch_ordered(&mut actions);
        }
        self.dispatch(actions);
    }

    /// Runs `f` on the core and carries out the actions it produced.
    pub fn with_core<R>(self: &Arc<Self>, f: impl FnOnce(&mut Node) -> R) -> R {
        let mut actions = Vec::new();
        let r = {
            let mut core = self.core();
            let r = f(&mut core);
            core.drain_actions(&mut actions);
            self.dispatch_ordered(&mut actions);
            r
        };
        self.dispatch(actions);
        r
    }

    /// Feeds one event whose answer the caller waits for ([`Event::ClientAttach`],
    /// [`Event::StreamWrite`]): returns the answer ([`Action::Attached`],
    /// [`Action::StreamWrite`]) and carries out the other actions.
    pub fn ask(self: &Arc<Self>, ev: Event) -> Action {
        let mut actions = Vec::new();
        let answer = {
            let mut core = self.core();
            core.handle(ev);
            core.drain_actions(&mut actions);
            let at = actions
                .iter()
                .position(|a| matches!(a, Action::Attached { .. } | Action::StreamWrite { .. }));
            let answer = at.map(|i| actions.remove(i));
            self.dispatch_ordered(&mut actions);
            answer
        };
        self.dispatch(actions);
        answer.expect("the core answers every ClientAttach and StreamWrite")
    }

    /// [`Event::ClientAttach`]: Ok if this node serves the client.
    pub fn attach_client(self: &Arc<Self>, conn: ConnId) -> Result<(), String> {
        match self.ask(Event::ClientAttach { conn }) {
            Action::Attached { conn: c, result } if c == conn => result,
            other => unreachable!("ClientAttach {conn} answered with {other:?}"),
        }
    }

    fn dispatch_ordered(&self, actions: &mut Vec<Action>) {
        for a in actions.iter() {
            self.metrics.action(a);
        }
        actions.retain_mut(|a| match a {
            Action::Send { link, msg } => {
                lock(&self.peer).send(*link, std::mem::replace(msg, crate::peer::Message::Ping));
                false
            }
            Action::Persist { id, write } => {
                if let Some(w) = lock(&self.meta).as_ref() {
                    w.submit(*id, write.clone());
                }
                false
            }
            Action::Notify(v) => {
                let line = v.to_string();
                tracing::info!(target: "nbd_mirror::events", "{line}");
                let _ = self.events.send(line);
                false
            }
            _ => true,
        });
    }

    fn dispatch(self: &Arc<Self>, actions: Vec<Action>) {
        // Peer messages queued under the core lock leave now, from this thread.
        peer_link::flush_queued();
        for a in actions {
            match a {
                Action::Disk { id, op } => self.submit_disk(id, op),
                Action::Reply {
                    conn,
                    cookie,
                    result,
                } => nbd_conn::deliver(self, conn, cookie, result),
                Action::AdminReply { id, result } => {
                    if let Some(tx) = lock(&self.admin).remove(&id) {
                        let _ = tx.send(result);
                    }
                }
                Action::Dial => {
                    lock(&self.peer).want_dial();
                    self.peer_wake.notify_one();
                }
                Action::CloseConn { link, reason } => {
                    tracing::info!("closing peer connection {link}: {reason}");
                    lock(&self.peer).close(link);
                }
                Action::SplitBrainHandler => self.run_handler("split-brain"),
                Action::FencePeer { id } => self.run_fence_peer(id),
                Action::Send { .. } | Action::Persist { .. } | Action::Notify(_) => {
                    unreachable!("dispatched under the core lock")
                }
                Action::Attached { .. } | Action::StreamWrite { .. } => {
                    unreachable!("answers are taken by Shared::ask")
                }
            }
        }
    }

    /// Admission of a spliced write ([`Event::StreamWrite`]): the core's disk op id, or
    /// None when it must come as a plain request. Counted like any NBD write.
    fn try_stream_write(
        self: &Arc<Self>,
        conn: ConnId,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> Option<u64> {
        self.metrics.stream_write_started(conn, cookie, len);
        let answer = self.ask(Event::StreamWrite {
            conn,
            cookie,
            offset,
            len,
        });
        let Action::StreamWrite {
            conn: c,
            cookie: k,
            disk_id,
        } = answer
        else {
            unreachable!("StreamWrite answered with {answer:?}");
        };
        assert_eq!((c, k), (conn, cookie), "the answer to another write");
        if disk_id.is_none() {
            self.metrics.stream_write_refused(conn, cookie);
        }
        disk_id
    }

    fn submit_disk(self: &Arc<Self>, id: u64, op: DiskOp) {
        disk_io::submit(self, id, op);
    }

    /// Runs the fence-peer handler on its own thread; its exit code goes back
    /// to the core as [`Event::FenceDone`].
    fn run_fence_peer(self: &Arc<Self>, id: u64) {
        let Some(path) = self.handlers().fence_peer else {
            // Config validation requires the handler whenever fencing is on.
            self.handle(Event::FenceDone { id, exit: None });
            return;
        };
        tracing::warn!(
            "peer lost: writes frozen, calling fence-peer handler {}",
            path.display()
        );
        let mut cmd = std::process::Command::new(&path);
        cmd.env("RESOURCE", &self.settings.resource)
            .env("NODE", &self.settings.node().name)
            .env(
                "PEER",
                self.settings.peer().map(|p| p.name.as_str()).unwrap_or(""),
            )
            .env(
                "PEER_ADDRESS",
                self.settings
                    .peer()
                    .and_then(|p| p.address)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            )
            .stdin(std::process::Stdio::null());
        let me = self.clone();
        std::thread::spawn(move || {
            let exit = match cmd.status() {
                Ok(st) => {
                    tracing::info!("fence-peer handler {} exited: {st}", path.display());
                    st.code()
                }
                Err(e) => {
                    tracing::error!("cannot run fence-peer handler {}: {e}", path.display());
                    None
                }
            };
            if !matches!(exit, Some(3..=7)) {
                tracing::error!(
                    "fence-peer handler failed ({exit:?}); writes stay frozen until the peer \
                     reconnects or `mirrorctl resume-io`"
                );
            }
            me.handle(Event::FenceDone { id, exit });
        });
    }

    fn run_handler(&self, which: &str) {
        let handlers = self.handlers();
        let path = match which {
            "split-brain" => handlers.split_brain,
            _ => handlers.fence_peer,
        };
        let Some(path) = path else { return };
        let res = std::process::Command::new(&path)
            .env("RESOURCE", &self.settings.resource)
            .env("NODE", &self.settings.node().name)
            .env(
                "PEER",
                self.settings.peer().map(|p| p.name.as_str()).unwrap_or(""),
            )
            .spawn();
        match res {
            Ok(mut child) => {
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
            }
            Err(e) => tracing::error!("cannot run {which} handler {}: {e}", path.display()),
        }
    }

    /// Sends an operator command to the core and waits for its answer.
    pub async fn admin(self: &Arc<Self>, cmd: AdminCmd) -> Result<String, String> {
        let id = self.next_admin.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.admin).insert(id, tx);
        self.handle(Event::Admin { id, cmd });
        rx.await
            .unwrap_or_else(|_| Err("the daemon is shutting down".into()))
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    pub fn is_handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Relaxed)
    }

    /// Counts an NBD request loop in [`Shared::readers`] until the guard drops, on every
    /// path out of the loop (an error or a panic included).
    fn reader_running(&self) -> ReaderRunning<'_> {
        self.readers.fetch_add(1, Ordering::SeqCst);
        ReaderRunning(self)
    }

    /// Every NBD request loop has ended and the core has answered every request: nothing
    /// a client sent (and the daemon read) is left unanswered.
    fn clients_drained(&self) -> bool {
        // Readers first: each hands the core what it read before it ends, so once they are
        // all gone the core's view is complete.
        self.readers.load(Ordering::SeqCst) == 0 && self.core().stop_ready()
    }

    /// `mirrorctl restart`: checks that it can be done now and starts it.
    pub fn request_restart(&self, exe: Option<PathBuf>) -> Result<String, String> {
        let exe = exe
            .or_else(|| self.exe.clone())
            .ok_or("cannot tell which binary this process runs; name one with --exe")?;
        handover::check_exe(&exe)?;
        if self.core().status().suspended {
            return Err(
                "writes are frozen by fencing: a restart now would have to fail them. End the \
                 freeze first (the fence-peer handler, the peer's return, or `mirrorctl \
                 resume-io`), then restart"
                    .into(),
            );
        }
        let tx = lock(&self.restart_tx)
            .take()
            .ok_or("a restart or stop is already under way")?;
        tx.send(exe.clone())
            .map_err(|_| "the daemon is stopping".to_string())?;
        Ok(format!(
            "restarting into {}: answering requests already read, then handing over the \
             NBD connections",
            exe.display()
        ))
    }
}

/// One running NBD request loop, counted in [`Shared::readers`] while it lives.
struct ReaderRunning<'a>(&'a Shared);

impl Drop for ReaderRunning<'_> {
    fn drop(&mut self) {
        let before = self.0.readers.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "more readers ended than started");
    }
}

/// How a serving daemon ended.
enum Outcome {
    Stopped,
    /// Hand these descriptors (every one named in `state`) on.
    Restart {
        next: Next,
        state: handover::State,
        keep: Vec<OwnedFd>,
    },
}

/// Who gets the NBD connections at a hand-over.
enum Next {
    /// `mirrorctl restart`: this process, re-executed as this binary.
    Exec(PathBuf),
    /// SIGTERM under systemd with the fd store: the next start of the service.
    FdStore,
}

/// How long a restart waits for the requests already read to be answered, unless writes are
/// frozen by fencing (then it waits for the freeze to end: a restart fails no frozen request).
const HANDOVER_DRAIN: Duration = Duration::from_secs(120);

/// How long a stop (without a hand-over) waits for the clients' requests to be read to their
/// end and answered: a write waiting for the peer's ack completes or the peer is declared
/// dead by then.
const STOP_DRAIN: Duration = Duration::from_secs(20);

/// Runs `mirrord` for one resource until SIGTERM/SIGINT, or until `mirrorctl restart`
/// replaces it with a new process image.
pub fn run(settings: Settings) -> Result<(), String> {
    let (resource, node) = (settings.resource.as_str(), settings.node().name.as_str());
    // From `mirrorctl restart` (an exec), or from systemd's fd store (`systemctl restart`).
    let stored = handover::take_listen_fds().filter(|v| !v.is_empty());
    let inherited = handover::take_inherited(resource, node).or_else(|| {
        stored
            .as_ref()
            .map(|got| handover::from_fd_store(got, resource, node))
    });
    // Our copies are taken: systemd closes its own, so a later crash closes the clients'
    // connections (the kernel sees a dead link, not a hung one).
    for (name, _) in stored.iter().flatten() {
        notify::remove_stored(name);
    }
    let mut spare = None;
    let inherited = match inherited {
        None => None,
        Some(Ok(st)) => {
            handover::set_cloexec(&st);
            Some(st)
        }
        Some(Err(e)) => {
            tracing::error!("{e}; starting fresh: every inherited connection is closed");
            match &stored {
                // Named: the listeners are kept (connections waiting in their backlog are
                // served, and systemd's copies no longer look like another daemon's).
                Some(got) => spare = handover::close_all_but_listeners(got),
                None => handover::close_inherited(),
            }
            None
        }
    };
    // Before anything is written or bound; held until the process exits (or handed on:
    // the lock belongs to the open file, which the next process inherits).
    let (locks, inherited) = match inherited {
        None => (exclusive::lock_disks(&settings)?, None),
        Some(st) => match exclusive::adopt_locks(&settings, &st.locks) {
            Ok(l) => (l, Some(st)),
            Err(e) => {
                tracing::error!("{e}; starting fresh: every inherited connection is closed");
                handover::close_inherited();
                (exclusive::lock_disks(&settings)?, None)
            }
        },
    };
    let opened = setup::open(&settings)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("mirrord")
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    match rt.block_on(serve(settings, opened, inherited, spare, locks.fds()))? {
        Outcome::Stopped => Ok(()),
        Outcome::Restart {
            next: Next::FdStore,
            state,
            keep,
        } => {
            rt.shutdown_timeout(Duration::from_secs(2));
            // systemd keeps copies; ours close as the process exits.
            let stored = handover::store(&state);
            drop(keep);
            stored.map(|()| {
                tracing::info!(
                    "{} NBD connection(s) handed to systemd's fd store; stopped",
                    state.clients.len()
                )
            })
        }
        Outcome::Restart {
            next: Next::Exec(exe),
            state,
            keep,
        } => {
            rt.shutdown_timeout(Duration::from_secs(2));
            tracing::info!(
                "executing {} with {} NBD connection(s) handed over",
                exe.display(),
                state.clients.len()
            );
            let e = handover::exec(&exe, &state, &keep);
            // The clients' sockets close as this process exits: they see a dead link.
            drop(locks);
            Err(format!("restart failed after the hand-over: {e}"))
        }
    }
}

async fn serve(
    settings: Settings,
    opened: setup::Opened,
    inherited: Option<handover::State>,
    spare: Option<(OwnedFd, OwnedFd)>,
    lock_fds: Vec<std::os::fd::RawFd>,
) -> Result<Outcome, String> {
    let setup::Opened {
        store,
        loaded,
        disk,
    } = opened;
    let data_size = store.layout().data_size;
    let cfg = setup::core_config(&settings, data_size, loaded.superblock.al_slots, MAX_IO);
    let seed = crate::storage::meta::new_generation_id().map_err(|e| e.to_string())?;
    let node = Node::new(
        cfg,
        setup::meta_state(&loaded),
        &loaded.bitmap,
        &loaded.active_extents,
        seed,
    );
    tracing::info!(
        "resource {} node {}: disk {} ({} bytes, engine {}), metadata {}",
        settings.resource,
        settings.node().name,
        settings.node().disk.display(),
        data_size,
        disk.engine(),
        setup::meta_location(&settings).path().display()
    );
    if settings.insecure_no_secret && settings.peer().is_some() {
        tracing::warn!(
            "insecure-no-secret = true: the peer link is not authenticated; anyone who can reach \
             {} can join this resource's replication (make a secret with `mirrorctl gen-secret`)",
            settings
                .node()
                .address
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
    }
    let (events, _) = broadcast::channel(1024);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (restart_tx, restart_rx) = oneshot::channel();
    let template = loaded.superblock.clone();
    let shared = Arc::new(Shared {
        core: Mutex::new(node),
        disk,
        meta: Mutex::new(None),
        conns: Mutex::new(HashMap::new()),
        peer: Mutex::new(peer_link::PeerCtl::default()),
        peer_wake: Notify::new(),
        admin: Mutex::new(HashMap::new()),
        next_admin: AtomicU64::new(1),
        next_conn: AtomicU64::new(1),
        events,
        started: Instant::now(),
        stopping: AtomicBool::new(false),
        readers: AtomicUsize::new(0),
        stop_tx,
        stop_rx,
        disk_trace: std::env::var_os("MIRRORD_DISK_TRACE")
            .and_then(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok()
            })
            .map(Mutex::new),
        live: Mutex::new(settings.clone()),
        settings,
        handing_over: AtomicBool::new(false),
        handed: Mutex::new(Vec::new()),
        restart_tx: Mutex::new(Some(restart_tx)),
        exe: handover::own_exe(),
        metrics: metrics::Metrics::new(true),
        metrics_server: Mutex::new(None),
    });
    let weak = Arc::downgrade(&shared);
    let writer = MetaWriter::start(store, template, move |ev| {
        if let Some(s) = weak.upgrade() {
            s.handle(ev);
        }
    });
    *lock(&shared.meta) = Some(writer);
    // Actions the core produced while starting (replayed log, connect).
    shared.with_core(|_| ());

    std::fs::create_dir_all(&shared.settings.run_dir).map_err(|e| {
        format!(
            "cannot create run-dir {}: {e}",
            shared.settings.run_dir.display()
        )
    })?;
    let taken = match (inherited, spare) {
        (Some(st), _) => Some(take_over(&shared, st).await),
        (None, Some((nbd, ctl))) => Some(inherited_listeners(&shared, nbd, ctl)),
        (None, None) => None,
    };
    let (nbd_listener, ctl_listener) = match taken {
        Some(Ok(l)) => l,
        Some(Err(e)) => {
            tracing::error!("{e}; starting fresh");
            bind_listeners(&shared).await?
        }
        None => bind_listeners(&shared).await?,
    };
    // Copies the accept loops do not own: a restart hands them on after those loops end.
    let listen_fds = (
        handover::dup(nbd_listener.as_raw_fd())?,
        handover::dup(ctl_listener.as_raw_fd())?,
    );
    // Accept loops stop first at shutdown; the peer link and the ticker keep
    // running while in-flight requests drain (a write may wait for the peer's
    // ack, or for a ping timeout to declare the peer dead).
    let mut accepts = tokio::task::JoinSet::new();
    accepts.spawn(nbd_conn::accept_loop(shared.clone(), nbd_listener));
    accepts.spawn(control::accept_loop(shared.clone(), ctl_listener));
    let mut tasks = tokio::task::JoinSet::new();
    if shared.settings.peer().is_some() {
        tasks.spawn(peer_link::run(shared.clone()));
    }
    tasks.spawn(tick_loop(shared.clone()));
    if let Some(addr) = shared.settings.metrics_listen {
        // A failure to listen is logged, not fatal: the data path does not depend on
        // metrics (Prometheus's `up` shows the endpoint missing).
        match metrics::server::bind(addr) {
            Ok(listener) => {
                shared.serve_metrics(Some((addr, listener)));
            }
            Err(e) => tracing::error!("{e}; serving without metrics"),
        }
    }
    tracing::info!(
        "serving NBD export {} on {}",
        shared.settings.resource,
        shared.settings.nbd_listen
    );
    notify::notify("READY=1");

    let restart = wait_for_stop(restart_rx).await;
    // No second restart once this stop has begun.
    lock(&shared.restart_tx).take();
    match &restart {
        Some(Next::Exec(exe)) => {
            tracing::info!("restarting into {}: handing over", exe.display());
            shared.handing_over.store(true, Ordering::Relaxed);
        }
        Some(Next::FdStore) => {
            tracing::info!("stopping: handing the NBD connections to systemd's fd store");
            notify::notify("STOPPING=1");
            shared.handing_over.store(true, Ordering::Relaxed);
        }
        None => {
            tracing::info!("shutting down");
            notify::notify("STOPPING=1");
        }
    }
    shared.stopping.store(true, Ordering::Relaxed);
    let _ = shared.stop_tx.send(true);
    accepts.abort_all();
    // A stop closes the listeners now (connections are refused, as before); a hand-over
    // keeps them, so new connections wait in the backlog for the next process.
    let listen_fds = if restart.is_some() {
        Some(listen_fds)
    } else {
        drop(listen_fds);
        None
    };
    if restart.is_some() {
        drain_for_handover(&shared).await;
    } else {
        shared.handle(Event::StopBegin);
        drain_for_stop(&shared).await;
    }
    tasks.abort_all();
    if let Some(old) = shared.serve_metrics(None) {
        // Aborted: ends at once, and its port is closed before a next process binds it.
        let _ = old.await;
    }
    // The data first, then the metadata that says it is safe (the activity
    // log is emptied only once every local write is on the medium).
    let flushed = match shared.disk.run(crate::storage::engine::DiskOp::Flush).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!("flush before shutdown failed (the activity log is kept): {e}");
            false
        }
    };
    shared.handle(Event::StopFinal {
        data_flushed: flushed,
    });
    if let Err(e) = shared.disk.run(crate::storage::engine::DiskOp::Flush).await {
        tracing::error!("final flush failed: {e}");
    }
    let writer = lock(&shared.meta).take();
    if let Some(w) = writer {
        tokio::task::spawn_blocking(move || w.finish()).await.ok();
    }
    lock(&shared.peer).close_all();
    shared.disk.shutdown();
    if let Some(next) = restart {
        let fds = listen_fds.expect("a hand-over keeps the listeners");
        return handover_outcome(&shared, next, fds, &lock_fds);
    }
    let _ = std::fs::remove_file(shared.settings.control_socket());
    if let crate::config::Listen::Unix(p) = &shared.settings.nbd_listen {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("stopped cleanly");
    Ok(Outcome::Stopped)
}

/// At start after a restart: the listeners and NBD connections the previous process handed
/// over. Its clients are attached again (re-promoting first if the old process was primary by
/// `mirrorctl primary`); one that cannot be is closed.
async fn take_over(
    shared: &Arc<Shared>,
    st: handover::State,
) -> Result<(nbd_conn::Listener, tokio::net::UnixListener), String> {
    // SAFETY (all three from_raw_fd below): `State::decode` checked that the descriptors are
    // open, distinct and of the right kind; each is taken once.
    let clients: Vec<(handover::Client, OwnedFd)> = st
        .clients
        .iter()
        .map(|c| (c.clone(), unsafe { OwnedFd::from_raw_fd(c.fd) }))
        .collect();
    let (nbd, ctl) = unsafe {
        (
            OwnedFd::from_raw_fd(st.nbd_listener),
            OwnedFd::from_raw_fd(st.ctl_listener),
        )
    };
    let listeners = inherited_listeners(shared, nbd, ctl).map_err(|e| {
        // `clients` drops here: their connections close.
        format!(
            "{e}; the {} inherited NBD connection(s) are closed",
            clients.len()
        )
    })?;
    if st.primary && !shared.settings.auto_promote {
        if let Err(e) = shared.admin(AdminCmd::Primary { force: false }).await {
            tracing::error!("cannot become primary again after the restart: {e}");
        }
    }
    let size = shared.disk.size();
    let mut next = 0;
    for (c, fd) in clients {
        next = next.max(c.conn + 1);
        let attached = if c.size != size {
            Err(format!(
                "it negotiated size {} and the export now has {size}",
                c.size
            ))
        } else {
            shared.attach_client(c.conn)
        };
        let conn = c.conn;
        if let Err(e) = attached.and_then(|()| nbd_conn::spawn_handed(shared, c, fd)) {
            tracing::error!("inherited NBD connection {conn} is closed: {e}");
            shared.handle(Event::ClientDetach { conn });
        }
    }
    shared.next_conn.fetch_max(next, Ordering::Relaxed);
    Ok(listeners)
}

/// The NBD and control listeners a previous process handed over, if they listen where the
/// config says.
fn inherited_listeners(
    shared: &Shared,
    nbd: OwnedFd,
    ctl: OwnedFd,
) -> Result<(nbd_conn::Listener, tokio::net::UnixListener), String> {
    Ok((
        nbd_conn::Listener::inherited(&shared.settings.nbd_listen, nbd)?,
        control::inherited(&shared.settings.control_socket(), ctl)?,
    ))
}

async fn bind_listeners(
    shared: &Shared,
) -> Result<(nbd_conn::Listener, tokio::net::UnixListener), String> {
    Ok((
        nbd_conn::bind(&shared.settings.nbd_listen).await?,
        control::bind(&shared.settings.control_socket())?,
    ))
}

/// A stop lets the clients' requests finish (bounded by `STOP_DRAIN`): each reader ends at a
/// request boundary, after reading the rest of a request it had begun (a client in the middle
/// of a payload finishes its write), and the core answers what they read. A running resync
/// does not hold the stop up: its progress is persisted and it resumes later.
async fn drain_for_stop(shared: &Shared) {
    let deadline = Instant::now() + STOP_DRAIN;
    loop {
        if shared.clients_drained() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::error!(
                "stop: {} NBD reader(s) still in a request, or requests unanswered, after \
                 {STOP_DRAIN:?}; stopping anyway (those requests get no answer)",
                shared.readers.load(Ordering::SeqCst)
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A restart waits until every request read from the sockets is answered and every
/// connection is parked at a request boundary: bounded by `HANDOVER_DRAIN`, except while
/// writes are frozen by fencing (those wait for the freeze to end, never failed by a restart).
async fn drain_for_handover(shared: &Arc<Shared>) {
    let start = Instant::now();
    let mut last_log = start;
    loop {
        // Every reader has ended and the core is idle (`clients_drained`), and every
        // connection is parked (its socket in `handed`, or closed).
        let idle = shared.clients_drained() && lock(&shared.conns).is_empty();
        if idle {
            return;
        }
        let frozen = shared.core().status().suspended;
        if !frozen && start.elapsed() >= HANDOVER_DRAIN {
            tracing::error!(
                "restart: requests still unanswered after {HANDOVER_DRAIN:?}; handing over \
                 anyway (the kernel's request timeout resends them)"
            );
            return;
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::warn!(
                "restart: waiting for {} connection(s) to answer what they read{}",
                lock(&shared.conns).len(),
                if frozen {
                    " (writes are frozen by fencing)"
                } else {
                    ""
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The state and descriptors the next process gets.
fn handover_outcome(
    shared: &Arc<Shared>,
    next: Next,
    (nbd, ctl): (OwnedFd, OwnedFd),
    lock_fds: &[std::os::fd::RawFd],
) -> Result<Outcome, String> {
    let mut keep = Vec::new();
    let mut locks = Vec::new();
    for &fd in lock_fds {
        let d = handover::dup(fd)?;
        locks.push(d.as_raw_fd());
        keep.push(d);
    }
    let mut clients = Vec::new();
    for (c, fd) in std::mem::take(&mut *lock(&shared.handed)) {
        clients.push(c);
        keep.push(fd);
    }
    let state = handover::State {
        version: handover::VERSION,
        resource: shared.settings.resource.clone(),
        node: shared.settings.node().name.clone(),
        primary: shared.core().role() == crate::core::Role::Primary,
        nbd_listener: nbd.as_raw_fd(),
        ctl_listener: ctl.as_raw_fd(),
        locks,
        clients,
    };
    keep.push(nbd);
    keep.push(ctl);
    tracing::info!(
        "hand-over ready: {} NBD connection(s), metadata persisted",
        state.clients.len()
    );
    Ok(Outcome::Restart { next, state, keep })
}

impl Shared {
    /// Serves the metrics endpoint on `new` (bound already to its address), or on nothing,
    /// in place of the endpoint now serving. Returns the replaced endpoint's task, aborted:
    /// its port is closed once that task has ended (await or block on it). Must run inside
    /// the runtime (an async task or its blocking pool).
    fn serve_metrics(
        self: &Arc<Self>,
        new: Option<(std::net::SocketAddr, tokio::net::TcpListener)>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let task = new.map(|(addr, listener)| {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    "metrics on {addr}: a non-loopback address; anyone who reaches it can read \
                     this resource's state (the endpoint has no authentication)"
                );
            }
            tracing::info!("serving metrics on http://{addr}/metrics");
            let me = self.clone();
            let render: metrics::server::Render = Arc::new(move || {
                // The core lock is held for the snapshot only, not while the text is written.
                let status = me.core().status();
                me.metrics.render(status)
            });
            tokio::spawn(metrics::server::run(listener, render))
        });
        let old = std::mem::replace(&mut *lock(&self.metrics_server), task);
        old.inspect(|t| t.abort())
    }
}

async fn tick_loop(shared: Arc<Shared>) {
    let mut iv = tokio::time::interval(Duration::from_millis(100));
    loop {
        iv.tick().await;
        let now_ms = shared.now_ms();
        shared.handle(Event::Tick { now_ms });
    }
}

/// Waits for SIGTERM/SIGINT (None: stop; with the fd store, SIGTERM hands over to it) or
/// `mirrorctl restart` (the binary to run).
async fn wait_for_stop(restart: oneshot::Receiver<PathBuf>) -> Option<Next> {
    use tokio::signal::unix::{signal, SignalKind};
    let restart = async move {
        match restart.await {
            Ok(exe) => exe,
            Err(_) => std::future::pending().await,
        }
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; running until killed or restarted");
        return Some(Next::Exec(restart.await));
    };
    tokio::select! {
        _ = term.recv() => notify::fd_store_enabled().then_some(Next::FdStore),
        _ = int.recv() => None,
        exe = restart => Some(Next::Exec(exe)),
    }
}
