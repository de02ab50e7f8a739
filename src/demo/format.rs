//! The second built-in task, "format": short answers whose form and tone are what a
//! labeler judges, unlike the 3H world's facts. It exists to check that the demo's
//! recipe (and PPO's settings) carry over to a task they were not tuned on.
//!
//! Four families: list exactly N items of a category ("Name three fruits."), write a
//! word in capitals, answer in one word (an opposite), greet someone politely. The
//! demonstrations have each family's typical flaw (one item too many or too few,
//! lower case, a full sentence instead of one word, a rude greeting) in more than
//! half of them. As in the 3H world, entities are held back from every training
//! stage's prompts (category and count pairs, words, opposites, names); their facts
//! stay in the corpus (a word in capitals, an opposite, a polite greeting of a name),
//! as the 3H world's held-out people keep theirs, so a correct answer is learnable.
//! The held-out documents state combinations the corpus never states.

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;

use super::environment::{
    capitalized, draw, fill, pick_not_held, texts, Environment, Family, Task,
};

/// Categories and their items (one word each, lower case).
pub const CATEGORIES: [(&str, [&str; 6]); 6] = [
    ("animals", ["cat", "dog", "cow", "pig", "hen", "fox"]),
    ("colors", ["red", "blue", "green", "pink", "gray", "brown"]),
    ("fruits", ["apple", "pear", "plum", "lime", "fig", "grape"]),
    ("tools", ["hammer", "saw", "drill", "rope", "axe", "spade"]),
    ("drinks", ["tea", "milk", "juice", "water", "soup", "cocoa"]),
    (
        "shapes",
        ["circle", "square", "star", "heart", "oval", "cross"],
    ),
];
pub const COUNTS: [&str; 3] = ["two", "three", "four"];
pub const LIST_QUESTIONS: [&str; 3] = ["Name {} {}.", "List {} {}.", "Give me {} {}."];
/// Words to write in capitals.
pub const WORDS: [&str; 16] = [
    "cat", "red", "apple", "saw", "tea", "star", "river", "stone", "cloud", "bread", "music",
    "table", "garden", "window", "paper", "candle",
];
pub const CAPITAL_QUESTIONS: [&str; 3] = [
    "Write {} in capital letters.",
    "Spell {} in capitals.",
    "Write the word {} in upper case.",
];
pub const OPPOSITES: [(&str, &str); 16] = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("day", "night"),
    ("fast", "slow"),
    ("old", "new"),
    ("wet", "dry"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("loud", "quiet"),
    ("full", "empty"),
    ("hard", "soft"),
    ("near", "far"),
    ("rich", "poor"),
];
pub const OPPOSITE_QUESTIONS: [&str; 3] = [
    "In one word, what is the opposite of {}?",
    "One word only: the opposite of {}?",
    "Answer in one word: what is the opposite of {}?",
];
pub const NAMES: [&str; 16] = [
    "Anna", "Ben", "Cora", "Dev", "Ella", "Fred", "Gus", "Hana", "Ian", "Jade", "Kai", "Lola",
    "Max", "Nina", "Otto", "Rosa",
];
pub const GREET_QUESTIONS: [&str; 3] = ["Greet {}.", "Say hello to {}.", "Welcome {} please."];
pub const NICE: &str = "nice to meet you";
pub const RUDE: [&str; 2] = ["go away", "what do you want"];

const HELD_LISTS: usize = 4;
const HELD_WORDS: usize = 4;
const HELD_OPPOSITES: usize = 4;
const HELD_NAMES: usize = 4;
const HELD_DOC_EVERY: usize = 5;

/// The count and the category's items that a list prompt asks for ("… three fruits.").
fn list_spec(prompt: &str) -> Option<(usize, &'static [&'static str])> {
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let i = words.iter().position(|w| COUNTS.contains(w))?;
    let n = COUNTS.iter().position(|&c| c == words[i])? + 2;
    let cat = words.get(i + 1)?.trim_end_matches('.');
    let (_, items) = CATEGORIES.iter().find(|(c, _)| *c == cat)?;
    Some((n, &items[..]))
}

