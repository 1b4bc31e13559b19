//! Data: conversations and preference pairs from JSONL, the tokenizer and chat templates,
//! tokenization with assistant masks, datasets prepared for training ([`prepare`]), packing, and
//! the one batch type every scoring forward takes ([`batch`]).

pub mod batch;
pub mod cache;
pub mod check;
pub mod conversation;
pub mod encode;
pub mod groups;
pub mod packing;
pub mod preference;
pub mod prepare;
pub mod pyjson;
pub mod template;
pub mod tokenizer;
