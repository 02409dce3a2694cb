//! The Prometheus metrics of a Chappe process: one registry per process
//! ([`metrics`]), so that `chappe up`, which runs every service in one
//! process, serves them all on one `/metrics`.
//!
//! Names follow `chappe_<component>_<thing>_<unit>`: counters end in
//! `_total`, durations are `_seconds` histograms, gRPC status codes are
//! labelled by their canonical names (`OK`, `UNAVAILABLE`, ...). Every metric
//! is registered when the registry is first touched: plain counters and
//! gauges are listed from the start at zero, labelled families from their
//! first observation.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// A bus RPC route of a service (`service` is the queue group, `route` the
/// subject).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub service: String,
    pub route: String,
}

/// A bus RPC route and the gRPC status code it answered with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteCodeLabels {
    pub service: String,
    pub route: String,
    pub code: &'static str,
}

/// A public gateway method: a unary RPC (`UploadKeys`) or a `Connect` frame
/// kind (`Connect/Send`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

/// A public gateway method and the gRPC status code it answered with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodCodeLabels {
    pub method: &'static str,
    pub code: &'static str,
}

/// What became of a delivery job: `delivered`, `retried` (nacked after a
/// store failure) or `dropped` (it can never succeed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// A repository operation (`insert_message`, `claim_key`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

/// The kind of a frame pushed to a device (`message`, `to_device`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// A histogram family whose histograms share [`latency_histogram`]'s buckets.
pub type LatencyFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Buckets from 0.5 ms doubling to about 16 s: a store commit, a bus round
/// trip and a slow fan-out all land in a bucket of their own.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
}

fn latency_family<L: Clone + std::hash::Hash + Eq>() -> LatencyFamily<L> {
    Family::new_with_constructor(latency_histogram as fn() -> Histogram)
}

