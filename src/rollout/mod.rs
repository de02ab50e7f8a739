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
