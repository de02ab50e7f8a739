//! `rlhf label`: the labeling app where people write demonstrations, rank K model
//! outputs and judge two models blind (InstructGPT's data collection, section 3.4 and
//! appendix B).
//!
//! - `label new`: a project in one SQLite file (`store`): its prompts and, for ranking
//!   and comparing, the responses sampled from the models (`project`);
//! - `label add-labeler NAME`: a personal link with a random token (only its hash is
//!   stored); `--admin` for the admin page;
//! - `label serve`: the pages and their JSON API (`routes`), each item to `--overlap`
//!   different labelers (`assign`), queue order from `select`;
//! - `label export`: JSONL for `rlhf rm train` and `rlhf sft` (`export`), several
//!   labelers' rankings merged by Borda (`consensus`); agreement in `agreement`.
//!
//! The store and every rule are usable without HTTP; the handlers only translate.

pub mod agreement;
pub mod assign;
pub mod consensus;
pub mod export;
pub mod project;
pub mod routes;
pub mod select;
pub mod stats;
pub mod store;
pub mod submission;

pub mod cli;
pub mod error;

pub use cli::{run, LabelCommand};
pub use error::{LabelError, Result};
