//! `mirrorctl adjust` in the daemon: reread the config file mirrord was started
//! with and apply the keys a running node takes (config/adjust.rs says which);
//! when any other key changed, change nothing and say which keys need a restart.

use std::sync::Arc;
use std::time::Duration;

use super::{lock, metrics, Shared};
use crate::config;

fn list(changes: &[config::adjust::Change]) -> String {
    changes
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Blocking (reads the file, may resolve host names): run it off the async workers.
pub fn adjust(shared: &Arc<Shared>, dry_run: bool) -> Result<String, String> {
    // Held throughout, so two adjusts do not interleave (lock order: live, then core).
    let mut live = lock(&shared.live);
    let file = live.file.clone();
    let new = config::load(&file, Some(&live.node().name))
        .map_err(|e| format!("not adjusted, nothing changed: {e}"))?;
    let plan = config::adjust::plan(&live, &new);
    if !plan.restart.is_empty() {
        return Err(format!(
            "not adjusted, nothing changed: {} differs in keys a running mirrord cannot \
             change (restart it, or make a new resource): {}",
            file.display(),
            list(&plan.restart)
        ));
    }
    if plan.live.is_empty() {
        return Ok(format!(
            "nothing to adjust: {} matches the running settings",
            file.display()
        ));
    }
    let what = list(&plan.live);
    if dry_run {
        return Ok(format!("would adjust from {}: {what}", file.display()));
    }
    let next = config::adjust::apply(&live, &new);
    // A new metrics address is bound before anything changes, so a failure to listen
    // changes nothing (the old endpoint keeps serving).
    let metrics_move = if next.metrics_listen != live.metrics_listen {
        let bound = match next.metrics_listen {
            Some(addr) => Some((
                addr,
                metrics::server::bind(addr)
                    .map_err(|e| format!("not adjusted, nothing changed: {e}"))?,
            )),
            None => None,
        };
        Some(bound)
    } else {
        None
    };
    let changes = plan.live.iter().map(|c| c.to_string()).collect();
    shared.with_core(|n| {
        let c = n.config();
        let core = super::setup::core_config(&next, c.data_size, c.al_slots as u32, c.max_io);
        n.adjust(core, changes)
    });
    if let Some(bound) = metrics_move {
        if let Some(old) = shared.serve_metrics(bound) {
            // Aborted; once it has ended its port is closed (bounded wait: it ends at once).
            let ended = tokio::runtime::Handle::current()
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), old).await });
            if ended.is_err() {
                tracing::warn!("adjust: the old metrics endpoint did not stop within 5 s");
            }
        }
        if next.metrics_listen.is_none() {
            tracing::info!("metrics endpoint stopped");
        }
    }
    *live = next;
    tracing::info!("adjusted from {}: {what}", file.display());
    Ok(format!("adjusted from {}: {what}", file.display()))
}
