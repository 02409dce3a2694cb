//! `chappe-operator`: runs Chappe across regions from one `ChappePlatform`
//! resource (DESIGN.md §6).
//!
//! - [`crd`]: the resource, its validation (schema rules and
//!   [`crd::ChappePlatformSpec::validate`]);
//! - [`manifests`]: pure builders of every object a platform needs, shared
//!   by `render` and the reconciler;
//! - [`reconcile`]: the controller's `reconcile`/`error_policy`, the
//!   migration gate and draining decisions, server-side apply and pruning;
//! - [`status`]: conditions and per-region readiness from what is observed;
//! - [`metrics`], [`leader`], [`http`]: what the operator binary runs
//!   beside the controller;
//! - [`render`]: manifests as multi-document YAML, offline.

pub mod crd;
mod error;
pub mod http;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub mod reconcile;
pub mod render;
pub mod status;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;

pub use crd::{ChappePlatform, ChappePlatformSpec, ChappePlatformStatus};
pub use error::{Error, Result};
