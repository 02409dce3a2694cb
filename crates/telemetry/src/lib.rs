//! Telemetry for every Chappe process.
//!
//! - [`init`]: logs, `tracing` with an `EnvFilter` (`RUST_LOG`, default
//!   `info`), as human-readable lines or JSON;
//! - [`otel`]: OpenTelemetry traces over OTLP, off unless configured, and
//!   the W3C trace context carried in bus headers and gRPC metadata;
//! - [`metrics`]: the process's Prometheus registry and every metric in it;
//! - [`http`]: the operations server, `/metrics`, `/healthz`, `/readyz`;
//! - [`shutdown_signal`], the SIGTERM/Ctrl-C every service drains on;
//! - [`program`]: what every Chappe binary does around its work, and the
//!   arguments every service shares.

pub mod http;
pub mod metrics;
pub mod otel;
pub mod program;

use std::any::TypeId;

use tracing::span;
use tracing::subscriber::Interest;
use tracing::{Event, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Registry;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

/// Installs the global subscriber, writing to stderr. `default_filter`
/// applies when `RUST_LOG` is unset. Calling it twice is harmless (the
/// second call does nothing), which tests rely on.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(LateLayer).with(filter);
    let _ = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

/// The OpenTelemetry layer, which [`otel::install`] sets after the
/// subscriber was installed (the command line, parsed after logging
/// starts, says whether to export). Until then it does nothing.
struct LateLayer;

impl LateLayer {
    fn inner() -> Option<&'static (dyn Layer<Registry> + Send + Sync)> {
        otel::LAYER.get().map(|l| &**l)
    }
}

impl Layer<Registry> for LateLayer {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // The layer may be set later: never let a callsite be cached as
        // uninteresting on its account.
        Interest::always()
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, Registry>) {
        if let Some(l) = Self::inner() {
            l.on_new_span(attrs, id, ctx);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, Registry>) {
        if let Some(l) = Self::inner() {
            l.on_record(id, values, ctx);
        }
    }

    fn on_follows_from(&self, id: &span::Id, follows: &span::Id, ctx: Context<'_, Registry>) {
        if let Some(l) = Self::inner() {
            l.on_follows_from(id, follows, ctx);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, Registry>) {
        if let Some(l) = Self::inner() {
            l.on_event(event, ctx);
        }
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, Registry>) {
        if let Some(l) = Self::inner() {
            l.on_enter(id, ctx);
        }
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, Registry>) {
        if let Some(l) = Self::inner() {
            l.on_exit(id, ctx);
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, Registry>) {
        if let Some(l) = Self::inner() {
            l.on_close(id, ctx);
        }
    }

    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: Context<'_, Registry>) {
        if let Some(l) = Self::inner() {
            l.on_id_change(old, new, ctx);
        }
    }

    // SAFETY: the inner layer is set once and never moved or dropped (it
    // lives in a static), so a pointer into it stays valid for as long as
    // anyone can hold the subscriber.
    unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
        if id == TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: forwarded to a layer that lives for 'static (see above).
        Self::inner().and_then(|l| unsafe { l.downcast_raw(id) })
    }
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before killing).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
