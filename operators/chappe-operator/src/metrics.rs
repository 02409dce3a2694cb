//! Prometheus metrics of the operator:
//! `chappe_operator_reconciliations_total`,
//! `chappe_operator_reconcile_errors_total{error=...}` and
//! `chappe_operator_reconcile_duration_seconds`.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Error;

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// [`Error::metric_label`] of the failure.
    pub error: String,
}

/// The operator's metrics, cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    /// Reconciliations started.
    pub reconciliations: Counter,
    /// Reconciliations that failed, by error.
    pub failures: Family<ErrorLabels, Counter>,
    /// How long reconciliations took.
    pub duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciliations: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.01, 2.0, 12)),
        }
    }
}

impl Metrics {
    /// Registers the metrics in `registry`.
    pub fn register(self, registry: &mut Registry) -> Self {
        registry.register(
            "chappe_operator_reconciliations",
            "Reconciliations of ChappePlatforms",
            self.reconciliations.clone(),
        );
        registry.register(
            "chappe_operator_reconcile_errors",
            "Reconciliations that failed, by error",
            self.failures.clone(),
        );
        registry.register(
            "chappe_operator_reconcile_duration_seconds",
            "Duration of reconciliations in seconds",
            self.duration.clone(),
        );
        self
    }

    /// Counts a reconciliation; its duration is recorded when the returned
    /// guard drops.
    pub fn count_and_measure(&self) -> ReconcileTimer {
        self.reconciliations.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.clone(),
        }
    }

    /// Counts a failed reconciliation.
    pub fn reconcile_failure(&self, error: &Error) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.metric_label(),
            })
            .inc();
    }
}

/// Records a reconciliation's duration on drop.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

/// The registry in the text exposition format.
pub fn encode(registry: &Arc<Registry>) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
