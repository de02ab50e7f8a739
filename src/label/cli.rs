//! `rlhf label`'s subcommands: their flags and what each runs.

use clap::{Args, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::store::{Kind, Store};
use super::{export, project, routes, select};
use crate::generate::SamplingParams;
use crate::settings::{at_least, finite_f32, Settings};

#[derive(Debug, Subcommand)]
pub enum LabelCommand {
    /// Create a project: prompts, and responses sampled from the model(s).
    New(NewArgs),
    /// Add a labeler; prints their personal link.
    AddLabeler(AddLabelerArgs),
    /// Serve the labeling pages.
    Serve(ServeArgs),
    /// Write the labels as JSONL for `rm train` or `sft`.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct NewArgs {
    /// The project's SQLite file (must not hold a project yet).
    #[arg(long)]
    pub db: PathBuf,
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// JSONL of {"prompt": text | messages} or {"messages": [...]}; without --model,
    /// rank and compare rows carry their own "responses": [...].
    #[arg(long)]
    pub prompts: PathBuf,
    /// rank: the model to sample K responses from (the SFT model); compare: give it
    /// twice, model A then model B.
    #[arg(long)]
    pub model: Vec<PathBuf>,
    /// Responses per prompt to rank.
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// How many different labelers label each item.
    #[arg(long, default_value_t = 1)]
    pub overlap: usize,
    /// Markdown instructions shown on every labeling page.
    #[arg(long)]
    pub guidelines: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0, value_parser = finite_f32)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, value_parser = finite_f32)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0, value_parser = finite_f32)]
    pub repetition_penalty: f32,
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts per generation batch (each brings its K samples).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// The address the printed admin link points to.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

impl NewArgs {
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            eos_token_ids: vec![],
            stop_strings: self.stop.clone(),
        }
    }
}

impl Settings for NewArgs {
    fn validate(&self) -> crate::Result<()> {
        self.sampling().validate()?;
        at_least("batch_size", self.batch_size, 1)?;
        at_least("overlap", self.overlap, 1)?;
        if self.kind == Kind::Rank {
            at_least("k", self.k, 2)?;
        }
        let models = self.model.len();
        let bad = |msg: &str| Err(crate::Error::Invalid(msg.into()));
        match self.kind {
            Kind::Compare if models != 0 && models != 2 => bad(
                "--kind compare takes --model twice (A, then B), or rows with two \"responses\"",
            ),
            Kind::Rank if models > 1 => bad("--kind rank takes one --model (K samples each)"),
            Kind::Demonstrate if models > 0 => bad("--kind demonstrate takes no --model"),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct AddLabelerArgs {
    #[arg(long)]
    pub db: PathBuf,
    pub name: String,
    /// Gives the admin page (progress, agreement, win rates) as well.
    #[arg(long)]
    pub admin: bool,
    /// The address the printed link points to.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct ServeArgs {
    #[arg(long)]
    pub db: PathBuf,
    /// Address to bind; the default answers this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Queue order: the file's, random, or the items the reward model separates least
    /// first (needs --reward_model).
    #[arg(long, value_enum, default_value_t = select::Select::Order)]
    pub select: select::Select,
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// Seed of --select random.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Minutes a labeler may hold an item before its slot goes to someone else.
    #[arg(long, default_value_t = 60.0)]
    pub lease_minutes: f64,
    /// Largest request body accepted, in bytes (larger: 413).
    #[arg(long, default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,
}

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct ExportArgs {
    #[arg(long)]
    pub db: PathBuf,
    #[arg(long, value_enum)]
    pub format: export::Format,
    /// One row per label instead of one consensus row per item.
    #[arg(long)]
    pub per_labeler: bool,
    /// Where to write the JSONL (default: stdout).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

fn link(url: &str, token: &str) -> String {
    format!("{}/?token={token}", url.trim_end_matches('/'))
}

/// Runs a `rlhf label` subcommand.
pub fn run(cmd: LabelCommand) -> anyhow::Result<()> {
    use anyhow::Context;
    match cmd {
        LabelCommand::New(a) => {
            a.validate().map_err(crate::settings::as_flag)?;
            let guidelines = match &a.guidelines {
                Some(p) => crate::error::read_to_string(p)?,
                None => String::new(),
            };
            if a.db.exists() && Store::open(&a.db)?.project().is_ok() {
                anyhow::bail!(
                    "{}: already holds a project; give a new --db",
                    a.db.display()
                );
            }
            let src = project::Source {
                kind: a.kind,
                prompts: &a.prompts,
                models: &a.model,
                k: a.k,
                sampling: a.sampling(),
                seed: a.seed,
                batch_size: a.batch_size,
            };
            let (items, models) = project::build_items(&src)?;
            let p = project::project(&src, a.overlap, guidelines, models);
            let mut store = Store::open(&a.db)?;
            store.create_project(&p, &items)?;
            let token = store.add_labeler("admin", true)?;
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "created {} ({} project, {} items); admin link (keep it private):\n{}",
                a.db.display(),
                a.kind.name(),
                items.len(),
                link(&a.url, &token)
            )
            .context("writing <stdout>")?;
            Ok(())
        }
        LabelCommand::AddLabeler(a) => {
            let mut store = Store::open_existing(&a.db)?;
            store.project()?;
            let token = store.add_labeler(&a.name, a.admin)?;
            writeln!(std::io::stdout().lock(), "{}", link(&a.url, &token))
                .context("writing <stdout>")?;
            Ok(())
        }
        LabelCommand::Serve(a) => {
            if !a.lease_minutes.is_finite() || a.lease_minutes <= 0.0 {
                anyhow::bail!("--lease_minutes must be > 0, got {}", a.lease_minutes);
            }
            at_least("max_body_bytes", a.max_body_bytes, 1024).map_err(crate::settings::as_flag)?;
            let mut store = Store::open_existing(&a.db)?;
            store.project()?;
            select::apply(&mut store, a.select, a.reward_model.as_deref(), a.seed)?;
            routes::serve(
                store,
                &crate::web::Listen {
                    host: a.host.clone(),
                    port: a.port,
                },
                a.lease_minutes * 60.0,
                a.max_body_bytes,
            )
        }
        LabelCommand::Export(a) => {
            let store = Store::open_existing(&a.db)?;
            let rows = export::export(&store, a.format, a.per_labeler)?;
            let mut text = String::new();
            for r in &rows {
                text.push_str(&r.to_string());
                text.push('\n');
            }
            match &a.output {
                Some(p) => crate::io::write_atomic(p, text.as_bytes())?,
                None => std::io::stdout()
                    .lock()
                    .write_all(text.as_bytes())
                    .map_err(|e| crate::Error::write(Path::new("<stdout>"), e))?,
            }
            crate::note!("exported {} rows", rows.len());
            Ok(())
        }
    }
}
