//! Data: file formats, tokenization and chat templates.

pub mod chat_encoding;
pub mod chat_template;
pub mod jsonl;
pub mod prompts;
pub mod rankings;
pub mod reward_input;
pub mod sft;
pub mod text;
pub mod tokenizer;
