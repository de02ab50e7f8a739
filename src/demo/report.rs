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

/// Everything `rlhf demo` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub seed: u64,
    /// The built-in task (`3h` or `format`).
    pub task: String,
    pub quick: bool,
    /// The CPU it ran on (model and SIMD flags): numbers are for that kind of CPU.
    pub cpu: String,
    pub sft: PolicyEval,
    pub ppo: PolicyEval,
    pub ema: PolicyEval,
    /// The reward model's accuracy on its held-out comparisons.
    pub rm_val_accuracy: f64,
    /// PPO's `objective/kl` (k1, summed per response) on the last training
    /// iteration's rollouts; compare `ppo.kl_to_sft_eval` on the eval prompts.
    pub ppo_kl_last_training_iteration: f64,
    pub eval_prompts: usize,
    pub family_counts: BTreeMap<String, usize>,
    pub held_out_documents: usize,
    pub thresholds: Thresholds,
    pub elapsed_s: BTreeMap<String, f64>,
    /// Every eval prompt with each policy's greedy answer and its score.
    pub prompts: Vec<PromptResult>,
}

impl Report {
    pub fn write(&self, out: &Path) -> Result<()> {
        let value = serde_json::to_value(self)
            .map_err(|e| crate::error::Error::Invalid(format!("demo report: {e}")))?;
        write_json(&out.join("report.json"), &value)
    }

    /// The headline table on stderr.
    pub fn print_table(&self) {
        let f = |x: f64| format!("{x:.3}");
        let o = |x: Option<f64>| x.map_or("-".to_string(), f);
        let row = |name: &str, a: String, b: String, c: String| {
            crate::note!("{name:<26}{a:>10}{b:>10}{c:>10}");
        };
        let (s, p, e) = (&self.sft, &self.ppo, &self.ema);
        crate::note!(
            "\n{} held-out prompts, {} held-out documents; {}",
            self.eval_prompts,
            self.held_out_documents,
            self.cpu
        );
        row("", "SFT".into(), "PPO".into(), "PPO-EMA".into());
        row(
            "gold score",
            f(s.gold_score),
            f(p.gold_score),
            f(e.gold_score),
        );
        for (fam, v) in &s.families {
            let get = |pe: &PolicyEval| pe.families.get(fam).copied().map_or("-".into(), f);
            row(&format!("  {fam}"), f(*v), get(p), get(e));
        }
        row(
            "win rate vs SFT",
            String::new(),
            o(p.win_rate_vs_sft),
            o(e.win_rate_vs_sft),
        );
        row(
            "KL to SFT (eval prompts)",
            String::new(),
            o(p.kl_to_sft_eval),
            o(e.kl_to_sft_eval),
        );
        row(
            "KL (last PPO iteration)",
            String::new(),
            f(self.ppo_kl_last_training_iteration),
            String::new(),
        );
        row(
            "ptx loss (held-out docs)",
            f(s.ptx_loss_held_out),
            f(p.ptx_loss_held_out),
            f(e.ptx_loss_held_out),
        );
        row(
            "distinct answers",
            f(s.distinct_answers),
            f(p.distinct_answers),
            f(e.distinct_answers),
        );
        row(
            "RM val accuracy",
            f(self.rm_val_accuracy),
            String::new(),
            String::new(),
        );
        row(
            "elapsed s",
            f(self.elapsed_s.get("total").copied().unwrap_or(f64::NAN)),
            String::new(),
            String::new(),
        );
        let t = &self.thresholds;
        crate::note!(
            "thresholds (full run): win rate ≥ {MIN_WIN_RATE} {}, RM accuracy ≥ {MIN_RM_ACCURACY} {}, no family worse {}, ptx loss ≤ {MAX_PTX_LOSS_RATIO}× SFT {}",
            ok(t.win_rate),
            ok(t.rm_accuracy),
            if t.families_worse.is_empty() { "ok".to_string() } else { format!("FAIL ({})", t.families_worse.join(", ")) },
            ok(t.ptx_loss)
        );
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

/// Writes report.html: headline numbers, curves and every eval prompt's answers.
pub fn write_html(out: &Path, report: &Report, plots: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let mut html = String::from("<!doctype html><meta charset=\"utf-8\"><title>rlhf demo report</title><body style=\"font-family:sans-serif;max-width:1000px\"><h1>rlhf demo: SFT → RM → PPO-ptx</h1>");
    let mut summary = serde_json::to_value(report).unwrap_or(Value::Null);
    if let Some(m) = summary.as_object_mut() {
        m.remove("prompts");
    }
    let _ = write!(
        html,
        "<h2>Results</h2><pre>{}</pre>",
        esc(&serde_json::to_string_pretty(&summary).unwrap_or_default())
    );
    html.push_str("<h2>Training curves</h2><div>");
    for (title, pts) in plots {
        html.push_str(&svg_plot(title, pts));
    }
    html.push_str("</div><h2>SFT vs PPO on held-out prompts</h2><table border=\"1\" cellpadding=\"4\" style=\"border-collapse:collapse\"><tr><th>family</th><th>prompt</th><th>SFT</th><th>PPO</th></tr>");
    for p in &report.prompts {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{} ({:+.2})</td><td>{} ({:+.2})</td></tr>",
            p.family.name(),
            esc(&p.prompt),
            esc(&p.sft),
            p.score_sft,
            esc(&p.ppo),
            p.score_ppo
        );
    }
    html.push_str("</table></body>");
    write_atomic(&out.join("report.html"), html.as_bytes())
}
