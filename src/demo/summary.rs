//! Several seeds of the demo side by side (`rlhf demo --seeds 0,1,2`): every method
//! against every family with the seeds' mean and range, the full run's bar per seed,
//! per-family bars, the training curves of every seed, each seed's answers, and the
//! machine and settings. Read from the seeds' own reports, so each figure here can be
//! traced to one `report.json`.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use super::plot::{bars_svg, curve_svg, BarSeries};
use super::report::{curve, esc, Report, CURVES};
use crate::error::{Error, Result};
use crate::io::{write_atomic, write_json};

/// Mean, lowest and highest of one figure over the seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` when no seed has the figure; seeds without it are left out.
    pub fn of(values: impl IntoIterator<Item = Option<f64>>) -> Option<Self> {
        let v: Vec<f64> = values.into_iter().flatten().collect();
        if v.is_empty() {
            return None;
        }
        Some(Spread {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }

    fn cell(s: Option<Self>) -> String {
        s.map_or("-".into(), |s| {
            format!("{:.3} ({:.3}…{:.3})", s.mean, s.min, s.max)
        })
    }
}

/// One policy's figures over the seeds.
#[derive(Debug, Clone, Serialize)]
pub struct PolicySummary {
    pub gold_score: Option<Spread>,
    pub families: BTreeMap<String, Spread>,
    pub win_rate_vs_sft: Option<Spread>,
    pub kl_to_sft_eval: Option<Spread>,
    pub ptx_loss_held_out: Option<Spread>,
    pub distinct_answers: Option<Spread>,
    /// The training stage's wall time, seconds.
    pub train_s: Option<Spread>,
    pub peak_rss_mib: Option<Spread>,
}

/// Every seed's report and the figures over them.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub task: String,
    pub quick: bool,
    pub cpu: String,
    pub seeds: Vec<u64>,
    pub policies: BTreeMap<String, PolicySummary>,
    pub rm_val_accuracy: Option<Spread>,
    /// Whether each seed's PPO meets the full run's bar, by seed.
    pub thresholds_met: BTreeMap<u64, bool>,
    pub elapsed_s: Option<Spread>,
    /// Each seed's run folder, relative to the summary's.
    pub runs: Vec<PathBuf>,
}

impl Summary {
    pub fn new(reports: &[Report], runs: Vec<PathBuf>) -> Result<Self> {
        let first = reports
            .first()
            .ok_or_else(|| Error::Invalid("a summary needs at least one seed's report".into()))?;
        if let Some(r) = reports
            .iter()
            .find(|r| r.task != first.task || r.quick != first.quick)
        {
            return Err(Error::Invalid(format!(
                "seed {} ran task {} (quick {}), seed {} task {} (quick {}): a summary compares one setting",
                first.seed, first.task, first.quick, r.seed, r.task, r.quick
            )));
        }
        let mut policies = BTreeMap::new();
        for (name, _) in first.columns() {
            let stage = Report::stage_of(name);
            let each = |f: &dyn Fn(&Report) -> Option<f64>| Spread::of(reports.iter().map(f));
            let policy = |r: &Report| r.policies.get(name).cloned();
            let families = first
                .family_counts
                .keys()
                .filter_map(|fam| {
                    let s = each(&|r| policy(r).and_then(|p| p.families.get(fam).copied()))?;
                    Some((fam.clone(), s))
                })
                .collect();
            policies.insert(
                name.to_string(),
                PolicySummary {
                    gold_score: each(&|r| policy(r).map(|p| p.gold_score)),
                    families,
                    win_rate_vs_sft: each(&|r| policy(r).and_then(|p| p.win_rate_vs_sft)),
                    kl_to_sft_eval: each(&|r| policy(r).and_then(|p| p.kl_to_sft_eval)),
                    ptx_loss_held_out: each(&|r| policy(r).map(|p| p.ptx_loss_held_out)),
                    distinct_answers: each(&|r| policy(r).map(|p| p.distinct_answers)),
                    train_s: each(&|r| r.elapsed_s.get(stage).copied()),
                    peak_rss_mib: each(&|r| r.peak_rss_mib.get(stage).map(|m| m.peak_mib)),
                },
            );
        }
        Ok(Summary {
            task: first.task.clone(),
            quick: first.quick,
            cpu: first.cpu.clone(),
            seeds: reports.iter().map(|r| r.seed).collect(),
            policies,
            rm_val_accuracy: Spread::of(reports.iter().map(|r| Some(r.rm_val_accuracy))),
            thresholds_met: reports
                .iter()
                .filter_map(|r| Some((r.seed, r.thresholds.as_ref()?.all)))
                .collect(),
            elapsed_s: Spread::of(reports.iter().map(|r| r.elapsed_s.get("total").copied())),
            runs,
        })
    }

    /// The policies in table order.
    fn columns(&self) -> Vec<(&str, &PolicySummary)> {
        super::report::POLICY_ORDER
            .iter()
            .filter_map(|&n| self.policies.get(n).map(|p| (n, p)))
            .collect()
    }

