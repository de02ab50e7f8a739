//! `rlhf chat`: a conversation in the terminal. Each line you type is a user message;
//! the reply streams as it is sampled, by the same engine `rlhf serve` runs, and the
//! history is rendered with the model's chat template on every turn. Commands:
//! `/reset` (forget the conversation, keep the system prompt), `/system TEXT`,
//! `/save FILE` (the conversation as `{"messages": [...]}`), `/help`, `/quit`.
//! Reading stdin to its end (a pipe) works too: one turn per line.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use super::encode::{Message, PromptEncoder};
use super::engine::{self, EngineConfig, Event, GenParams, Job};
use crate::settings::{at_least, float, Range, Settings};

#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct ChatArgs {
    /// HF model folder with a chat template.
    #[arg(long)]
    pub model: PathBuf,
    /// The system prompt to start with (`/system TEXT` changes it).
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens per reply, at most.
    #[arg(long, default_value_t = 256)]
    pub max_completion_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.7, value_parser = crate::settings::finite_f32)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, value_parser = crate::settings::finite_f32)]
    pub top_p: f32,
    /// Turn i samples with seed + i (random when absent).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl Settings for ChatArgs {
    fn validate(&self) -> crate::Result<()> {
        at_least("max_completion_tokens", self.max_completion_tokens, 1)?;
        float("temperature", self.temperature, Range::Closed(0.0, 2.0))?;
        float("top_p", self.top_p, Range::LeftOpen(0.0, 1.0))
    }
}

/// The conversation: an optional system prompt and the turns.
#[derive(Debug, Default)]
struct Conversation {
    system: Option<String>,
    turns: Vec<Message>,
}

impl Conversation {
    fn messages(&self) -> Vec<Message> {
        let system = self.system.iter().map(|s| Message {
            role: "system".into(),
            content: s.clone(),
        });
        system.chain(self.turns.iter().cloned()).collect()
    }
}

fn note(interactive: bool, msg: &str) {
    if interactive {
        crate::note!("{msg}");
    } else {
        crate::note!("[{msg}]");
    }
}

/// `rlhf chat`, with settings already validated.
pub fn run(a: &ChatArgs) -> Result<()> {
    let pre = super::load(&a.model)?;
    if pre.tokenizer.chat_template().is_none() {
        bail!(
            "{} has no chat template (no chat_template.jinja and no \"chat_template\" in tokenizer_config.json)",
            a.model.display()
        );
    }
    let encoder = PromptEncoder::new(pre.tokenizer.clone())?;
    let config = EngineConfig {
        max_batch: 1,
        prefill_chunk: 256,
    };
    let handle = engine::spawn(super::engine_for(&pre, config), 1)?;
    let context = handle.context_length;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        crate::note!(
            "chatting with {}; /help lists the commands, Ctrl-D ends",
            a.model.display()
        );
    }
    let mut convo = Conversation {
        system: a.system.clone(),
        turns: vec![],
    };
    let stdout = std::io::stdout();
    let mut turn = 0u64;
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let text = line.trim_end_matches(['\r', '\n']);
        if let Some(cmd) = text.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "reset" => {
                    convo.turns.clear();
                    note(interactive, "conversation cleared");
                }
                "system" => {
                    convo.system = (!arg.trim().is_empty()).then(|| arg.to_string());
                    note(interactive, "system prompt set");
                }
                "save" => {
                    let path = arg.trim();
                    if path.is_empty() {
                        note(interactive, "usage: /save FILE");
                        continue;
                    }
                    let json = serde_json::json!({ "messages": convo.messages() });
                    match crate::io::write_json(std::path::Path::new(path), &json) {
                        Ok(()) => note(interactive, &format!("saved to {path}")),
                        Err(e) => note(interactive, &format!("error: {e}")),
                    }
                }
                "quit" | "exit" => break,
                "help" => note(
                    interactive,
                    "/reset clears the conversation, /system TEXT sets the system prompt, /save FILE writes it as JSON, /quit ends",
                ),
                _ => note(interactive, &format!("unknown command /{name}; /help lists them")),
            }
            continue;
        }
        if text.trim().is_empty() {
            continue;
        }
        convo.turns.push(Message {
            role: "user".into(),
            content: text.to_string(),
        });
        let prompt = match encoder.encode_messages(&convo.messages()) {
            Ok(p) => p,
            Err(e) => {
                convo.turns.pop();
                note(interactive, &format!("error: {e}"));
                continue;
            }
        };
        if prompt.len() + a.max_completion_tokens > context {
            convo.turns.pop();
            note(
                interactive,
                &format!(
                    "error: the conversation is {} tokens and a reply may take {}, but the model's context is {context} tokens; /reset starts over",
                    prompt.len(),
                    a.max_completion_tokens
                ),
            );
            continue;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            prompt,
            params: GenParams {
                max_tokens: a.max_completion_tokens,
                temperature: a.temperature,
                top_p: a.top_p,
                seed: a.seed.map(|s| s.wrapping_add(turn)),
                ..GenParams::default()
            },
            n: 1,
            events: tx,
        };
        turn += 1;
        if handle.submit(job).is_err() {
            bail!("the generation engine has stopped");
        }
        let mut reply = String::new();
        let mut out = stdout.lock();
        loop {
            match rx.blocking_recv() {
                Some(Event::Delta(d)) => {
                    reply.push_str(&d.text);
                    write!(out, "{}", d.text)
                        .and_then(|()| out.flush())
                        .map_err(|e| crate::Error::write(std::path::Path::new("<stdout>"), e))?;
                    if d.finish.is_some() {
                        break;
                    }
                }
                Some(Event::Error(m)) => bail!("{m}"),
                None => bail!("the generation engine has stopped"),
            }
        }
        writeln!(out).map_err(|e| crate::Error::write(std::path::Path::new("<stdout>"), e))?;
        convo.turns.push(Message {
            role: "assistant".into(),
            content: reply,
        });
    }
    Ok(())
}
