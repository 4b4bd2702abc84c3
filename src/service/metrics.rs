//! Prometheus metrics: operation durations by op and result code, snapshot counts
//! (read at scrape time), and whatever the remote filesystem registers itself.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::Code;

use crate::snapshot::{Counts, RemoteFs};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

fn op_histogram() -> Histogram {
    // 50 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    ops: Family<OpLabels, Histogram, fn() -> Histogram>,
    snapshots: Family<KindLabels, Gauge>,
    remote_layers: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Builds the registry; the remote filesystem adds its own metrics under `layer_`.
    pub fn new(remote: Option<&dyn RemoteFs>) -> Metrics {
        let mut registry = Registry::with_prefix("lazysnap");
        let ops = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            op_histogram as fn() -> Histogram,
        );
        let snapshots = Family::<KindLabels, Gauge>::default();
        let remote_layers = Gauge::default();
        registry.register(
            "operation_duration_seconds",
            "Duration of snapshotter gRPC calls by operation and result code",
            ops.clone(),
        );
        registry.register("snapshots", "Snapshots by kind", snapshots.clone());
        registry.register(
            "remote_layers",
            "Remote layers currently reported by the lazy filesystem",
            remote_layers.clone(),
        );
        if let Some(r) = remote {
            r.register_metrics(registry.sub_registry_with_prefix("layer"));
        }
        Metrics {
            registry: Mutex::new(registry),
            ops,
            snapshots,
            remote_layers,
        }
    }

    /// Records one call.
    pub fn observe(&self, op: &str, code: Code, took: Duration) {
        let labels = OpLabels {
            op: op.to_string(),
            code: format!("{code:?}"),
        };
        self.ops.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// The OpenMetrics text, with counts taken now.
    pub fn render(&self, counts: Option<Counts>, remote_layers: usize) -> String {
        if let Some(c) = counts {
            for (kind, n) in [
                ("active", c.active),
                ("view", c.view),
                ("committed", c.committed),
                ("remote", c.remote),
            ] {
                self.snapshots
                    .get_or_create(&KindLabels { kind: kind.into() })
                    .set(n as i64);
            }
        }
        self.remote_layers.set(remote_layers as i64);
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            out = format!("# encoding failed: {e}\n");
        }
        out
    }
}
