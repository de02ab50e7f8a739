//! The prompts of an online method: read and checked once (every prompt must fit the
//! policy's context with its longest response, and the reward model's), then walked
//! in shuffled epochs, `count` per iteration, so that a resumed run samples exactly the
//! prompts an uninterrupted one would.

use std::path::Path;

use super::scorer::Scorer;
use crate::data::prompts::{read_prompts, Prompt};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::train::order::EpochOrder;

pub struct PromptSet {
    /// Each prompt as given (the reward model's input is built from it) and tokenized
    /// for generation, in file order.
    pub prompts: Vec<(Prompt, Vec<u32>)>,
    order: EpochOrder,
    /// This rank's place in a data-parallel run: each iteration walks `count` prompts
    /// per rank, and rank r takes the r-th `count` of them.
    rank: usize,
    world: usize,
}

impl PromptSet {
    /// Reads a prompts JSONL and checks every prompt against the policy's `context`
    /// and, for a reward model, its context, with `max_new_tokens` of response.
    pub fn load(
        path: &Path,
        tokenizer: &Tokenizer,
        context: usize,
        max_new_tokens: usize,
        scorer: &Scorer,
        seed: u64,
    ) -> Result<Self> {
        let mut prompts = vec![];
        for (line, _, p) in read_prompts(path)? {
            let bad = |m: String| Error::bad_file(path, Some(line), m);
            let ids = p
                .tokenize(tokenizer, false)
                .map_err(|e| bad(e.to_string()))?;
            if ids.is_empty() {
                return Err(bad("the prompt is empty (0 tokens)".into()));
            }
            if ids.len() + max_new_tokens > context {
                return Err(bad(format!(
                    "prompt has {} tokens; with max_new_tokens {max_new_tokens} that exceeds the model's context of {context}",
                    ids.len(),
                )));
            }
            if let Scorer::Model(rm) = scorer {
                // The reward model reads the prompt, the response and what closes it.
                let closed = rm.input(&p, "").map_err(|e| bad(e.to_string()))?.len();
                let rm_context = rm.context_length();
                if closed + max_new_tokens > rm_context {
                    return Err(bad(format!(
                        "prompt with a closed empty response is {closed} tokens for the reward model; with max_new_tokens {max_new_tokens} that exceeds its context of {rm_context}",
                    )));
                }
            }
            prompts.push((p, ids));
        }
        // Ranks split each iteration's prompts themselves (`pick`): the walk is one.
        let order = EpochOrder::sharded(prompts.len(), seed, 0, 1);
        let comm = crate::distributed::current();
        Ok(PromptSet {
            prompts,
            order,
            rank: comm.rank(),
            world: comm.world_size(),
        })
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// The prompt indices of `iteration`: the next `count` of a deterministic walk over
    /// shuffled epochs of the prompts (this rank's `count`, in a data-parallel run).
    pub fn pick(&self, iteration: usize, count: usize) -> Vec<usize> {
        let n = self.prompts.len();
        self.positions(iteration, count)
            .map(|g| self.order.batch(g / n, g % n, 1)[0])
            .collect()
    }

    /// The walk's positions that `pick` reads: rank r of W takes the r-th `count` of
    /// the iteration's W·`count`, so that the ranks together read what one process
    /// picking W·`count` reads. A position names one sample of the whole run.
    pub fn positions(&self, iteration: usize, count: usize) -> std::ops::Range<usize> {
        let start = (iteration * self.world + self.rank) * count;
        start..start + count
    }
}
