//! Fence-peer handler calls (`Action::FencePeer`) and how they ended (`Event::FenceDone`,
//! exit codes as in DRBD, docs/INTERFACE.md "Fencing").

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// `outcome` label values, by exit code 3..=7, then anything else.
const OUTCOMES: [&str; 6] = [
    "peer_inconsistent",
    "peer_outdated",
    "peer_unreachable",
    "peer_primary",
    "peer_fenced",
    "failed",
];

type Labels = [(&'static str, &'static str); 1];

pub struct FenceCalls {
    calls: Counter,
    outcomes: Vec<Counter>,
}

impl FenceCalls {
    pub fn register(reg: &mut Registry) -> FenceCalls {
        let calls = Counter::default();
        let results = Family::<Labels, Counter>::default();
        reg.register(
            "fence_peer_calls",
            "Fence-peer handler runs started",
            calls.clone(),
        );
        reg.register(
            "fence_peer_results",
            "Fence-peer handler runs ended, by outcome (its exit code 3..7, or failed: any \
             other exit, a signal, or it could not run)",
            results.clone(),
        );
        let outcomes = OUTCOMES
            .iter()
            .map(|o| results.get_or_create_owned(&[("outcome", *o)]))
            .collect();
        FenceCalls { calls, outcomes }
    }

    pub fn called(&self) {
        self.calls.inc();
    }

    pub fn done(&self, exit: Option<i32>) {
        let i = match exit {
            Some(code @ 3..=7) => (code - 3) as usize,
            _ => OUTCOMES.len() - 1,
        };
        self.outcomes[i].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::prometheus_text::encode;

    #[test]
    fn exits_map_to_outcomes() {
        let mut reg = Registry::with_prefix("t");
        let f = FenceCalls::register(&mut reg);
        for exit in [Some(4), Some(4), Some(7), Some(0), None, Some(3)] {
            f.called();
            f.done(exit);
        }
        let mut out = String::new();
        encode(&mut out, &reg).expect("encode");
        for line in [
            "t_fence_peer_calls_total 6\n",
            "t_fence_peer_results_total{outcome=\"peer_outdated\"} 2\n",
            "t_fence_peer_results_total{outcome=\"peer_fenced\"} 1\n",
            "t_fence_peer_results_total{outcome=\"peer_inconsistent\"} 1\n",
            "t_fence_peer_results_total{outcome=\"peer_unreachable\"} 0\n",
            "t_fence_peer_results_total{outcome=\"failed\"} 2\n",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
    }
}
