//! The crate's one error type.

/// Why a reconciliation, a render or the operator failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer helper failed (its source says which step).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// A manifest could not be built or read as JSON.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A manifest could not be read or written as YAML.
    #[error("YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// The platform has no namespace or no name.
    #[error("the ChappePlatform has no {0}")]
    MissingMetadata(&'static str),
    /// The spec breaks a validation rule (`render` refuses it; the
    /// reconciler reports it in the status instead).
    #[error("invalid ChappePlatform: {}", .0.join("; "))]
    InvalidSpec(Vec<String>),
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, bounded label for the `error` label of
    /// `chappe_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.reason.is_empty() => {
                format!("api_{}", status.code)
            }
            Error::Kube(kube::Error::Api(status)) => {
                format!("api_{}", status.reason.to_lowercase())
            }
            Error::Kube(_) => "kube".into(),
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                kube::runtime::finalizer::Error::AddFinalizer(_) => "add_finalizer".into(),
                kube::runtime::finalizer::Error::RemoveFinalizer(_) => "remove_finalizer".into(),
                _ => "finalizer".into(),
            },
            Error::Json(_) => "json".into(),
            Error::Yaml(_) => "yaml".into(),
            Error::MissingMetadata(_) => "missing_metadata".into(),
            Error::InvalidSpec(_) => "invalid_spec".into(),
        }
    }
}
