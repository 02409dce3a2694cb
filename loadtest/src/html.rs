//! A self-contained HTML page of a [`Report`]: no external assets, no
//! script. Plots are inline SVG drawn with `plotters` (SVG backend only; its
//! text is emitted as `<text>` elements that the browser lays out, so no
//! font files are needed).

use std::fmt::Write as _;

use plotters::prelude::*;

use crate::measure::Metric;
use crate::report::{Report, Summary, format_us};

const W: u32 = 900;
const H: u32 = 380;

/// Renders `report` as one HTML page.
pub fn render(report: &Report) -> String {
    let mut out = String::with_capacity(64 * 1024);
    // Writing into a String cannot fail.
    let _ = write_page(&mut out, report);
    out
}

fn write_page(o: &mut String, r: &Report) -> std::fmt::Result {
    let m = &r.meta;
    let title = format!("Chappe load test: {}", m.scenario);
    writeln!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>",
        esc(&title),
        esc(&title)
    )?;

    let problems = r.accounting_problems();
    if problems.is_empty() {
        o.push_str("<p class=\"ok\">Accounting OK: every send stored, every expected delivery made, no errors, nothing dropped.</p>\n");
    } else {
        writeln!(
            o,
            "<p class=\"bad\">Accounting failed: {}.</p>",
            esc(&problems.join("; "))
        )?;
    }

    o.push_str("<h2>Run</h2>\n<table class=\"kv\">\n");
    let load = &m.load;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "–".to_owned());
    let rows: Vec<(&str, String)> = vec![
        ("scenario", m.scenario.clone()),
        ("target", m.target.clone()),
        ("crypto", json_str(&m.crypto)),
        ("load mode", json_str(&load.mode)),
        (
            "target rate",
            opt(load.target_rate.map(|v| format!("{v:.1} msg/s"))),
        ),
        (
            "in flight per device",
            opt(load.in_flight_per_device.map(|v| v.to_string())),
        ),
        (
            "phases",
            format!(
                "warm-up {} s, measure {} s, drain {} s",
                load.warmup_s, load.measure_s, load.drain_s
            ),
        ),
        ("late threshold", format_us(load.late_threshold_us as f64)),
        ("devices", m.devices.to_string()),
        (
            "workers",
            format!("{} of {}", r.workers.len().max(1), m.worker.count),
        ),
        ("started", format_unix_ms(m.started_at_unix_ms)),
        ("duration", format!("{:.1} s", r.duration_s)),
        ("schema", r.schema.clone()),
    ];
    for (k, v) in rows {
        writeln!(o, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v))?;
    }
    o.push_str("</table>\n");
    if !m.parameters.is_null() {
        let p = serde_json::to_string_pretty(&m.parameters).unwrap_or_default();
        writeln!(o, "<h3>Scenario parameters</h3>\n<pre>{}</pre>", esc(&p))?;
    }

    o.push_str("<h2>Counts</h2>\n<table class=\"kv\">\n");
    let c = &r.counts;
    for (k, v) in [
        ("sent", c.sent),
        ("stored", c.stored),
        ("delivered", c.delivered),
        ("expected deliveries", c.expected_deliveries),
        ("errors", c.errors),
        ("dropped sends", c.dropped),
        ("late sends", c.late),
    ] {
        writeln!(o, "<tr><th>{k}</th><td>{v}</td></tr>")?;
    }
    for (k, v) in &c.errors_by_status {
        writeln!(o, "<tr><th>error {}</th><td>{v}</td></tr>", esc(k))?;
    }
    o.push_str("</table>\n");

    let t = &r.throughput;
    writeln!(
        o,
        "<h2>Throughput</h2>\n<p>Measured phase: seconds {}–{} ({:.1} s).</p>\n\
         <table class=\"kv\"><tr><th>sent</th><td>{:.1} msg/s</td></tr>\
         <tr><th>stored</th><td>{:.1} msg/s</td></tr>\
         <tr><th>delivered</th><td>{:.1} deliveries/s</td></tr></table>",
        t.from_s, t.to_s, t.seconds, t.sent_per_s, t.stored_per_s, t.delivered_per_s
    )?;

    o.push_str("<h2>Latency</h2>\n<h3>All samples</h3>\n");
    latency_table(o, &r.latency)?;
    if !r.measured_latency.is_empty() {
        o.push_str("<h3>Measured phase</h3>\n");
        latency_table(o, &r.measured_latency)?;
    }

    if let Some(s) = &r.step {
        writeln!(
            o,
            "<h2>Steps</h2>\n<p>A step holds when p99 send → delivered ≤ {}, with no error and no dropped send. \
             Knee: {}. Broke at: {}.</p>\n<table><tr><th>rate (msg/s)</th><th>seconds</th>\
             <th>p99</th><th>errors</th><th>dropped</th><th>held</th></tr>",
            esc(&format_us(s.threshold_us as f64)),
            opt(s.knee_rate.map(|v| format!("{v:.1} msg/s"))),
            opt(s.broke_at_rate.map(|v| format!("{v:.1} msg/s"))),
        )?;
        for st in &s.steps {
            writeln!(
                o,
                "<tr><td>{:.1}</td><td>{}–{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                st.rate,
                st.from_s,
                st.to_s,
                opt(st.p99_us.map(|v| format_us(v as f64))),
                st.errors,
                st.dropped,
                if st.held { "ok" } else { "bad" },
                if st.held { "yes" } else { "no" }
            )?;
        }
        o.push_str("</table>\n");
    }

    if let Some(s) = &r.setup {
        writeln!(
            o,
            "<h2>Setup</h2>\n<p>{} devices set up in {:.1} s ({:.1} devices/s).</p>",
            s.devices, s.seconds, s.devices_per_second
        )?;
    }

    o.push_str("<h2>Plots</h2>\n");
    for (caption, svg) in [
        (
            "Latency over time: p50 and p99 per second",
            latency_over_time(r),
        ),
        (
            "Latency distribution (percentile spectrum)",
            percentile_spectrum(r),
        ),
        ("Throughput over time", throughput_over_time(r)),
    ] {
        match svg {
            Ok(svg) => writeln!(
                o,
                "<figure>{svg}<figcaption>{}</figcaption></figure>",
                esc(caption)
            )?,
            Err(e) => writeln!(
                o,
                "<p class=\"bad\">{}: plot failed: {}</p>",
                esc(caption),
                esc(&e)
            )?,
        }
    }

    if !r.workers.is_empty() {
        o.push_str(
            "<h2>Workers</h2>\n<table><tr><th>index</th><th>host</th><th>CPUs</th>\
             <th>memory</th><th>OS</th><th>devices</th><th>started</th><th>duration</th></tr>\n",
        );
        for w in &r.workers {
            writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1} GiB</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1} s</td></tr>",
                w.index,
                esc(&w.machine.hostname),
                w.machine.cpus,
                w.machine.memory_bytes as f64 / (1u64 << 30) as f64,
                esc(&w.machine.os),
                w.devices,
                esc(&format_unix_ms(w.started_at_unix_ms)),
                w.duration_s
            )?;
        }
        o.push_str("</table>\n");
    }

    if let Some(sm) = &r.server_metrics {
        let p = serde_json::to_string_pretty(sm).unwrap_or_default();
        writeln!(o, "<h2>Server metrics</h2>\n<pre>{}</pre>", esc(&p))?;
    }
    if !m.notes.is_empty() {
        o.push_str("<h2>Notes</h2>\n<ul>\n");
        for n in &m.notes {
            writeln!(o, "<li>{}</li>", esc(n))?;
        }
        o.push_str("</ul>\n");
    }
    o.push_str("</body></html>\n");
    Ok(())
}

