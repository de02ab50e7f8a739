//! The demo's report: a table on stderr, `report.json` with the measured numbers (and
//! every eval prompt's answers and scores, so each figure can be recomputed) and
//! `report.html` with the training curves (inline SVG) and the answers side by side.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use super::eval::{PolicyEval, PromptResult};
use crate::error::{read_to_string, Result};
use crate::io::{write_atomic, write_json};

/// The full run's bar, checked on every seed: PPO's win rate against SFT, the
/// reward model's held-out accuracy, no family worse than SFT's, and the
/// held-out language-modelling loss within 5 % of SFT's.
pub const MIN_WIN_RATE: f64 = 0.65;
pub const MIN_RM_ACCURACY: f64 = 0.72;
pub const MAX_PTX_LOSS_RATIO: f64 = 1.05;

/// Which of the full run's thresholds a run meets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Thresholds {
    pub win_rate: bool,
    pub rm_accuracy: bool,
    /// Families where PPO's mean score is below SFT's.
    pub families_worse: Vec<String>,
    pub ptx_loss: bool,
    pub all: bool,
}

impl Thresholds {
    pub fn check(sft: &PolicyEval, ppo: &PolicyEval, rm_accuracy: f64) -> Self {
        let win_rate = ppo.win_rate_vs_sft.is_some_and(|w| w >= MIN_WIN_RATE);
        let rm_accuracy = rm_accuracy >= MIN_RM_ACCURACY;
        let families_worse: Vec<String> = sft
            .families
            .iter()
            .filter(|(k, &v)| ppo.families.get(*k).is_none_or(|&p| p < v - 1e-9))
            .map(|(k, _)| k.clone())
            .collect();
        let ptx_loss = ppo.ptx_loss_held_out <= MAX_PTX_LOSS_RATIO * sft.ptx_loss_held_out;
        Thresholds {
            all: win_rate && rm_accuracy && families_worse.is_empty() && ptx_loss,
            win_rate,
            rm_accuracy,
            families_worse,
            ptx_loss,
        }
    }
}

/// A training stage's memory: the process's resident high-water mark during the
/// stage, and the resident memory at its start (held from earlier stages after
/// handing freed memory back). The stage's own footprint lies between
/// `peak_mib − start_mib` and `peak_mib`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StageMemory {
    pub peak_mib: f64,
    pub start_mib: f64,
}

/// The policies a report can hold, in the order tables show them.
pub const POLICY_ORDER: [&str; 6] = ["sft", "ppo", "ppo-ema", "dpo", "grpo", "rloo"];

/// Everything `rlhf demo` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub seed: u64,
    /// The built-in task (`3h` or `format`).
    pub task: String,
    pub quick: bool,
    /// The CPU it ran on (model and SIMD flags): numbers are for that kind of CPU.
    pub cpu: String,
    /// The methods trained from the SFT model (`--methods`).
    pub methods: Vec<String>,
    /// Each policy's evaluation by name: `sft`, each method, and `ppo-ema` with PPO.
    pub policies: BTreeMap<String, PolicyEval>,
    /// The reward model's accuracy on its held-out comparisons.
    pub rm_val_accuracy: f64,
    /// PPO's `objective/kl` (k1, summed per response) on the last training
    /// iteration's rollouts; compare `policies.ppo.kl_to_sft_eval` on the eval prompts.
    pub ppo_kl_last_training_iteration: Option<f64>,
    pub eval_prompts: usize,
    pub family_counts: BTreeMap<String, usize>,
    pub held_out_documents: usize,
    /// PPO against the full run's bar (when PPO ran).
    pub thresholds: Option<Thresholds>,
    /// Wall time of each stage, seconds.
    pub elapsed_s: BTreeMap<String, f64>,
    /// Peak resident memory of each training stage (Linux only).
    pub peak_rss_mib: BTreeMap<String, StageMemory>,
    /// Every eval prompt with each policy's greedy answer and its score.
    pub prompts: Vec<PromptResult>,
}

impl Report {
    pub fn write(&self, out: &Path) -> Result<()> {
        let value = serde_json::to_value(self)
            .map_err(|e| crate::error::Error::Invalid(format!("demo report: {e}")))?;
        write_json(&out.join("report.json"), &value)
    }

    /// The policies present, in table order.
    pub fn columns(&self) -> Vec<(&'static str, &PolicyEval)> {
        POLICY_ORDER
            .iter()
            .filter_map(|&n| self.policies.get(n).map(|p| (n, p)))
            .collect()
    }

    /// The stage that trained a policy (`ppo-ema` comes from the `ppo` stage).
    fn stage_of(policy: &str) -> &str {
        policy.strip_suffix("-ema").unwrap_or(policy)
    }

