//! Data: file formats, tokenization and chat templates.

pub mod chat_template;
pub mod jsonl;
pub mod prompts;
pub mod tokenizer;