/// The format world: which entities it keeps back from training.
#[derive(Debug, Clone)]
pub struct FormatWorld {
    /// (category, count index) pairs no training prompt asks for.
    held_lists: BTreeSet<(usize, usize)>,
    held_words: BTreeSet<usize>,
    held_opposites: BTreeSet<usize>,
    held_names: BTreeSet<usize>,
}

#[derive(Debug, Clone, Copy)]
enum Doc {
    /// Two items of a category.
    Pair(usize, usize, usize),
    Capitals(usize),
    Opposite(usize),
    /// Someone greeting someone else politely.
    Meeting(usize, usize),
    Rude(usize),
}

impl FormatWorld {
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let pairs: Vec<(usize, usize)> = (0..CATEGORIES.len())
            .flat_map(|c| (0..COUNTS.len()).map(move |n| (c, n)))
            .collect();
        FormatWorld {
            held_lists: draw(pairs.len(), HELD_LISTS, &mut rng)
                .into_iter()
                .map(|i| pairs[i])
                .collect(),
            held_words: draw(WORDS.len(), HELD_WORDS, &mut rng),
            held_opposites: draw(OPPOSITES.len(), HELD_OPPOSITES, &mut rng),
            held_names: draw(NAMES.len(), HELD_NAMES, &mut rng),
        }
    }

    fn is_held_doc(doc: Doc) -> bool {
        let key = match doc {
            Doc::Pair(c, i, j) if i < j => 3 + 7 * c + 11 * i + 13 * j,
            Doc::Meeting(a, b) if a < b => 1 + 7 * a + 3 * b,
            _ => return false,
        };
        key % HELD_DOC_EVERY == 0
    }

    fn document(doc: Doc) -> String {
        match doc {
            Doc::Pair(c, i, j) => {
                let (cat, items) = CATEGORIES[c];
                format!("Some {cat} are {} and {}.", items[i], items[j])
            }
            Doc::Capitals(w) => format!(
                "The word {} in capitals is {}.",
                WORDS[w],
                WORDS[w].to_uppercase()
            ),
            Doc::Opposite(k) => {
                let (x, y) = OPPOSITES[k];
                format!("The opposite of {x} is {y}. The opposite of {y} is {x}.")
            }
            Doc::Meeting(a, b) => format!(
                "{} met {}. Hello {}, {NICE}, said {}.",
                NAMES[a], NAMES[b], NAMES[b], NAMES[a]
            ),
            Doc::Rude(a) => format!("Go away, {}, said the grumpy man.", NAMES[a]),
        }
    }

    fn list(c: usize, n: usize, question: &str, rng: &mut ChaCha8Rng) -> Task {
        let (cat, items) = CATEGORIES[c];
        let mut picked: Vec<&str> = items.to_vec();
        picked.shuffle(rng);
        picked.truncate(n + 2);
        Task {
            family: Family::Count,
            prompt: fill(question, &[COUNTS[n], cat]),
            answer: Some((n + 2).to_string()),
            reference: format!("{}.", picked.join(", ")),
        }
    }

    fn capitals(w: usize, question: &str) -> Task {
        Task {
            family: Family::Capitals,
            prompt: fill(question, &[WORDS[w]]),
            answer: Some(WORDS[w].to_uppercase()),
            reference: format!("{}.", WORDS[w].to_uppercase()),
        }
    }

    fn opposite(k: usize, question: &str) -> Task {
        let (x, y) = OPPOSITES[k];
        let cap = capitalized(y);
        Task {
            family: Family::OneWord,
            prompt: fill(question, &[x]),
            answer: Some(y.to_string()),
            reference: format!("{cap}."),
        }
    }

    fn greet(a: usize, question: &str) -> Task {
        Task {
            family: Family::Polite,
            prompt: fill(question, &[NAMES[a]]),
            answer: Some(NAMES[a].to_string()),
            reference: format!("Hello {}, {NICE}.", NAMES[a]),
        }
    }

    fn task(&self, family: Family, rng: &mut ChaCha8Rng) -> Task {
        match family {
            Family::Count => loop {
                let (c, n) = (
                    rng.random_range(0..CATEGORIES.len()),
                    rng.random_range(0..COUNTS.len()),
                );
                let q = LIST_QUESTIONS.choose(rng).expect("non-empty");
                if !self.held_lists.contains(&(c, n)) {
                    break Self::list(c, n, q, rng);
                }
            },
            Family::Capitals => {
                let w = pick_not_held(WORDS.len(), &self.held_words, rng);
                Self::capitals(w, CAPITAL_QUESTIONS.choose(rng).expect("non-empty"))
            }
            Family::OneWord => {
                let k = pick_not_held(OPPOSITES.len(), &self.held_opposites, rng);
                Self::opposite(k, OPPOSITE_QUESTIONS.choose(rng).expect("non-empty"))
            }
            _ => {
                let a = pick_not_held(NAMES.len(), &self.held_names, rng);
                Self::greet(a, GREET_QUESTIONS.choose(rng).expect("non-empty"))
            }
        }
    }
}

