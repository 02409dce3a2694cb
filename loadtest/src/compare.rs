//! `compare A.json B.json`: run parameters that differ, then a plain-text
//! table of throughput, latency percentiles, errors and devices with the
//! ratio B/A.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::measure::Metric;
use crate::report::{Report, format_us};

/// The comparison of two reports as plain text.
pub fn compare(a: &Report, b: &Report) -> String {
    let mut o = String::new();
    let diffs = differing_parameters(a, b);
    if diffs.is_empty() {
        o.push_str("Parameters: identical\n\n");
    } else {
        o.push_str("Parameters that differ:\n");
        for (k, va, vb) in &diffs {
            let _ = writeln!(o, "  {k}: A={va}  B={vb}");
        }
        o.push('\n');
    }

    let mut rows: Vec<Row> = Vec::new();
    let (ta, tb) = (&a.throughput, &b.throughput);
    rows.push(Row::rate("sent/s", ta.sent_per_s, tb.sent_per_s));
    rows.push(Row::rate("stored/s", ta.stored_per_s, tb.stored_per_s));
    rows.push(Row::rate(
        "delivered/s",
        ta.delivered_per_s,
        tb.delivered_per_s,
    ));
    for m in Metric::ALL {
        let (Some(sa), Some(sb)) = (a.summary(m), b.summary(m)) else {
            continue;
        };
        rows.push(Row::count(
            &format!("{} count", m.label()),
            sa.count,
            sb.count,
        ));
        rows.push(Row::latency(
            &format!("{} mean", m.label()),
            sa.mean_us,
            sb.mean_us,
        ));
        for ((q, va), (_, vb)) in sa.percentiles().into_iter().zip(sb.percentiles()) {
            rows.push(Row::latency(
                &format!("{} {q}", m.label()),
                va as f64,
                vb as f64,
            ));
        }
    }
    let (ca, cb) = (&a.counts, &b.counts);
    rows.push(Row::count("errors", ca.errors, cb.errors));
    let mut statuses: Vec<&String> = ca.errors_by_status.keys().collect();
    statuses.extend(cb.errors_by_status.keys());
    statuses.sort();
    statuses.dedup();
    for s in statuses {
        let get = |c: &crate::report::Counts| c.errors_by_status.get(s).copied().unwrap_or(0);
        rows.push(Row::count(&format!("  {s}"), get(ca), get(cb)));
    }
    rows.push(Row::count("dropped sends", ca.dropped, cb.dropped));
    rows.push(Row::count("late sends", ca.late, cb.late));
    rows.push(Row::count("devices", a.meta.devices, b.meta.devices));

    let header = Row {
        name: "metric".to_owned(),
        a: "A".to_owned(),
        b: "B".to_owned(),
        ratio: "B/A".to_owned(),
    };
    let w0 = rows
        .iter()
        .chain([&header])
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0);
    let w1 = rows
        .iter()
        .chain([&header])
        .map(|r| r.a.chars().count())
        .max()
        .unwrap_or(0);
    let w2 = rows
        .iter()
        .chain([&header])
        .map(|r| r.b.chars().count())
        .max()
        .unwrap_or(0);
    let w3 = rows
        .iter()
        .chain([&header])
        .map(|r| r.ratio.chars().count())
        .max()
        .unwrap_or(0);
    for r in [&header].into_iter().chain(&rows) {
        let _ = writeln!(
            o,
            "{}  {}  {}  {}",
            pad_right(&r.name, w0),
            pad_left(&r.a, w1),
            pad_left(&r.b, w2),
            pad_left(&r.ratio, w3)
        );
    }
    o
}

struct Row {
    name: String,
    a: String,
    b: String,
    ratio: String,
}

impl Row {
    fn new(name: &str, a: f64, b: f64, fmt: impl Fn(f64) -> String) -> Self {
        Self {
            name: name.to_owned(),
            a: fmt(a),
            b: fmt(b),
            ratio: ratio(a, b),
        }
    }
    fn rate(name: &str, a: f64, b: f64) -> Self {
        Self::new(name, a, b, |v| format!("{v:.1}"))
    }
    fn count(name: &str, a: u64, b: u64) -> Self {
        Self::new(name, a as f64, b as f64, |v| format!("{v:.0}"))
    }
    fn latency(name: &str, a: f64, b: f64) -> Self {
        Self::new(name, a, b, format_us)
    }
}

/// `B/A` with two decimals; `-` when A is 0.
fn ratio(a: f64, b: f64) -> String {
    if a == 0.0 {
        if b == 0.0 {
            "=".to_owned()
        } else {
            "-".to_owned()
        }
    } else {
        format!("{:.2}", b / a)
    }
}

fn pad_left(s: &str, w: usize) -> String {
    format!("{}{s}", " ".repeat(w.saturating_sub(s.chars().count())))
}

fn pad_right(s: &str, w: usize) -> String {
    format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())))
}

/// Run parameters (everything in `meta` but notes, start time and worker
/// index) whose values differ, as `(path, A, B)`; `-` marks a missing one.
pub fn differing_parameters(a: &Report, b: &Report) -> Vec<(String, String, String)> {
    let flat = |r: &Report| {
        let mut m = BTreeMap::new();
        if let Ok(v) = serde_json::to_value(&r.meta) {
            flatten("", &v, &mut m);
        }
        for k in ["notes", "started_at_unix_ms", "worker.index"] {
            m.retain(|key: &String, _| key != k && !key.starts_with(&format!("{k}.")));
        }
        m.insert("workers".to_owned(), r.workers.len().to_string());
        m.insert("schema".to_owned(), r.schema.clone());
        m
    };
    let (fa, fb) = (flat(a), flat(b));
    let mut keys: Vec<&String> = fa.keys().chain(fb.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (va, vb) = (fa.get(k), fb.get(k));
            (va != vb).then(|| {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "-".to_owned());
                (k.clone(), show(va), show(vb))
            })
        })
        .collect()
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                flatten(&key(k), v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios() {
        assert_eq!(ratio(2.0, 3.0), "1.50");
        assert_eq!(ratio(0.0, 0.0), "=");
        assert_eq!(ratio(0.0, 1.0), "-");
    }

    #[test]
    fn nested_parameters_are_compared_by_path() {
        let mut a = Report::default();
        a.meta.parameters = serde_json::json!({"group": {"size": 3}, "fixed": true});
        let mut b = a.clone();
        b.meta.parameters["group"]["size"] = serde_json::json!(5);
        b.meta.notes.push("ignored".to_owned());
        let d = differing_parameters(&a, &b);
        assert_eq!(
            d,
            vec![(
                "parameters.group.size".to_owned(),
                "3".to_owned(),
                "5".to_owned()
            )]
        );
    }
}
