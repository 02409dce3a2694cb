//! The `render` and `crdgen` binaries, run as an SRE would.

use std::process::Command;

const DIR: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn crdgen_prints_the_committed_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_crdgen"))
        .output()
        .expect("crdgen");
    assert!(out.status.success());
    let committed = std::fs::read_to_string(format!("{DIR}/yaml/crd.yaml")).expect("crd.yaml");
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "yaml/crd.yaml is not current: run \
         `cargo run -p chappe-operator --bin crdgen > operators/chappe-operator/yaml/crd.yaml`"
    );
}

#[test]
fn render_prints_every_manifest_of_an_example() {
    let out = Command::new(env!("CARGO_BIN_EXE_render"))
        .args([
            "--file",
            &format!("{DIR}/examples/three-regions.yaml"),
            "--service-monitors",
        ])
        .output()
        .expect("render");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\nkind: Deployment\n").count(), 15);
    assert_eq!(text.matches("\nkind: StatefulSet\n").count(), 3);
    assert_eq!(text.matches("\nkind: Job\n").count(), 1);
    assert_eq!(text.matches("\nkind: ServiceMonitor\n").count(), 1);
}

#[test]
fn render_refuses_an_invalid_example_with_its_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_render"))
        .args([
            "--file",
            &format!("{DIR}/examples/invalid/replication-above-nodes.yaml"),
        ])
        .output()
        .expect("render");
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("datacenter dc-mrs has replication factor 5 but 3 nodes"),
        "{err}"
    );
}
