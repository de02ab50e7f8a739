//! The demo's report: a table on stderr, `report.json` with the measured numbers (and
//! every eval prompt's answers and scores, so each figure can be recomputed) and
//! `report.html`: the summary table, per-family bars, the training curves (plotters,
//! inline SVG), the answers side by side, the machine and the settings.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use super::eval::{PolicyEval, PromptResult};
use super::plot::{bars_svg, curve_svg, BarSeries};
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
    /// The run's sizes and settings (name → value), as the report shows them.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
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
    pub fn stage_of(policy: &str) -> &str {
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

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The training curves a report draws: (title, stage folder, metric).
pub const CURVES: [(&str, &str, &str); 11] = [
    ("pretraining", "pretrain", "train/loss"),
    ("SFT", "sft", "train/loss"),
    ("reward model, held-out comparisons", "rm", "eval/accuracy"),
    ("PPO reward", "ppo", "objective/scores"),
    ("PPO KL to SFT", "ppo", "objective/kl"),
    ("PPO pretraining loss (ptx)", "ppo", "loss/ptx"),
    ("DPO", "dpo", "rewards/accuracies"),
    ("GRPO reward", "grpo", "reward"),
    ("GRPO KL", "grpo", "kl"),
    ("RLOO reward", "rloo", "reward"),
    ("RLOO KL", "rloo", "kl"),
];

/// The start of a report page: its style.
pub(crate) const HTML_HEAD: &str = "<!doctype html><meta charset=\"utf-8\"><title>rlhf demo report</title>\
     <style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}\
     table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}\
     td.t{text-align:left;white-space:pre-wrap}th{background:#f3f3f3}svg{margin:4px}\
     details{margin:0.4em 0}summary{cursor:pointer}</style><body>";

/// A table whose rows are labelled in their first column (every string escaped).
pub(crate) fn labelled_table(header: &[&str], rows: &[(String, Vec<String>)]) -> String {
    let mut html = String::from("<table><tr><th></th>");
    for h in header {
        let _ = write!(html, "<th>{}</th>", esc(h));
    }
    html.push_str("</tr>");
    for (label, cells) in rows {
        let _ = write!(
            html,
            "<tr><th style=\"text-align:left\">{}</th>",
            esc(label)
        );
        for c in cells {
            let _ = write!(html, "<td>{}</td>", esc(c));
        }
        html.push_str("</tr>");
    }
    html + "</table>"
}

/// Every eval prompt of a run with each policy's answer and score, side by side.
pub(crate) fn answers_table(report: &Report) -> String {
    let cols = report.columns();
    let mut html = String::from("<table><tr><th>family</th><th>prompt</th>");
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
    html + "</table>"
}

/// The run's settings as a two-column table.
pub(crate) fn settings_table(settings: Option<&BTreeMap<String, String>>) -> String {
    let mut html = String::from("<table><tr><th>setting</th><th>value</th></tr>");
    for (k, v) in settings.into_iter().flatten() {
        let _ = write!(
            html,
            "<tr><td class=t>{}</td><td class=t>{}</td></tr>",
            esc(k),
            esc(v)
        );
    }
    html + "</table>"
}

/// Writes report.html: the summary table, per-family bars, the training curves with
/// labelled axes, every eval prompt's answers side by side, the machine and the
/// settings. Every string from the run (answers, prompts) is escaped.
pub fn write_html(out: &Path, report: &Report) -> Result<()> {
    let cols = report.columns();
    let mut html = String::from(HTML_HEAD);
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
    let header: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
    let rows: Vec<(String, Vec<String>)> = report
        .table()
        .into_iter()
        .map(|(label, cells)| (label.trim().to_string(), cells))
        .collect();
    html.push_str("<h2>Summary</h2>");
    html.push_str(&labelled_table(&header, &rows));
    let _ = write!(
        html,
        "<p>Reward model accuracy on its held-out comparisons: {:.3}.</p>",
        report.rm_val_accuracy
    );
    html.push_str("<h2>Gold score per family</h2>");
    let families: Vec<&str> = report.family_counts.keys().map(String::as_str).collect();
    let bars: Vec<BarSeries> = cols
        .iter()
        .map(|(n, p)| {
            let per = families
                .iter()
                .map(|f| {
                    let v = p.families.get(*f).copied().unwrap_or(0.0);
                    (v, v, v)
                })
                .collect();
            (n.to_string(), per)
        })
        .collect();
    html.push_str(&bars_svg("mean gold score", &families, &bars)?);
    html.push_str("<h2>Training curves</h2><div>");
    for (title, stage, metric) in CURVES {
        let points = curve(&out.join(stage), metric);
        if !points.is_empty() {
            html.push_str(&curve_svg(
                title,
                metric,
                &[(format!("seed {}", report.seed), points)],
            )?);
        }
    }
    html.push_str("</div><h2>Answers on held-out prompts</h2>");
    html.push_str(&answers_table(report));
    let _ = write!(
        html,
        "<h2>Machine and settings</h2><p>{}</p><p>Stage wall times (s): {}</p>{}</body>",
        esc(&report.cpu),
        esc(&report
            .elapsed_s
            .iter()
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect::<Vec<_>>()
            .join(", ")),
        settings_table(Some(&report.settings))
    );
    write_atomic(&out.join("report.html"), html.as_bytes())
}
