//! The building blocks every online RL method shares (PPO, GRPO, RLOO): which prompts
//! an iteration samples (`prompts`), how responses are scored (`scorer`: the frozen
//! reward model, a user's command, or a function), and the statistics of a batch of
//! samples (`stats`). Sampling itself is `generate`; the per-token log-probs of the
//! policy and the frozen reference are `model::response`'s. Each method keeps only
//! what its equation says: how scores become advantages and what loss it minimises.

pub mod command;
pub mod policy;
pub mod prompts;
pub mod scorer;
pub mod stats;

pub use command::RewardCommand;
pub use prompts::PromptSet;
pub use scorer::{ScoreFn, Scorer};

/// The random stream a run samples its responses with: from `--seed`, and in a
/// data-parallel run a different stream on each rank (rank 0's is the one-process
/// stream), so that ranks do not draw the same tokens for their different prompts.
pub fn sampling_rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    let rank = crate::distributed::current().rank();
    rand_chacha::ChaCha8Rng::seed_from_u64(crate::distributed::rank_seed(seed, rank))
}

/// The random stream of one sample, named by its position in the run's walk over the
/// prompts (`PromptSet::positions`): a sample draws the same tokens whichever rank,
/// and whichever batch, it is drawn in. PPO samples with these, so that W ranks with
/// R prompts each sample what one process with W·R prompts samples.
pub fn sample_stream(seed: u64, position: usize) -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(position as u64);
    rng
}
