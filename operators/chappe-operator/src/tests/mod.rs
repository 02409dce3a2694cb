//! The crate's tests: reconciliations against a mocked apiserver, the
//! manifest builders, the CRD and its examples, `render` checked by
//! `kubernetes-validate`, leader election and the operations server.

mod crd;
mod http;
mod leader;
mod manifests;
mod reconcile;
mod render;