fn latency_table(
    o: &mut String,
    lat: &std::collections::BTreeMap<Metric, Summary>,
) -> std::fmt::Result {
    o.push_str(
        "<table><tr><th>metric</th><th>count</th><th>mean</th><th>min</th><th>p50</th>\
         <th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>\n",
    );
    for (m, s) in lat {
        write!(
            o,
            "<tr><th>{}</th><td>{}</td><td>{}</td>",
            esc(m.label()),
            s.count,
            format_us(s.mean_us)
        )?;
        for (_, v) in s.percentiles() {
            write!(o, "<td>{}</td>", format_us(v as f64))?;
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</table>\n");
    Ok(())
}

/// A line series of a plot.
struct Series {
    name: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE_: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);

fn latency_over_time(r: &Report) -> Result<String, String> {
    let mut series = Vec::new();
    for (m, colors) in [
        (Metric::SendToDelivered, [BLUE_, RED_]),
        (Metric::SendToStored, [GREEN_, ORANGE_]),
    ] {
        for ((q, pick), color) in [
            ("p50", (|s: &Summary| s.p50_us) as fn(&Summary) -> u64),
            ("p99", |s: &Summary| s.p99_us),
        ]
        .into_iter()
        .zip(colors)
        {
            series.push(Series {
                name: format!("{} {q}", m.label()),
                color,
                points: r
                    .timeline
                    .iter()
                    .filter_map(|i| {
                        i.latency
                            .get(&m)
                            .map(|s| (i.second as f64, pick(s) as f64 / 1000.0))
                    })
                    .collect(),
            });
        }
    }
    time_chart(r, "latency (ms)", series)
}

fn throughput_over_time(r: &Report) -> Result<String, String> {
    let pick = |f: fn(&crate::report::Interval) -> u64| -> Vec<(f64, f64)> {
        r.timeline
            .iter()
            .map(|i| (i.second as f64, f(i) as f64))
            .collect()
    };
    let series = vec![
        Series {
            name: "sent/s".to_owned(),
            color: BLUE_,
            points: pick(|i| i.sent),
        },
        Series {
            name: "stored/s".to_owned(),
            color: GREEN_,
            points: pick(|i| i.stored),
        },
        Series {
            name: "delivered/s".to_owned(),
            color: ORANGE_,
            points: pick(|i| i.delivered),
        },
        Series {
            name: "errors/s".to_owned(),
            color: RED_,
            points: pick(|i| i.errors),
        },
    ];
    time_chart(r, "per second", series)
}

fn y_max(series: &[Series]) -> f64 {
    let m = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    // Headroom for the legend in the upper left corner.
    if m > 0.0 { m * 1.4 } else { 1.0 }
}

fn time_chart(r: &Report, y_desc: &str, series: Vec<Series>) -> Result<String, String> {
    let x_max = (r.timeline.len() as f64).max(1.0);
    let y_max = y_max(&series);
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .margin_right(40)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .x_desc("seconds since start")
            .y_desc(y_desc)
            .y_label_formatter(&|v| short_number(*v))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(err)?;
        draw_series(&mut chart, series)?;
        root.present().map_err(err)?;
    }
    Ok(buf)
}

fn percentile_spectrum(r: &Report) -> Result<String, String> {
    let mut series = Vec::new();
    let mut x_max: f64 = 100.0;
    for (m, color) in [
        (Metric::SendToDelivered, BLUE_),
        (Metric::SendToStored, GREEN_),
    ] {
        let Ok(Some(h)) = r.histogram(m) else {
            continue;
        };
        let mut points = Vec::new();
        for v in h.iter_quantiles(5) {
            let q = v.quantile_iterated_to();
            let x = if q < 1.0 {
                1.0 / (1.0 - q)
            } else {
                f64::INFINITY
            };
            points.push((x, v.value_iterated_to() as f64 / 1000.0));
        }
        // Room for one more decade than the sample count resolves.
        let n = h.len().max(1) as f64;
        x_max = x_max.max(10f64.powf((n.log10()).ceil() + 1.0).min(1e7));
        series.push(Series {
            name: m.label().to_owned(),
            color,
            points,
        });
    }
    for s in &mut series {
        for p in &mut s.points {
            p.0 = p.0.clamp(1.0, x_max);
        }
    }
    let y_max = y_max(&series);
    let decades = x_max.log10().round() as i32;
    let key_points: Vec<f64> = (0..=decades).map(|k| 10f64.powi(k)).collect();
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .margin_right(40)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (1f64..x_max).log_scale().with_key_points(key_points),
                0f64..y_max,
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_label_formatter(&|x| percentile_label(*x))
            .y_label_formatter(&|v| short_number(*v))
            .draw()
            .map_err(err)?;
        draw_series(&mut chart, series)?;
        root.present().map_err(err)?;
    }
    Ok(buf)
}

