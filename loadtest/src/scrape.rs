//! The server's own Prometheus metrics, scraped before and after a run.
//!
//! A plain HTTP/1.1 GET of the exposition text (what every Chappe service
//! serves on `/metrics`); the report keeps, per sample, the value before,
//! after, and the difference, which for `_total` counters is what the run
//! did. An unreachable endpoint is noted, never fatal: the figures of the
//! run stand on the load generator's own measurements.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest exposition accepted (16 MiB).
const MAX_BODY: usize = 16 << 20;

/// Samples by their full name with labels, e.g. `x_total{a="b"}`.
pub type Samples = BTreeMap<String, f64>;

/// Fetches and parses `url` (`http://host:port/path`).
pub async fn scrape(url: &str, timeout: Duration) -> Result<Samples, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// is supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let fetch = async {
        let mut stream = TcpStream::connect(authority)
            .await
            .map_err(|e| e.to_string())?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .take(MAX_BODY as u64 + 64 * 1024)
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(response)
    };
    let response = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP response"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{url}: {status}"));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Err(format!("{url}: chunked responses are not supported"));
    }
    Ok(parse(body))
}

/// Parses Prometheus text exposition: `name{labels} value [timestamp]`.
pub fn parse(text: &str) -> Samples {
    let mut samples = Samples::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The value follows the name and its labels (which may hold spaces
        // inside quotes): split after the closing brace if there is one.
        let (name, rest) = match line.rfind('}') {
            Some(i) => (&line[..=i], &line[i + 1..]),
            None => match line.split_once(char::is_whitespace) {
                Some((n, r)) => (n, r),
                None => continue,
            },
        };
        if let Some(Ok(value)) = rest.split_whitespace().next().map(str::parse::<f64>) {
            samples.insert(name.to_owned(), value);
        }
    }
    samples
}

/// Before, after and after − before for every sample present after.
pub fn delta(before: &Samples, after: &Samples) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (name, value) in after {
        let was = before.get(name).copied().unwrap_or(0.0);
        out.insert(
            name.clone(),
            serde_json::json!({ "before": was, "after": value, "delta": value - was }),
        );
    }
    serde_json::Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_text_parses() {
        let s = parse(
            "# HELP x_total things\n# TYPE x_total counter\nx_total{a=\"b c\",d=\"e\"} 3 1700000000\nup 1\n\nbad line\n",
        );
        assert_eq!(s.get("x_total{a=\"b c\",d=\"e\"}"), Some(&3.0));
        assert_eq!(s.get("up"), Some(&1.0));
        assert_eq!(s.len(), 2);
        let d = delta(&parse("x_total 2"), &parse("x_total 5"));
        assert_eq!(d["x_total"]["delta"], 3.0);
    }
}
