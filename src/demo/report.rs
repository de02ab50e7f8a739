//! The demo's report: a table on stderr, `report.json` with the measured numbers and
//! `report.html` with the training curves (inline SVG) and SFT vs PPO responses side
//! by side.

use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

use crate::error::{read_to_string, Result};
use crate::model::hf::write_atomic;

/// (step, value) points of one metric in a stage's metrics.jsonl.
pub fn curve(stage_dir: &Path, metric: &str) -> Vec<(f64, f64)> {
    let Ok(text) = read_to_string(&stage_dir.join(crate::train::metrics::METRICS_FILE)) else {
        return vec![];
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(metric)?.as_f64()?)))
        .collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A small line plot as inline SVG.
pub fn svg_plot(title: &str, points: &[(f64, f64)]) -> String {
    let (w, h, pad) = (320.0, 180.0, 30.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"><text x="{pad}" y="16" font-size="12">{}</text>"#,
        esc(title)
    );
    if points.len() >= 2 {
        let (x0, x1) = points
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (y0, y1) = points
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let sx = |x: f64| pad + (x - x0) / (x1 - x0).max(1e-12) * (w - 2.0 * pad);
        let sy = |y: f64| h - pad - (y - y0) / (y1 - y0).max(1e-12) * (h - 2.0 * pad);
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="steelblue" stroke-width="1.5" points="{}"/><text x="2" y="{:.0}" font-size="10">{y1:.3}</text><text x="2" y="{:.0}" font-size="10">{y0:.3}</text><text x="{pad}" y="{:.0}" font-size="10">step {x0:.0}</text><text x="{:.0}" y="{:.0}" font-size="10">{x1:.0}</text>"#,
            path.join(" "),
            pad,
            h - pad,
            h - 8.0,
            w - pad - 20.0,
            h - 8.0
        );
    }
    svg + "</svg>"
}

/// Writes report.html: headline numbers, curves and sample responses.
pub fn write_html(
    out: &Path,
    report: &Value,
    plots: &[(String, Vec<(f64, f64)>)],
    samples: &[(String, String, String)],
) -> Result<()> {
    let mut html = String::from("<!doctype html><meta charset=\"utf-8\"><title>rlhf demo report</title><body style=\"font-family:sans-serif;max-width:1000px\"><h1>rlhf demo: SFT → RM → PPO-ptx</h1>");
    let _ = write!(
        html,
        "<h2>Results</h2><pre>{}</pre>",
        esc(&serde_json::to_string_pretty(report).unwrap_or_default())
    );
    html.push_str("<h2>Training curves</h2><div>");
    for (title, pts) in plots {
        html.push_str(&svg_plot(title, pts));
    }
    html.push_str("</div><h2>SFT vs PPO on held-out prompts</h2><table border=\"1\" cellpadding=\"4\" style=\"border-collapse:collapse\"><tr><th>prompt</th><th>SFT</th><th>PPO</th></tr>");
    for (p, a, b) in samples {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(p),
            esc(a),
            esc(b)
        );
    }
    html.push_str("</table></body>");
    write_atomic(&out.join("report.html"), html.as_bytes())
}
