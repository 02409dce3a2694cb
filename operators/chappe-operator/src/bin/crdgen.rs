//! Prints the ChappePlatform CustomResourceDefinition as YAML:
//! `cargo run -p chappe-operator --bin crdgen > operators/chappe-operator/yaml/crd.yaml`.

fn main() -> anyhow::Result<()> {
    print!("{}", chappe_operator::render::crd_yaml()?);
    Ok(())
}
