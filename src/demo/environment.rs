//! What a built-in demo task is made of: prompt families, tasks with what the judge
//! needs to know, and the `Environment` a task's world provides (pretraining corpus,
//! held-out documents, training and held-out prompts, imperfect demonstrations).
//! Two worlds implement it: the 3H world (`world`) and the format world (`format`).

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The prompt families of both worlds and the criterion each tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// 3H, helpful: arithmetic with a checkable answer.
    Arithmetic,
    /// 3H, honest: a question the world's facts answer.
    Known,
    /// 3H, honest: a question they cannot answer.
    Unknown,
    /// 3H, harmless: a harmful request; the preferred answer declines politely.
    Harmful,
    /// Format: exactly N items of a category, comma separated.
    Count,
    /// Format: a word in capital letters.
    Capitals,
    /// Format: a one-word answer.
    OneWord,
    /// Tone: a polite greeting.
    Polite,
}

impl Family {
    /// The 3H world's families.
    pub const ALL: [Family; 4] = [
        Family::Arithmetic,
        Family::Known,
        Family::Unknown,
        Family::Harmful,
    ];
    /// The format world's families.
    pub const FORMAT: [Family; 4] = [
        Family::Count,
        Family::Capitals,
        Family::OneWord,
        Family::Polite,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Family::Arithmetic => "arithmetic",
            Family::Known => "known",
            Family::Unknown => "unknown",
            Family::Harmful => "harmful",
            Family::Count => "count",
            Family::Capitals => "capitals",
            Family::OneWord => "one_word",
            Family::Polite => "polite",
        }
    }
}

/// What the judge needs to know about a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub family: Family,
    pub prompt: String,
    /// The correct content (a number, a pet), when there is one.
    pub answer: Option<String>,
    /// The ideal response.
    pub reference: String,
}

impl Task {
    /// The two numbers of an arithmetic prompt (the words around "plus").
    pub fn operands(&self) -> Option<(&str, &str)> {
        let words: Vec<&str> = self.prompt.split_whitespace().collect();
        let i = words.iter().position(|&w| w == "plus")?;
        let a = words.get(i.checked_sub(1)?)?;
        let b = words.get(i + 1)?.trim_end_matches('?');
        Some((a, b))
    }

    /// The person a pet question asks about (word 4 of every `PET_QUESTIONS`).
    pub fn person(&self) -> Option<&str> {
        self.prompt.split_whitespace().nth(3)
    }
}

/// `frame` with each `{}` replaced by the next of `words`.
pub fn fill(frame: &str, words: &[&str]) -> String {
    let mut out = frame.to_string();
    for w in words {
        out = out.replacen("{}", w, 1);
    }
    out
}

/// `k` of `0..n`, drawn without replacement.
pub fn draw(n: usize, k: usize, rng: &mut ChaCha8Rng) -> BTreeSet<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(rng);
    all.into_iter().take(k).collect()
}

/// An index of `0..n` outside `held`, drawn uniformly: training prompts never use a
/// held-out entity.
pub fn pick_not_held(n: usize, held: &BTreeSet<usize>, rng: &mut ChaCha8Rng) -> usize {
    assert!(held.len() < n, "every entity is held out");
    loop {
        let i = rand::Rng::random_range(rng, 0..n);
        if !held.contains(&i) {
            return i;
        }
    }
}

/// `word` with its first letter in upper case.
pub fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// A built-in task's world: everything the demo makes its data from.
pub trait Environment {
    /// The families, in the order prompts cycle through them.
    fn families(&self) -> &'static [Family];
    /// Pretraining documents; never states a held-out document.
    fn corpus(&self, documents: usize, seed: u64) -> Vec<String>;
    /// Documents in the corpus's style that the corpus never states.
    fn held_out_documents(&self) -> Vec<String>;
    /// `n` training prompts cycling through the families.
    fn tasks(&self, n: usize, seed: u64) -> Vec<Task>;
    /// Every held-out prompt once: the evaluation set, never in a training stage.
    fn eval_tasks(&self) -> Vec<Task>;
    /// How often this task's labelers make their family's typical mistake in a
    /// demonstration. Above one half, SFT's greedy answer shows the flaw where a
    /// family has one kind of flaw (the 3h world); a family whose flaw comes in
    /// several kinds can still leave the correct answer the most likely one.
    fn flaw_rate(&self) -> f64;
    /// A labeler's demonstration, with the family's flaw in `flaw_rate` of them.
    fn demonstration(&self, task: &Task, flaw_rate: f64, rng: &mut ChaCha8Rng) -> String;
}

/// Every text a world makes: its corpus, its held-out documents and `tasks` training
/// prompts plus every eval prompt, each with its reference and a flawed
/// demonstration. The judge's lexicon is made of them.
pub fn texts(env: &dyn Environment, tasks: usize) -> Vec<String> {
    let mut out = env.corpus(500, 0);
    out.extend(env.held_out_documents());
    let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    for t in env.tasks(tasks, 0).iter().chain(&env.eval_tasks()) {
        let demo = env.demonstration(t, 1.0, &mut rng);
        out.push(format!("{} {} {demo}", t.prompt, t.reference));
    }
    out
}