    fn families(&self) -> Vec<String> {
        self.policies
            .get("sft")
            .map(|p| p.families.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The table: one row per policy, one column per figure, each cell the seeds'
    /// mean (lowest…highest).
    pub fn table(&self) -> (Vec<String>, Vec<(String, Vec<String>)>) {
        let fams = self.families();
        let mut header = vec!["gold score".to_string()];
        header.extend(fams.iter().cloned());
        header.extend(
            [
                "win rate vs SFT",
                "KL to SFT (eval)",
                "ptx loss (held-out)",
                "distinct answers",
                "train s",
                "peak RSS MiB",
            ]
            .map(String::from),
        );
        let rows = self
            .columns()
            .into_iter()
            .map(|(name, p)| {
                let mut cells = vec![Spread::cell(p.gold_score)];
                cells.extend(
                    fams.iter()
                        .map(|f| Spread::cell(p.families.get(f).copied())),
                );
                cells.extend(
                    [
                        p.win_rate_vs_sft,
                        p.kl_to_sft_eval,
                        p.ptx_loss_held_out,
                        p.distinct_answers,
                        p.train_s,
                        p.peak_rss_mib,
                    ]
                    .map(Spread::cell),
                );
                (name.to_string(), cells)
            })
            .collect();
        (header, rows)
    }

    /// The table on stderr, one block per policy (the cells are too wide for one line).
    pub fn print(&self) {
        crate::note!(
            "\n{} task, seeds {:?}{}; {}",
            self.task,
            self.seeds,
            if self.quick { " (--quick)" } else { "" },
            self.cpu
        );
        let (header, rows) = self.table();
        for (name, cells) in rows {
            crate::note!("{name}: mean (lowest…highest) over the seeds");
            for (h, c) in header.iter().zip(cells) {
                if c != "-" {
                    crate::note!("  {h:<22}{c}");
                }
            }
        }
        crate::note!("RM val accuracy {}", Spread::cell(self.rm_val_accuracy));
        for (seed, met) in &self.thresholds_met {
            crate::note!(
                "seed {seed}: PPO {} the full run's bar",
                if *met { "meets" } else { "does NOT meet" }
            );
        }
    }

    pub fn write(&self, out: &Path, reports: &[Report]) -> Result<()> {
        let value =
            serde_json::to_value(self).map_err(|e| Error::Invalid(format!("demo summary: {e}")))?;
        write_json(&out.join("summary.json"), &value)?;
        write_atomic(
            &out.join("summary.html"),
            self.html(out, reports)?.as_bytes(),
        )
    }

    fn html(&self, out: &Path, reports: &[Report]) -> Result<String> {
        let mut html = String::from(super::report::HTML_HEAD);
        let cols = self.columns();
        let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
        let _ = write!(
            html,
            "<h1>rlhf demo: {} over seeds {}</h1><p>Task <b>{}</b>{}. Every policy is trained \
             from the same SFT model of its seed and evaluated on that seed's held-out prompts \
             (never in any training data). Each cell is the mean over the seeds with the \
             lowest and highest seed in brackets.</p>",
            esc(&names.join(", ")),
            esc(&format!("{:?}", self.seeds)),
            esc(&self.task),
            if self.quick {
                ", --quick runs"
            } else {
                ", full runs"
            },
        );
        let (header, rows) = self.table();
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        html.push_str("<h2>Summary</h2>");
        html.push_str(&super::report::labelled_table(&header, &rows));
        let _ = write!(
            html,
            "<p>Reward model accuracy on its held-out comparisons: {}.</p><ul>",
            esc(&Spread::cell(self.rm_val_accuracy))
        );
        for r in reports {
            if let Some(t) = &r.thresholds {
                let _ =
                    write!(
                    html,
                    "<li>seed {}: PPO {} the full run's bar (win rate ≥ {}, RM accuracy ≥ {}, no \
                     family worse than SFT, held-out LM loss ≤ {}× SFT's){}</li>",
                    r.seed,
                    if t.all { "meets" } else { "<b>does not meet</b>" },
                    super::report::MIN_WIN_RATE,
                    super::report::MIN_RM_ACCURACY,
                    super::report::MAX_PTX_LOSS_RATIO,
                    if t.families_worse.is_empty() {
                        String::new()
                    } else {
                        format!("; worse: {}", esc(&t.families_worse.join(", ")))
                    }
                );
            }
        }
        html.push_str("</ul><h2>Gold score per family</h2>");
        let fams = self.families();
        let bars: Vec<BarSeries> = cols
            .iter()
            .map(|(n, p)| {
                let per = fams
                    .iter()
                    .map(|f| {
                        p.families
                            .get(f)
                            .map_or((0.0, 0.0, 0.0), |s| (s.mean, s.min, s.max))
                    })
                    .collect();
                (n.to_string(), per)
            })
            .collect();
        let fam_refs: Vec<&str> = fams.iter().map(String::as_str).collect();
        html.push_str(&bars_svg(
            "mean gold score (whiskers: the seeds' range)",
            &fam_refs,
            &bars,
        )?);
        html.push_str("<h2>Training curves</h2><div>");
        for (title, stage, metric) in CURVES {
            let series: Vec<(String, Vec<(f64, f64)>)> = self
                .runs
                .iter()
                .zip(&self.seeds)
                .map(|(run, seed)| {
                    (
                        format!("seed {seed}"),
                        curve(&out.join(run).join(stage), metric),
                    )
                })
                .filter(|(_, p)| !p.is_empty())
                .collect();
            if !series.is_empty() {
                html.push_str(&curve_svg(title, metric, &series)?);
            }
        }
        html.push_str("</div><h2>Answers on held-out prompts</h2>");
        for (r, run) in reports.iter().zip(&self.runs) {
            let _ = write!(
                html,
                "<details><summary>seed {} ({} prompts; <a href=\"{}\">its report</a>)</summary>",
                r.seed,
                r.prompts.len(),
                esc(&run.join("report.html").display().to_string())
            );
            html.push_str(&super::report::answers_table(r));
            html.push_str("</details>");
        }
        let _ = write!(
            html,
            "<h2>Machine and settings</h2><p>{}</p><p>Whole run per seed, seconds: {}.</p>{}</body>",
            esc(&self.cpu),
            esc(&Spread::cell(self.elapsed_s)),
            super::report::settings_table(reports.first().map(|r| &r.settings))
        );
        Ok(html)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(gold: f64, known: f64, win: Option<f64>) -> serde_json::Value {
        json!({"gold_score": gold, "families": {"arithmetic": 2.0 * gold - known, "known": known},
               "distinct_answers": 0.5, "end_tokens_greedy": {}, "end_tokens_sampled": {},
               "ptx_loss_held_out": 2.0, "win_rate_vs_sft": win, "kl_to_sft_eval": win.map(|w| w * 2.0)})
    }

    fn report(seed: u64, ppo_known: f64, win: f64, all: bool) -> Report {
        serde_json::from_value(json!({
            "seed": seed, "task": "3h", "quick": true, "cpu": "test CPU", "methods": ["ppo"],
            "policies": {"sft": policy(-0.5, -1.0, None), "ppo": policy(0.1, ppo_known, Some(win))},
            "rm_val_accuracy": 0.7 + seed as f64 * 0.01, "ppo_kl_last_training_iteration": 1.0,
            "eval_prompts": 4, "family_counts": {"arithmetic": 2, "known": 2},
            "held_out_documents": 3,
            "thresholds": {"win_rate": all, "rm_accuracy": true, "families_worse": [], "ptx_loss": true, "all": all},
            "elapsed_s": {"ppo": 10.0 + seed as f64, "total": 100.0}, "peak_rss_mib": {},
            "prompts": []
        }))
        .unwrap()
    }

    #[test]
    fn the_summary_takes_each_figure_from_every_seed() {
        let reports = [
            report(0, 0.5, 0.8, true),
            report(1, -0.5, 0.6, false),
            report(2, 0.0, 0.7, true),
        ];
        let runs = ["seed-0", "seed-1", "seed-2"].map(PathBuf::from).to_vec();
        let s = Summary::new(&reports, runs).unwrap();
        assert_eq!(s.seeds, [0, 1, 2]);
        let ppo = &s.policies["ppo"];
        let known = ppo.families["known"];
        assert!(
            known.mean.abs() < 1e-12 && known.min == -0.5 && known.max == 0.5,
            "{known:?}"
        );
        let win = ppo.win_rate_vs_sft.unwrap();
        assert!((win.mean - 0.7).abs() < 1e-12 && win.min == 0.6 && win.max == 0.8);
        assert_eq!(ppo.train_s.unwrap().max, 12.0);
        assert_eq!(s.policies["sft"].win_rate_vs_sft, None);
        assert_eq!(
            s.thresholds_met,
            BTreeMap::from([(0, true), (1, false), (2, true)])
        );
        let (header, rows) = s.table();
        assert_eq!(
            rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
            ["sft", "ppo"]
        );
        let col = header.iter().position(|h| h == "known").unwrap();
        assert_eq!(rows[1].1[col], "0.000 (-0.500…0.500)");
    }

    #[test]
    fn seeds_of_different_settings_are_refused() {
        let mut other = report(1, 0.0, 0.5, true);
        other.quick = false;
        let err = Summary::new(&[report(0, 0.0, 0.5, true), other], vec![]).unwrap_err();
        assert!(
            err.to_string().contains("a summary compares one setting"),
            "{err}"
        );
    }

    #[test]
    fn a_spread_is_mean_lowest_and_highest_of_the_seeds_that_have_the_figure() {
        let s = Spread::of([Some(0.5), None, Some(0.8), Some(0.2)]).unwrap();
        assert!((s.mean - 0.5).abs() < 1e-12);
        assert_eq!((s.min, s.max), (0.2, 0.8));
        assert_eq!(Spread::of([None, None]), None);
        assert_eq!(Spread::cell(Some(s)), "0.500 (0.200…0.800)");
    }
}
