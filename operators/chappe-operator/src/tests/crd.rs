//! The CRD and its examples: the committed YAML is current, the examples
//! pass the generated openAPIV3Schema (structure with the `jsonschema`
//! crate, CEL rules with kube's client-side CEL evaluator, the same rules
//! the apiserver runs), and the invalid examples are refused with their
//! messages, both by the schema and by `ChappePlatform::validate`.

use std::path::{Path, PathBuf};

use kube::core::cel::{Validator, compile_schema, estimate_rule_cost};
use serde_json::{Value, json};

use crate::crd::ChappePlatform;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn committed_crd() -> Value {
    let path = crate_dir().join("yaml/crd.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run `cargo run -p chappe-operator --bin crdgen > operators/chappe-operator/yaml/crd.yaml`",
            path.display()
        )
    });
    serde_yaml::from_str(&text).expect("crd.yaml parses")
}

fn open_api_schema() -> Value {
    committed_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The schema as kubectl's strict field validation sees it: unknown
/// fields refused (structural schemas prune them silently otherwise), and
/// the root's `apiVersion`, `kind` and `metadata` known.
fn strict(schema: &Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                    map.insert("additionalProperties".into(), Value::Bool(false));
                }
                for child in map.values_mut() {
                    walk(child);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut schema = schema.clone();
    walk(&mut schema);
    let props = schema["properties"]
        .as_object_mut()
        .expect("root properties");
    props.insert(
        "apiVersion".into(),
        json!({"type": "string", "enum": ["chappe.gouv.fr/v1alpha1"]}),
    );
    props.insert(
        "kind".into(),
        json!({"type": "string", "enum": ["ChappePlatform"]}),
    );
    props.insert("metadata".into(), json!({"type": "object"}));
    schema
}

/// Every message the schema gives for `object`: structural ones prefixed
/// with their JSON path, then the CEL rules' messages.
fn schema_errors(object: &Value) -> Vec<String> {
    let schema = open_api_schema();
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(&strict(&schema))
        .expect("the CRD schema compiles as JSON Schema");
    let mut errors: Vec<String> = validator
        .iter_errors(object)
        .map(|e| {
            let path = e
                .instance_path()
                .to_string()
                .trim_start_matches('/')
                .replace('/', ".");
            format!("{path}: {e}")
        })
        .collect();
    if let Err(cel) = Validator::new().validate(&schema, object, None) {
        errors.extend(cel.into_vec().into_iter().map(|e| e.message));
    }
    errors
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("examples directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn committed_crd_yaml_is_current() {
    let generated = crate::render::crd_yaml().expect("crd yaml");
    let committed = std::fs::read_to_string(crate_dir().join("yaml/crd.yaml")).unwrap_or_default();
    assert!(
        generated == committed,
        "operators/chappe-operator/yaml/crd.yaml is not current: run \
         `cargo run -p chappe-operator --bin crdgen > operators/chappe-operator/yaml/crd.yaml`"
    );
}

#[test]
fn examples_pass_the_generated_schema_and_validate() {
    let files = yaml_files(&crate_dir().join("examples"));
    assert_eq!(files.len(), 2, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("example");
        let object: Value = serde_yaml::from_str(&text).expect("yaml");
        let errors = schema_errors(&object);
        assert!(errors.is_empty(), "{}: {errors:#?}", file.display());
        let platform: ChappePlatform = serde_yaml::from_str(&text).expect("a ChappePlatform");
        assert_eq!(platform.validate(), Ok(()), "{}", file.display());
    }
}

#[test]
fn invalid_examples_are_refused_with_clear_messages() {
    let files = yaml_files(&crate_dir().join("examples/invalid"));
    assert!(files.len() >= 4, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("example");
        let expect = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                .unwrap_or_else(|| panic!("{}: no `# {key}:` line", file.display()))
                .to_owned()
        };
        let (by_rust, by_schema) = (expect("expect-validate"), expect("expect-schema"));

        let platform: ChappePlatform = serde_yaml::from_str(&text).expect("parses");
        let errors = platform.validate().expect_err("refused by validate()");
        assert!(
            errors.contains(&by_rust),
            "{}: validate() said {errors:#?}, expected {by_rust:?}",
            file.display()
        );

        let object: Value = serde_yaml::from_str(&text).expect("yaml");
        let errors = schema_errors(&object);
        assert!(
            errors.iter().any(|e| e.contains(&by_schema)),
            "{}: the schema said {errors:#?}, expected {by_schema:?}",
            file.display()
        );
    }
}

#[test]
fn cel_rules_compile_and_stay_within_the_apiserver_cost_budget() {
    let schema = open_api_schema();
    let compiled = compile_schema(&schema);
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
    // Every rule, with the schema of the object it is attached to.
    fn rules(schema: &Value, out: &mut Vec<(String, Value)>) {
        if let Some(list) = schema["x-kubernetes-validations"].as_array() {
            for rule in list {
                out.push((
                    rule["rule"].as_str().expect("rule").to_owned(),
                    schema.clone(),
                ));
            }
        }
        if let Some(props) = schema["properties"].as_object() {
            props.values().for_each(|p| rules(p, out));
        }
        for key in ["items", "additionalProperties"] {
            if schema[key].is_object() {
                rules(&schema[key], out);
            }
        }
    }
    let mut all = Vec::new();
    rules(&schema, &mut all);
    assert!(all.len() >= 12, "{} rules", all.len());
    for (rule, at) in all {
        let warnings = estimate_rule_cost(&rule, &compile_schema(&at));
        assert!(warnings.is_empty(), "{rule}: {warnings:?}");
    }
}

/// An edit of an example.
type Change = Box<dyn Fn(&mut Value)>;

#[test]
fn cel_and_rust_agree_on_edge_cases() {
    let base: Value = serde_yaml::from_str(crate::fixtures::THREE_REGIONS).expect("yaml");
    let cases: Vec<(&str, Change)> = vec![
        (
            "draining region with no gateway",
            Box::new(|v| {
                v["spec"]["regions"][0]["draining"] = json!(true);
                v["spec"]["regions"][0]["gateway"]["replicas"] = json!(0);
            }),
        ),
        (
            "external NATS for every region",
            Box::new(|v| {
                v["spec"]["nats"] = json!({"external": {"urls": {
                "fr-par": ["nats://a:4222"], "fr-mrs": ["nats://b:4222"], "fr-lil": ["nats://c:4222"]}}});
            }),
        ),
    ];
    for (what, change) in cases {
        let mut v = base.clone();
        change(&mut v);
        assert!(
            schema_errors(&v).is_empty(),
            "{what}: {:?}",
            schema_errors(&v)
        );
        let p: ChappePlatform = serde_json::from_value(v).expect("platform");
        assert_eq!(p.validate(), Ok(()), "{what}");
    }
    let refused: Vec<(&str, Change)> = vec![
        (
            "spec.nats.external.urls needs the NATS URLs of every region",
            Box::new(|v| {
                v["spec"]["nats"] = json!({"external": {"urls": {"fr-par": ["nats://a:4222"]}}});
            }),
        ),
        (
            "spec.nats takes managed or external, not both",
            Box::new(|v| {
                v["spec"]["nats"]["external"] = json!({"urls": {"fr-par": ["nats://a:4222"]}});
            }),
        ),
        (
            "every region needs a ScyllaDB datacenter in spec.store.scylla.datacenters",
            Box::new(|v| {
                v["spec"]["regions"]
                    .as_array_mut()
                    .expect("regions")
                    .push(json!({"name": "fr-nce"}));
            }),
        ),
        (
            "spec.store needs exactly one of scylla or embedded",
            Box::new(|v| {
                v["spec"]["store"]["embedded"] = json!({});
            }),
        ),
        (
            "autoscaling.maxReplicas must be at least minReplicas",
            Box::new(|v| {
                v["spec"]["regions"][0]["fanout"]["autoscaling"] =
                    json!({"minReplicas": 5, "maxReplicas": 2});
            }),
        ),
        (
            "the name of a ChappePlatform is at most 24 characters",
            Box::new(|v| {
                v["metadata"]["name"] = json!("a-very-long-platform-name-indeed");
            }),
        ),
    ];
    for (message, change) in refused {
        let mut v = base.clone();
        change(&mut v);
        let errors = schema_errors(&v);
        assert!(
            errors.iter().any(|e| e.contains(message)),
            "schema, {message}: {errors:?}"
        );
        let p: ChappePlatform = serde_json::from_value(v).expect("platform");
        let errors = p.validate().expect_err(message);
        assert!(
            errors.iter().any(|e| e.contains(message)),
            "validate(), {message}: {errors:?}"
        );
    }
}