    /// The rows of the headline table: (label, one cell per column).
    pub fn table(&self) -> Vec<(String, Vec<String>)> {
        let cols = self.columns();
        let f = |x: f64| format!("{x:.3}");
        let o = |x: Option<f64>| x.map_or("-".to_string(), f);
        let mut rows = vec![(
            "gold score".to_string(),
            cols.iter()
                .map(|(_, p)| f(p.gold_score))
                .collect::<Vec<_>>(),
        )];
        for fam in self.family_counts.keys() {
            rows.push((
                format!("  {fam}"),
                cols.iter()
                    .map(|(_, p)| p.families.get(fam).copied().map_or("-".into(), f))
                    .collect(),
            ));
        }
        let mut add = |label: &str, cell: &dyn Fn(&str, &PolicyEval) -> String| {
            rows.push((
                label.to_string(),
                cols.iter().map(|(n, p)| cell(n, p)).collect(),
            ));
        };
        add("win rate vs SFT", &|_, p| o(p.win_rate_vs_sft));
        add("KL to SFT (eval prompts)", &|_, p| o(p.kl_to_sft_eval));
        add("ptx loss (held-out docs)", &|_, p| f(p.ptx_loss_held_out));
        add("distinct answers", &|_, p| f(p.distinct_answers));
        add("train wall time s", &|n, _| {
            self.elapsed_s
                .get(Self::stage_of(n))
                .map_or("-".into(), |s| format!("{s:.1}"))
        });
        add("peak RSS MiB (at start)", &|n, _| {
            self.peak_rss_mib
                .get(Self::stage_of(n))
                .map_or("-".into(), |m| {
                    format!("{:.0} ({:.0})", m.peak_mib, m.start_mib)
                })
        });
        rows
    }

    /// The headline table on stderr.
    pub fn print_table(&self) {
        crate::note!(
            "\n{} held-out prompts, {} held-out documents; {}",
            self.eval_prompts,
            self.held_out_documents,
            self.cpu
        );
        let header: String = self
            .columns()
            .iter()
            .map(|(n, _)| format!("{n:>10}"))
            .collect();
        crate::note!("{:<26}{header}", "");
        for (label, cells) in self.table() {
            let cells: String = cells.iter().map(|c| format!("{c:>10}")).collect();
            crate::note!("{label:<26}{cells}");
        }
        crate::note!("RM val accuracy {:.3}", self.rm_val_accuracy);
        if let Some(kl) = self.ppo_kl_last_training_iteration {
            crate::note!("KL on PPO's last training iteration {kl:.3}");
        }
        crate::note!(
            "elapsed s: {:.1} in all",
            self.elapsed_s.get("total").copied().unwrap_or(f64::NAN)
        );
        if let Some(t) = &self.thresholds {
            crate::note!(
                "thresholds (full run, PPO): win rate ≥ {MIN_WIN_RATE} {}, RM accuracy ≥ {MIN_RM_ACCURACY} {}, no family worse {}, ptx loss ≤ {MAX_PTX_LOSS_RATIO}× SFT {}",
                ok(t.win_rate),
                ok(t.rm_accuracy),
                if t.families_worse.is_empty() { "ok".to_string() } else { format!("FAIL ({})", t.families_worse.join(", ")) },
                ok(t.ptx_loss)
            );
        }
    }
}

fn ok(b: bool) -> &'static str {
    if b {
        "ok"
    } else {
        "FAIL"
    }
}

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