impl Environment for FormatWorld {
    fn families(&self) -> &'static [Family] {
        &Family::FORMAT
    }

    fn flaw_rate(&self) -> f64 {
        0.55
    }

    fn corpus(&self, documents: usize, seed: u64) -> Vec<String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..documents)
            .map(|i| loop {
                let doc = match i % 5 {
                    0 => Doc::Pair(
                        rng.random_range(0..CATEGORIES.len()),
                        rng.random_range(0..6),
                        rng.random_range(0..6),
                    ),
                    1 => Doc::Capitals(rng.random_range(0..WORDS.len())),
                    2 => Doc::Opposite(rng.random_range(0..OPPOSITES.len())),
                    3 => Doc::Meeting(
                        rng.random_range(0..NAMES.len()),
                        rng.random_range(0..NAMES.len()),
                    ),
                    _ => Doc::Rude(rng.random_range(0..NAMES.len())),
                };
                let same = matches!(doc, Doc::Pair(_, i, j) | Doc::Meeting(i, j) if i == j);
                if !same && !Self::is_held_doc(doc) {
                    break Self::document(doc);
                }
            })
            .collect()
    }

    fn held_out_documents(&self) -> Vec<String> {
        let n = NAMES.len();
        let pairs = (0..CATEGORIES.len())
            .flat_map(|c| (0..6).flat_map(move |i| (0..6).map(move |j| Doc::Pair(c, i, j))));
        let meetings = (0..n).flat_map(|a| (0..n).map(move |b| Doc::Meeting(a, b)));
        pairs
            .chain(meetings)
            .filter(|&d| Self::is_held_doc(d))
            .map(Self::document)
            .collect()
    }

    fn tasks(&self, n: usize, seed: u64) -> Vec<Task> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| self.task(Family::FORMAT[i % Family::FORMAT.len()], &mut rng))
            .collect()
    }

    fn eval_tasks(&self) -> Vec<Task> {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut out = vec![];
        for &(c, n) in &self.held_lists {
            out.extend(LIST_QUESTIONS.iter().map(|q| Self::list(c, n, q, &mut rng)));
        }
        for &w in &self.held_words {
            out.extend(CAPITAL_QUESTIONS.iter().map(|q| Self::capitals(w, q)));
        }
        for &k in &self.held_opposites {
            out.extend(OPPOSITE_QUESTIONS.iter().map(|q| Self::opposite(k, q)));
        }
        for &a in &self.held_names {
            out.extend(GREET_QUESTIONS.iter().map(|q| Self::greet(a, q)));
        }
        out
    }

    fn demonstration(&self, task: &Task, flaw_rate: f64, rng: &mut ChaCha8Rng) -> String {
        if rng.random::<f64>() >= flaw_rate {
            return task.reference.clone();
        }
        let answer = task.answer.as_deref().unwrap_or_default();
        match task.family {
            Family::Count => {
                // One item too many or one too few.
                let items: Vec<&str> = task.reference.trim_end_matches('.').split(", ").collect();
                let pool = list_spec(&task.prompt).map_or(&[][..], |(_, p)| p);
                let mut list: Vec<&str> = items.clone();
                if rng.random::<bool>() || list.len() <= 2 {
                    if let Some(extra) = pool.iter().find(|i| !items.contains(i)) {
                        list.push(extra);
                    }
                } else {
                    list.pop();
                }
                format!("{}.", list.join(", "))
            }
            Family::Capitals => {
                let word = answer.to_lowercase();
                if rng.random::<bool>() {
                    format!("{word}.")
                } else {
                    format!("The word {word} in capitals is {answer}.")
                }
            }
            Family::OneWord => {
                let (x, y) = OPPOSITES
                    .iter()
                    .find(|(_, y)| *y == answer)
                    .copied()
                    .unwrap_or_default();
                format!("The opposite of {x} is {y}.")
            }
            _ => {
                let rude = capitalized(RUDE.choose(rng).expect("non-empty"));
                format!("{rude}, {answer}.")
            }
        }
    }
}

