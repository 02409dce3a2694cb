//! OpenTelemetry traces, off unless an OTLP endpoint is configured.
//!
//! [`install`] exports the `tracing` spans of the process over OTLP/gRPC
//! (batched on a background thread) and sets the W3C TraceContext
//! propagator. Context crosses process boundaries as `traceparent` /
//! `tracestate` entries of a string map, the bus message headers or gRPC
//! metadata: [`inject`] writes the current span's context, [`set_parent`]
//! makes a new span the child of what a map carries. Without [`install`]
//! both do nothing.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::Registry;

/// The standard variable a collector's address may come from.
pub const OTEL_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// Its traces-only variant, which wins over it.
pub const OTEL_TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// The header names of the W3C TraceContext propagator.
pub const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Why traces cannot be exported.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("the OTLP exporter did not start: {0}")]
    Exporter(String),
    #[error("trace export is already installed in this process")]
    AlreadyInstalled,
}

/// Where traces go.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// An OTLP/gRPC endpoint, `http://collector:4317`.
    pub endpoint: String,
    /// `service.name` of the spans (`chappe-gateway`...).
    pub service_name: String,
}

impl OtlpConfig {
    /// The endpoint from a flag, else from `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// or `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` (export off) when none is set.
    pub fn resolve(flag: Option<&str>, service_name: &str) -> Option<Self> {
        let from_env = || {
            [OTEL_TRACES_ENDPOINT_ENV, OTEL_ENDPOINT_ENV]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
        };
        let endpoint = flag
            .map(str::to_owned)
            .filter(|s| !s.trim().is_empty())
            .or_else(from_env)?;
        Some(Self {
            endpoint,
            service_name: service_name.to_owned(),
        })
    }
}

/// The exporting layer, set once by [`install`] and read by the
/// subscriber's [`crate::LateLayer`].
pub(crate) static LAYER: OnceLock<Box<dyn Layer<Registry> + Send + Sync>> = OnceLock::new();

/// Exports spans while held; [`TracingGuard::shutdown`] flushes them.
pub struct TracingGuard {
    provider: SdkTracerProvider,
}

impl TracingGuard {
    /// Exports the spans still buffered and stops exporting.
    pub async fn shutdown(self) {
        let provider = self.provider;
        // The provider's shutdown blocks until the batch thread exported.
        let result = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "trace export did not flush"),
            Err(e) => tracing::warn!(error = %e, "trace export did not flush"),
        }
    }
}

/// Starts exporting this process's spans to `config.endpoint`. Call it on a
/// tokio runtime (the gRPC exporter lives there) after [`crate::init`].
/// The batch export interval follows `OTEL_BSP_SCHEDULE_DELAY`
/// (milliseconds, default 5000).
pub fn install(config: &OtlpConfig) -> Result<TracingGuard, Error> {
    if LAYER.get().is_some() {
        return Err(Error::AlreadyInstalled);
    }
    let uri: axum::http::Uri =
        config
            .endpoint
            .parse()
            .map_err(|e: axum::http::uri::InvalidUri| Error::Endpoint {
                endpoint: config.endpoint.clone(),
                reason: e.to_string(),
            })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(Error::Endpoint {
            endpoint: config.endpoint.clone(),
            reason: "expected http://host:port or https://host:port".into(),
        });
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.clone())
        .build()
        .map_err(|e| Error::Exporter(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("chappe");
    let layer = tracing_opentelemetry::layer::<Registry>().with_tracer(tracer);
    LAYER
        .set(Box::new(layer))
        .map_err(|_| Error::AlreadyInstalled)?;
    let _ = PROPAGATOR.set(TraceContextPropagator::new());
    tracing::info!(endpoint = %config.endpoint, "exporting traces over OTLP");
    Ok(TracingGuard { provider })
}

/// Set with the layer: context is propagated only while traces are exported.
static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();

struct MapInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapExtractor<'a>(&'a BTreeMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes the context of `span` into `headers` (`traceparent`,
/// `tracestate`).
pub fn inject_span(span: &tracing::Span, headers: &mut BTreeMap<String, String>) {
    if let Some(propagator) = PROPAGATOR.get() {
        propagator.inject_context(&span.context(), &mut MapInjector(headers));
    }
}

/// Writes the current span's context into `headers`.
pub fn inject(headers: &mut BTreeMap<String, String>) {
    inject_span(&tracing::Span::current(), headers);
}

/// Makes `span` (new, not yet entered) a child of the context `headers`
/// carry; does nothing when they carry none.
pub fn set_parent(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    let Some(propagator) = PROPAGATOR.get() else {
        return;
    };
    if !headers.contains_key(TRACE_HEADERS[0]) {
        return;
    }
    let cx = propagator.extract(&MapExtractor(headers));
    // Fails only for a span that is disabled or already started.
    let _ = span.set_parent(cx);
}

/// The trace id of `span` in hex, when traces are exported (for logs and
/// tests).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    PROPAGATOR.get()?;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_resolve_from_the_flag_first() {
        let c = OtlpConfig::resolve(Some("http://127.0.0.1:4317"), "chappe-x").unwrap();
        assert_eq!(c.endpoint, "http://127.0.0.1:4317");
        assert_eq!(c.service_name, "chappe-x");
    }

    #[test]
    fn without_install_propagation_does_nothing() {
        let mut headers = BTreeMap::new();
        inject(&mut headers);
        assert!(headers.is_empty());
        let span = tracing::info_span!("x");
        set_parent(&span, &headers);
        assert_eq!(trace_id(&span), None);
    }
}