/// Writes report.html: the summary table, per-family bars, the training curves with
/// labelled axes, every eval prompt's answers side by side, and the machine. Every
/// string from the run (answers, prompts) is escaped.
pub fn write_html(out: &Path, report: &Report, plots: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let cols = report.columns();
    let mut html = String::from(
        "<!doctype html><meta charset=\"utf-8\"><title>rlhf demo report</title>\
         <style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}\
         table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}\
         td.t{text-align:left;white-space:pre-wrap}th{background:#f3f3f3}</style><body>",
    );
    let _ = write!(
        html,
        "<h1>rlhf demo: {} from one SFT model</h1><p>Task <b>{}</b>, seed {}, {} held-out prompts \
         (never in any training data) and {} held-out documents. {}</p>",
        esc(&cols.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")),
        esc(&report.task),
        report.seed,
        report.eval_prompts,
        report.held_out_documents,
        if report.quick { "A --quick run." } else { "" }
    );
    html.push_str("<h2>Summary</h2><table><tr><th></th>");
    for (n, _) in &cols {
        let _ = write!(html, "<th>{}</th>", esc(n));
    }
    html.push_str("</tr>");
    for (label, cells) in report.table() {
        let _ = write!(
            html,
            "<tr><th style=\"text-align:left\">{}</th>",
            esc(label.trim())
        );
        for c in cells {
            let _ = write!(html, "<td>{}</td>", esc(&c));
        }
        html.push_str("</tr>");
    }
    let _ = write!(
        html,
        "</table><p>Reward model accuracy on its held-out comparisons: {:.3}.</p>",
        report.rm_val_accuracy
    );
    html.push_str("<h2>Gold score per family</h2>");
    let families: Vec<&String> = report.family_counts.keys().collect();
    let bars: Vec<(String, Vec<f64>)> = cols
        .iter()
        .map(|(n, p)| {
            (
                n.to_string(),
                families
                    .iter()
                    .map(|f| p.families.get(*f).copied().unwrap_or(0.0))
                    .collect(),
            )
        })
        .collect();
    html.push_str(&svg_bars(
        &families.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
        &bars,
    ));
    html.push_str("<h2>Training curves</h2><div>");
    for (title, pts) in plots {
        html.push_str(&svg_plot(title, pts));
    }
    html.push_str(
        "</div><h2>Answers on held-out prompts</h2><table><tr><th>family</th><th>prompt</th>",
    );
    for (n, _) in &cols {
        let _ = write!(html, "<th>{}</th>", esc(n));
    }
    html.push_str("</tr>");
    for p in &report.prompts {
        let _ = write!(
            html,
            "<tr><td class=t>{}</td><td class=t>{}</td>",
            p.family.name(),
            esc(&p.prompt)
        );
        for (n, _) in &cols {
            match p.answers.get(*n) {
                Some(a) => {
                    let _ = write!(
                        html,
                        "<td class=t>{} <small>({:+.2})</small></td>",
                        esc(&a.text),
                        a.score
                    );
                }
                None => html.push_str("<td></td>"),
            }
        }
        html.push_str("</tr>");
    }
    let _ = write!(
        html,
        "</table><h2>Machine</h2><p>{}</p><p>Stage wall times (s): {}</p></body>",
        esc(&report.cpu),
        esc(&report
            .elapsed_s
            .iter()
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect::<Vec<_>>()
            .join(", "))
    );
    write_atomic(&out.join("report.html"), html.as_bytes())
}

/// Grouped bars: one group per category, one bar per series, with a legend.
pub fn svg_bars(categories: &[&str], series: &[(String, Vec<f64>)]) -> String {
    const COLORS: [&str; 6] = [
        "#888", "#2f5fd0", "#7aa0f0", "#d07a2f", "#2f9d5f", "#9d2f8a",
    ];
    let (w, h, pad) = (760.0, 240.0, 40.0);
    let all: Vec<f64> = series.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    let lo = all.iter().copied().fold(0.0f64, f64::min);
    let hi = all.iter().copied().fold(0.0f64, f64::max).max(lo + 1e-9);
    let y = |v: f64| h - pad - (v - lo) / (hi - lo) * (h - 2.0 * pad);
    let group_w = (w - 2.0 * pad) / categories.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">"#);
    let _ = write!(
        svg,
        r##"<line x1="{pad}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#444"/><text x="4" y="{:.0}" font-size="10">{hi:.2}</text><text x="4" y="{:.0}" font-size="10">{lo:.2}</text><text x="4" y="12" font-size="11">mean gold score</text>"##,
        w - pad,
        y(0.0),
        y(0.0),
        y(hi) + 4.0,
        y(lo)
    );
    for (c, cat) in categories.iter().enumerate() {
        let x0 = pad + c as f64 * group_w + group_w * 0.1;
        for (s, (_, values)) in series.iter().enumerate() {
            let v = values.get(c).copied().unwrap_or(0.0);
            let (top, bottom) = (y(v.max(0.0)), y(v.min(0.0)));
            let _ = write!(
                svg,
                r#"<rect x="{:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{v:.3}</title></rect>"#,
                x0 + s as f64 * bar_w,
                bar_w * 0.9,
                (bottom - top).max(0.5),
                COLORS[s % COLORS.len()]
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.0}" font-size="11" text-anchor="middle">{}</text>"#,
            x0 + group_w * 0.4,
            h - pad + 16.0,
            esc(cat)
        );
    }
    for (s, (name, _)) in series.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<rect x="{:.0}" y="{:.0}" width="10" height="10" fill="{}"/><text x="{:.0}" y="{:.0}" font-size="11">{}</text>"#,
            pad + s as f64 * 100.0,
            h - 14.0,
            COLORS[s % COLORS.len()],
            pad + s as f64 * 100.0 + 14.0,
            h - 5.0,
            esc(name)
        );
    }
    svg + "</svg>"
}