/// Every metric of a Chappe process.
pub struct Metrics {
    registry: Registry,
    /// `chappe_bus_rpc_requests_total{service,route,code}`.
    pub rpc_requests: Family<RouteCodeLabels, Counter>,
    /// `chappe_bus_rpc_request_duration_seconds{service,route}`.
    pub rpc_duration: LatencyFamily<RouteLabels>,
    /// `chappe_gateway_requests_total{method,code}`.
    pub gateway_requests: Family<MethodCodeLabels, Counter>,
    /// `chappe_gateway_request_duration_seconds{method}`.
    pub gateway_duration: LatencyFamily<MethodLabels>,
    /// `chappe_gateway_connected_devices`.
    pub gateway_connected_devices: Gauge,
    /// `chappe_gateway_pushed_frames_total{kind}`.
    pub gateway_pushed_frames: Family<KindLabels, Counter>,
    /// `chappe_gateway_delivery_lag_seconds`: from a message's storage
    /// (its `sent_at_ms`, fanout's clock) to its push to a device here.
    pub gateway_delivery_lag: Histogram,
    /// `chappe_fanout_delivery_jobs_total{outcome}`.
    pub fanout_delivery_jobs: Family<OutcomeLabels, Counter>,
    /// `chappe_fanout_delivery_queue_depth`: jobs waiting, sampled.
    pub fanout_delivery_queue_depth: Gauge,
    /// `chappe_fanout_messages_stored_total` (duplicates not counted).
    pub fanout_messages_stored: Counter,
    /// `chappe_fanout_store_operation_duration_seconds{operation}`.
    pub fanout_store_duration: LatencyFamily<OperationLabels>,
    /// `chappe_keydir_store_operation_duration_seconds{operation}`.
    pub keydir_store_duration: LatencyFamily<OperationLabels>,
    /// `chappe_media_store_operation_duration_seconds{operation}`.
    pub media_store_duration: LatencyFamily<OperationLabels>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            rpc_requests: Family::default(),
            rpc_duration: latency_family(),
            gateway_requests: Family::default(),
            gateway_duration: latency_family(),
            gateway_connected_devices: Gauge::default(),
            gateway_pushed_frames: Family::default(),
            gateway_delivery_lag: latency_histogram(),
            fanout_delivery_jobs: Family::default(),
            fanout_delivery_queue_depth: Gauge::default(),
            fanout_messages_stored: Counter::default(),
            fanout_store_duration: latency_family(),
            keydir_store_duration: latency_family(),
            media_store_duration: latency_family(),
            registry: Registry::default(),
        };
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "chappe_bus_rpc_requests",
            "Bus RPC requests handled, by service, route and gRPC status code",
            m.rpc_requests.clone(),
        );
        registry.register(
            "chappe_bus_rpc_request_duration_seconds",
            "Time to handle a bus RPC request, by service and route",
            m.rpc_duration.clone(),
        );
        registry.register(
            "chappe_gateway_requests",
            "Public gateway requests (unary RPCs and Connect frames), by method and gRPC status code",
            m.gateway_requests.clone(),
        );
        registry.register(
            "chappe_gateway_request_duration_seconds",
            "Time to answer a public gateway request, by method",
            m.gateway_duration.clone(),
        );
        registry.register(
            "chappe_gateway_connected_devices",
            "Devices with an open Connect stream on this process",
            m.gateway_connected_devices.clone(),
        );
        registry.register(
            "chappe_gateway_pushed_frames",
            "Frames pushed to connected devices, by kind",
            m.gateway_pushed_frames.clone(),
        );
        registry.register(
            "chappe_gateway_delivery_lag_seconds",
            "Time from a message's storage (fanout's clock) to its push to a connected device \
             (gateway's clock): the server's part of send to delivered; the hosts' clocks must \
             be synchronised (NTP) for it to mean that across machines",
            m.gateway_delivery_lag.clone(),
        );
        registry.register(
            "chappe_fanout_delivery_jobs",
            "Delivery jobs processed, by outcome (delivered, retried, dropped)",
            m.fanout_delivery_jobs.clone(),
        );
        registry.register(
            "chappe_fanout_delivery_queue_depth",
            "Delivery jobs waiting in the queue (sampled)",
            m.fanout_delivery_queue_depth.clone(),
        );
        registry.register(
            "chappe_fanout_messages_stored",
            "Conversation messages stored (retried duplicates excluded)",
            m.fanout_messages_stored.clone(),
        );
        registry.register(
            "chappe_fanout_store_operation_duration_seconds",
            "Time of a fanout store operation, by operation",
            m.fanout_store_duration.clone(),
        );
        registry.register(
            "chappe_keydir_store_operation_duration_seconds",
            "Time of a keydir store operation, by operation",
            m.keydir_store_duration.clone(),
        );
        registry.register(
            "chappe_media_store_operation_duration_seconds",
            "Time of a media store operation, by operation",
            m.media_store_duration.clone(),
        );
        Self { registry, ..m }
    }

    /// The registry, in the Prometheus text format (version 0.0.4).
    pub fn encode_prometheus(&self) -> String {
        let mut out = String::new();
        // Writing to a String does not fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// The registry, in the OpenMetrics text format (ends with `# EOF`).
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Seconds, as histograms observe them.
pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Runs one store operation in a `store` span (named after the operation,
/// so a trace shows where a request spent its time) and records its
/// duration in `family` under `operation`: what fanout's and keydir's
/// metered stores do for every repository call.
pub async fn timed_store_call<T>(
    family: &LatencyFamily<OperationLabels>,
    operation: &'static str,
    call: impl std::future::Future<Output = T>,
) -> T {
    use tracing::Instrument as _;
    let span = tracing::info_span!("store", otel.name = operation, db.operation = operation);
    let started = std::time::Instant::now();
    let out = call.instrument(span).await;
    family
        .get_or_create(&OperationLabels { operation })
        .observe(seconds(started.elapsed()));
    out
}

/// The canonical name of a gRPC status code (`OK`, `INVALID_ARGUMENT`...),
/// for labels; `UNKNOWN` for a number outside the 17 codes.
pub fn grpc_code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_named_with_their_units() {
        let m = metrics();
        let method = MethodLabels { method: "Unit" };
        let operation = OperationLabels { operation: "unit" };
        m.gateway_duration.get_or_create(&method).observe(0.1);
        m.gateway_requests
            .get_or_create(&MethodCodeLabels {
                method: "Unit",
                code: "OK",
            })
            .inc();
        m.gateway_pushed_frames
            .get_or_create(&KindLabels { kind: "unit" })
            .inc();
        m.fanout_delivery_jobs
            .get_or_create(&OutcomeLabels { outcome: "unit" })
            .inc();
        m.fanout_store_duration
            .get_or_create(&operation)
            .observe(0.1);
        m.keydir_store_duration
            .get_or_create(&operation)
            .observe(0.1);
        m.media_store_duration
            .get_or_create(&operation)
            .observe(0.1);
        let text = m.encode_prometheus();
        for name in [
            "chappe_gateway_requests_total",
            "chappe_gateway_request_duration_seconds",
            "chappe_gateway_connected_devices",
            "chappe_gateway_pushed_frames_total",
            "chappe_fanout_delivery_jobs_total",
            "chappe_fanout_delivery_queue_depth",
            "chappe_fanout_messages_stored_total",
            "chappe_fanout_store_operation_duration_seconds",
            "chappe_keydir_store_operation_duration_seconds",
            "chappe_media_store_operation_duration_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} in\n{text}"
            );
        }
        assert!(metrics().encode_openmetrics().ends_with("# EOF\n"));
    }

    #[test]
    fn labels_and_observations_are_encoded() {
        let m = metrics();
        m.rpc_requests
            .get_or_create(&RouteCodeLabels {
                service: "unit".into(),
                route: "t.x".into(),
                code: grpc_code_name(14),
            })
            .inc();
        m.rpc_duration
            .get_or_create(&RouteLabels {
                service: "unit".into(),
                route: "t.x".into(),
            })
            .observe(0.003);
        let text = m.encode_prometheus();
        assert!(text.contains(
            r#"chappe_bus_rpc_requests_total{service="unit",route="t.x",code="UNAVAILABLE"} 1"#
        ));
        assert!(text.contains(
            r#"chappe_bus_rpc_request_duration_seconds_bucket{service="unit",route="t.x",le="0.004"} 1"#
        ), "{text}");
        assert_eq!(grpc_code_name(0), "OK");
        assert_eq!(grpc_code_name(99), "UNKNOWN");
    }
}
