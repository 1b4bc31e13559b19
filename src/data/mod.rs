//! Data: conversations from JSONL, chat templates, and tokenization with assistant masks.

pub mod check;
pub mod conversation;
pub mod encode;
pub mod template;
