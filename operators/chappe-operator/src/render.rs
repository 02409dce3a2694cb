//! Manifests as YAML, offline: the CRD (`crdgen`) and every object the
//! operator would apply for a platform file (`render`).

use kube::CustomResourceExt;

use crate::crd::ChappePlatform;
use crate::manifests::{self, RenderOptions, Rollout};
use crate::{Error, Result};

/// The CRD as YAML, as committed in `yaml/crd.yaml`.
pub fn crd_yaml() -> Result<String> {
    Ok(serde_yaml::to_string(&ChappePlatform::crd())?)
}

/// Reads a ChappePlatform from YAML.
pub fn read_platform(yaml: &str) -> Result<ChappePlatform> {
    Ok(serde_yaml::from_str(yaml)?)
}

/// Every manifest the operator would apply for `platform` once converged,
/// as one multi-document YAML. Refuses an invalid spec with its messages.
pub fn render(platform: &ChappePlatform, service_monitors: bool) -> Result<String> {
    platform.validate().map_err(Error::InvalidSpec)?;
    let opts = RenderOptions {
        service_monitors,
        rollout: Rollout::converged(platform),
    };
    let mut out = String::new();
    for m in manifests::desired(platform, &opts)? {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&m.object)?);
    }
    Ok(out)
}