fn draw_series<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    series: Vec<Series>,
) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate<From = (f64, f64)>,
{
    let mut any = false;
    for s in series {
        if s.points.is_empty() {
            continue;
        }
        any = true;
        let color = s.color;
        chart
            .draw_series(LineSeries::new(s.points, color.stroke_width(2)))
            .map_err(err)?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if any {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// `x` = 1 / (1 - q) as the percentile: 1 → 0%, 10 → 90%, 1000 → 99.9%.
fn percentile_label(x: f64) -> String {
    if x <= 1.0 {
        return "0%".to_owned();
    }
    let p = 100.0 - 100.0 / x;
    let decimals = (x.log10().round() as i64 - 2).max(0) as usize;
    format!("{p:.decimals$}%")
}

fn short_number(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn json_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// `2024-05-01 12:34:56 UTC` from Unix milliseconds; `–` for 0.
pub fn format_unix_ms(ms: u64) -> String {
    if ms == 0 {
        return "–".to_owned();
    }
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:960px;color:#222}\
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}\
th{background:#f4f4f4}table.kv th{text-align:left}table.kv td{text-align:left}\
pre{background:#f8f8f8;padding:.6em;overflow-x:auto}.ok{color:#1a7f37}.bad{color:#b42318;font-weight:bold}\
figure{margin:1em 0}figcaption{font-style:italic;color:#555}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(100.0), "99%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(100_000.0), "99.999%");
    }

    #[test]
    fn dates() {
        assert_eq!(format_unix_ms(0), "–");
        assert_eq!(format_unix_ms(1_700_000_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn escapes() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }
}