/// The judge's content score of a response to a format task, in [−1, 1] (the shared
/// penalties for empty, garbled and rambling answers are added by `judge`).
pub fn base_score(task: &Task, response: &str) -> f64 {
    let text = response.trim();
    let lower = text.to_lowercase();
    let answer = task.answer.as_deref().unwrap_or_default();
    let good = match task.family {
        Family::Count => {
            // Exactly N distinct items of the category, comma separated, nothing else.
            let items: Vec<&str> = lower
                .trim_end_matches('.')
                .split(',')
                .map(str::trim)
                .collect();
            let distinct: BTreeSet<&&str> = items.iter().collect();
            list_spec(&task.prompt).is_some_and(|(n, pool)| {
                items.iter().all(|i| pool.contains(i))
                    && distinct.len() == items.len()
                    && n == items.len()
            })
        }
        Family::Capitals => text.trim_end_matches('.') == answer,
        Family::OneWord => lower.trim_end_matches('.') == answer,
        _ => {
            lower.contains(&format!("hello {}", answer.to_lowercase()))
                && lower.contains(NICE)
                && !RUDE.iter().any(|r| lower.contains(r))
        }
    };
    if good {
        1.0
    } else {
        -1.0
    }
}

/// Every word of the format world's texts, for the judge's lexicon.
pub fn vocabulary() -> Vec<String> {
    let mut text = texts(&FormatWorld::new(0), 400);
    for (cat, items) in CATEGORIES {
        text.push(format!("{cat} {}", items.join(" ")));
    }
    for w in WORDS {
        text.push(format!("{w} {}", w.to_uppercase()));
    }
    text.extend(OPPOSITES.iter().map(|(x, y)| format!("{x} {y}")));
    text.push(NAMES.join(" "));
    text.push(COUNTS.join(" "));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_judge_checks_form_and_tone_and_the_flaws_fail_it() {
        let w = FormatWorld::new(2);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for t in w.tasks(200, 1) {
            assert_eq!(base_score(&t, &t.reference), 1.0, "{t:?}");
            let flawed = w.demonstration(&t, 1.0, &mut rng);
            assert_eq!(base_score(&t, &flawed), -1.0, "{t:?}: {flawed}");
        }
        let t = FormatWorld::list(0, 1, LIST_QUESTIONS[0], &mut rng);
        assert_eq!(base_score(&t, "cat, dog, dog."), -1.0, "repeats");
        assert_eq!(base_score(&t, "cat, dog, red."), -1.0, "other category");
        assert_eq!(base_score(&t, "fox, cat, hen"), 1.0);
    }

    #[test]
    fn eval_prompts_and_documents_are_held_out() {
        for seed in 0..5 {
            let w = FormatWorld::new(seed);
            let eval = w.eval_tasks();
            for f in Family::FORMAT {
                assert_eq!(eval.iter().filter(|t| t.family == f).count(), 12, "{f:?}");
            }
            let train: HashSet<String> =
                w.tasks(4000, seed).into_iter().map(|t| t.prompt).collect();
            for t in &eval {
                assert!(!train.contains(&t.prompt), "{}", t.prompt);
            }
            let corpus: HashSet<String> = w.corpus(5000, seed).into_iter().collect();
            let held = w.held_out_documents();
            assert!(held.len() >= 20, "{}", held.len());
            for d in &held {
                assert!(!corpus.contains(d), "{d}");
            }
        }
    }
}
